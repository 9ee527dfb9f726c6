"""Test helpers: run our model's full-sequence logits, prompts no other test shares, HF reference pieces, tiny
random models with the default model's tokenizer, GGUF files written as llama.cpp writes them, and a chat stream read
through the openai client, and pictures as data URLs."""

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from models import KVCache


def png_url(seed: int, shape=(40, 31)) -> str:
    """A random RGB picture as a PNG data URL."""
    import base64
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def unique_prefix(seed: int, n: int) -> list[int]:
    """`n` random ordinary token ids nobody else uses (so the first request misses the prefix cache)."""
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 20000, n)]


@functools.cache
def _forward(model_module):
    """The module's full-sequence forward pass as one program (run eagerly, it would compile each of its hundreds of
    operations on its own), one per module: a caller's later calls of the same shapes compile nothing."""
    return jax.jit(lambda p, t, q, tb, c: model_module.apply(p, t, q, tb, c, None, True)[0])


def our_logits(model_module, params, rows: list[list[int]]) -> list[np.ndarray]:
    """Logits `[len, V]` for each row, computed as one right-padded batch."""
    b, s = len(rows), max(len(r) for r in rows)
    toks = np.zeros((b, s), np.int32)
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    page = 16
    n = -(-s // page)
    cache = KVCache.zeros(model_module.cfg, 1 + b * n, page)  # page 0 is scratch; row i holds pages 1 + i*n ...
    table = 1 + np.arange(b * n, dtype=np.int32).reshape(b, n)
    logits = _forward(model_module)(params, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(table), cache)
    logits = np.asarray(logits)
    return [logits[i, :len(r)] for i, r in enumerate(rows)]


def decoded_logits(model_module, params, rows: list[list[int]], starts: list[int]) -> list[np.ndarray]:
    """Each row's logits `[len - start, V]` predicting its tokens from `start` on, teacher-forced as decoding runs:
    the tokens before the earliest start less one prefilled, the rest fed one a step (one program: a `lax.scan`),
    so each step reads every earlier key and value back from the pool, in the pool's dtype."""
    b, s, page = len(rows), max(len(r) for r in rows), 16
    toks = np.zeros((b, s), np.int32)
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
    n, first = -(-s // page), min(starts) - 1
    table = jnp.asarray(1 + np.arange(b * n, dtype=np.int32).reshape(b, n))

    @jax.jit
    def run(params, toks, cache):
        pos = jnp.broadcast_to(jnp.arange(first, dtype=jnp.int32), (b, first))
        cache = model_module.apply(params, toks[:, :first], pos, table, cache, None, True)[1]

        def step(cache, p):
            tok = jax.lax.dynamic_slice_in_dim(toks, p, 1, axis=1)
            logits, cache = model_module.apply(params, tok, jnp.full((b, 1), p, jnp.int32), table, cache, None,
                                               True)
            return cache, logits[:, 0]

        return jax.lax.scan(step, cache, jnp.arange(first, s - 1, dtype=jnp.int32))[1]

    logits = np.asarray(run(params, jnp.asarray(toks), KVCache.zeros(model_module.cfg, 1 + b * n, page)))
    return [logits[start - 1 - first:len(r) - 1 - first, i] for i, (r, start) in enumerate(zip(rows, starts))]


def run_all(eng, prompts, params, predictions=None, grammars=None, **request):
    """Serve every prompt to completion in one engine, checking the page pool after each step; the requests, in
    order. `predictions` and `grammars`: each prompt's (speculative decoding; structured output), or None; `request`:
    more arguments of `Engine.make_request` (a `grammar` too), the same for every prompt."""
    predictions = predictions or [None] * len(prompts)
    grammars = grammars or [request.pop("grammar", None)] * len(prompts)  # or one for every prompt
    reqs = [eng.make_request(p, q, prediction=pred, grammar=g, **request)
            for p, q, pred, g in zip(prompts, params, predictions, grammars)]
    for r in reqs:
        eng.add(r)
    while eng.has_work():
        eng.step()
        eng.sched.pools[0].check()
    return reqs


def host_decided(text: str) -> list[str]:
    """What in a lowered program XLA's GPU runtime decides on the host, after waiting for the device: each
    conditional, and each loop whose condition is not its counter against a constant (its trip count unknown)."""
    loops = re.findall(r"cond \{\n(.*?)\n\s*\} do \{", text, re.S)
    counted = (r"\s*(%\S+) = stablehlo.constant dense<\d+> : tensor<i32>\n"
               r"\s*(%\S+) = stablehlo.compare\s+LT, %iterArg\S*, \1,.*\n\s*stablehlo.return \2 ")
    return (re.findall(r"stablehlo.(?:case|if)\b", text) +
            [c for c in loops if not re.fullmatch(counted + r".*", c, re.S)])


@contextlib.contextmanager
def recording(obj, names):
    """Record each call of `obj`'s methods `names` as `(name, args)` in the list it yields; the methods run as before
    and are restored on exit."""
    calls = []

    def wrap(name, fn):
        def call(*args, **kwargs):
            calls.append((name, args))
            return fn(*args, **kwargs)
        return call

    for name in names:
        setattr(obj, name, wrap(name, getattr(obj, name)))
    try:
        yield calls
    finally:
        for name in names:
            delattr(obj, name)


def dry_reference(tokens, mult, base, allowed, last_n, breakers, vocab):
    """llama.cpp's DRY (`llama_sampler_dry_apply` in its llama-sampling.cpp) written out plainly, a breaker being a
    token of `breakers`: what each of the `vocab` tokens' logits loses after `tokens` (the history, oldest first)."""
    out = np.zeros(vocab)
    if mult == 0 or base < 1 or last_n == 0:
        return out
    toks = list(tokens)[-last_n:] if last_n > 0 else list(tokens)
    n = len(toks)
    if n <= allowed:
        return out
    limit = n  # a run stops at the last breaker
    for i in range(n):
        if toks[n - 1 - i] in breakers:
            limit = i
            break
    if limit < allowed:
        return out
    most = {}
    for k in range(1, n):  # an earlier copy of the last m tokens ends k back, and toks[n - k] followed it
        m = 0
        while m + k < n and toks[n - 1 - m] == toks[n - 1 - m - k]:
            m += 1
        m = min(m, limit)
        if m >= allowed:
            most[toks[n - k]] = max(most.get(toks[n - k], 0), m)
    cap = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    for t, m in most.items():
        if t not in breakers:
            e = m - allowed if cap <= 0 or m - allowed <= cap else cap
            out[t] = mult * float(base) ** e
    return out


def tiny_tokenizer(folder: str, tokenizer_folder: str, specials: list[str] = (), chat_template: str | None = None):
    """The tokenizer of `tokenizer_folder` plus `specials` (and `chat_template`), saved in `folder`."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return tok


def randomized(ref, scale: float):
    """A transformers model with every weight drawn N(0, scale²) in place (larger than the init's, so that the input
    moves the answer); returns it."""
    import torch

    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return ref


def saved_reference(ref, folder: str, scale: float):
    """`randomized(ref, scale)` saved in `folder`, its generation set to run past any end of sequence (as
    `ignore_eos` runs); returns it."""
    randomized(ref, scale).save_pretrained(folder)
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0
    return ref


def tiny_llama(folder: str, tokenizer_folder: str, specials: list[str], chat_template: str | None = None,
               scale: float | None = None):
    """A 2-layer random Llama saved in `folder` with the tokenizer of `tokenizer_folder` plus `specials` (and
    `chat_template`): `(transformers tokenizer, transformers model)`; `scale`: weights drawn N(0, scale²)."""
    import torch
    import transformers

    tok = tiny_tokenizer(folder, tokenizer_folder, specials, chat_template)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).float().eval()
    if scale is not None:
        randomized(ref, scale)
    ref.save_pretrained(folder, safe_serialization=True)
    return tok, ref


def pieces(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at those of `cuts` inside it, then an empty last piece (a stream's end)."""
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])] + [""]


def read_pieces(reader, parts: list[str]) -> tuple[str, str]:
    """`(reasoning, answer)` of a reply reader (`harmony.Reader`, `cohere.Reader`) fed `parts` in order, the last
    as the end."""
    reasoning, answer = "", ""
    for i, part in enumerate(parts):
        r, a = reader.feed(part, final=i == len(parts) - 1)
        reasoning, answer = reasoning + r, answer + a
    return reasoning, answer


def prompt_after_call(client, model, ask: list[dict], call, tools: list[dict]) -> str:
    """The prompt text (special tokens kept) the server renders for `ask`, then the assistant's tool `call` (an
    `openai` tool call object) and its result: how the template writes the call back. `model`: the served `Model`."""
    history = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    r = client.chat.completions.create(model=model.name, messages=history, tools=tools, max_tokens=2,
                                       extra_body={"return_token_ids": True})
    return model.tokenizer.decode(r.model_extra["prompt_token_ids"], skip_special_tokens=False)


def stream_chat(client, **body) -> tuple[str, str, list[dict], str | None]:
    """A streamed chat completion's `(reasoning, content, tool calls as {"name", "arguments"}, finish reason)`, its
    deltas joined."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    return reasoning, content, list(calls.values()), finish


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation for a `llama`-style GGUF (rotate_half halves to interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_adapter(folder: str, path: str, arch: str, layers: int, heads: int = 0, kv_heads: int = 0,
                 alpha: float | None = None, **strings: str) -> None:
    """The PEFT LoRA adapter in `folder` written to `path` as llama.cpp's `convert_lora_to_gguf.py` writes it for a
    base model of GGUF architecture `arch`: `general.type` "adapter", `adapter.type` "lora", `adapter.lora.alpha`,
    each module's A and B under its base tensor's GGUF name (gguf's own name map) `+ ".lora_a"` / `".lora_b"`, and for
    `llama` files B of q and k permuted as their base weights are (`heads`, `kv_heads`). `alpha`: another than the
    folder's; `strings`: `adapter.lora.<key>` strings (`task_name`, `prompt_prefix`)."""
    import json
    import os

    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "adapter_config.json")) as f:
        alpha = json.load(f)["lora_alpha"] if alpha is None else alpha
    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(kind, layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key, value in strings.items():
        w.add_string(f"adapter.lora.{key}", value)
    for key, t in sorted(load_file(os.path.join(folder, "adapter_model.safetensors")).items()):
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        base = names.get_name(module + ".weight", try_suffixes=(".weight",))
        t = t.astype(np.float32)
        if arch == "llama" and part == "B.weight" and ".attn_q." in base:
            t = llama_permute(t, heads)
        if arch == "llama" and part == "B.weight" and ".attn_k." in base:
            t = llama_permute(t, kv_heads)
        w.add_tensor(base + (".lora_a" if part == "A.weight" else ".lora_b"), t)
    close_gguf(w)


def close_gguf(w) -> None:
    """Write a `GGUFWriter`'s file: header, metadata, tensors."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_gguf_loads_as_the_folder(folder: str, path: str, rows: list[list[int]]) -> None:
    """The GGUF at `path` loads to the HF `folder`'s config (but for what GGUF keeps in float32: the epsilon and
    LongRoPE's attention factors, each to float32's precision) and logits on `rows`."""
    import dataclasses

    from models import load_model

    hf, ours = load_model(folder, with_tokenizer=False), load_model(path, with_tokenizer=False)
    kept = ("rms_eps", "rope_scale", "rope_local_scale")  # in float32 in a GGUF
    assert dataclasses.replace(ours.cfg, **{k: getattr(hf.cfg, k) for k in kept}) == hf.cfg
    for k in kept:
        assert abs(getattr(ours.cfg, k) - getattr(hf.cfg, k)) <= 1e-6 * abs(getattr(hf.cfg, k)), k
    for a, b in zip(our_logits(hf.module, hf.params, rows), our_logits(ours.module, ours.params, rows)):
        np.testing.assert_allclose(a, b, atol=1e-5)
