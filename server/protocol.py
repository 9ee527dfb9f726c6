"""The OpenAI/Fireworks request surface: field types and ranges, prompts and chat messages, into engine requests.

Everything here is plain Python over the decoded JSON body; a bad value raises `ApiError` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Callable

from engine.grammar import (choice_grammar, gbnf_grammar, grammar_text, json_grammar, regex_grammar,
                            structural_tag_grammar)
from engine.params import DRY_BREAKERS, MAX_BREAKERS, InvalidRequest, SamplingParams
from server import cohere, harmony, images, infill, reasoning, tools
from server.reasoning import Thinking
from server.tools import Tools
from models import Model, vision
from models.loading.tokenizer import REASONING


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def renamed(self, names: dict[str, str]) -> "ApiError":
        """This error in another API's field names (`param`, and the field as quoted in the message)."""
        new = names.get(self.param, self.param)
        if new != self.param:
            self.message, self.param = self.message.replace(f"'{self.param}'", f"'{new}'"), new
        return self

    def body(self) -> dict:
        """The JSON error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param)


def unreadable(request, message: str, param: str | None = None) -> ApiError:
    """The 400 of a body that could not be read off its connection (a Content-Encoding it does not match, a cut
    chunked body). The body is given up, so aiohttp does not read the rest after the reply and raise its error
    again; the connection closes after the reply (`Connection: close`, which `Server`'s middleware honours), as its
    parser has lost its place in the stream."""
    request.content.feed_eof()
    return ApiError(400, message, param, headers={"Connection": "close"})


def busy(why: str) -> ApiError:
    """The 429 of a server too busy for one more call, saying why (the queue, the parse bound, the grammar
    sandbox)."""
    return ApiError(429, f"{why}; retry shortly", type_="rate_limit_error", code="too_many_requests",
                    headers={"Retry-After": "1"})


MAX_DEPTH = 64  # JSON nesting a body may have: deeper would exhaust Python's stack in json, jsonschema or jinja
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a UTF-16 surrogate can enter strictly decoded UTF-8


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: bytes) -> Any:
    """The JSON value of a request body: strict UTF-8, no NaN or Infinity, nested at most `MAX_DEPTH` deep, and
    every string valid Unicode (a lone surrogate escape such as `"\\ud83d"` is JSON but not text); else a 400
    naming where."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise bad(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    texts = _SURROGATE_ESCAPE.search(raw) is not None
    stack = [(value, "the request body", None, 0)]  # (value, where it is, the top-level field, depth)
    while stack:
        v, where, param, depth = stack.pop()
        if isinstance(v, str):
            if texts and not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise bad(f"{where} holds a lone UTF-16 surrogate ({v[e.start]!r}), which is not valid Unicode "
                              "text", param) from None
        elif depth >= MAX_DEPTH and isinstance(v, (dict, list)):
            raise bad(f"the request body is nested more than {MAX_DEPTH} levels deep", param)
        elif isinstance(v, dict):
            at = "" if param is None else f"{where}."
            stack.extend((x, f"{at}{k}", param or k, depth + 1) for k, x in v.items())
            if texts:
                stack.extend((k, f"a key of {where}", param, depth) for k in v)
        elif isinstance(v, list) and not set(map(type, v)) <= {int, float, bool, type(None)}:
            stack.extend((x, f"{where}[{i}]", param, depth + 1) for i, x in enumerate(v))
    return value


# name: (type, low, high) for numeric fields shared by both endpoints; None bounds are open.
NUMBERS: dict[str, tuple[type, float | None, float | None]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, -1, None),  # 0 and vLLM's -1: the whole vocabulary
    "min_p": (float, 0.0, 1.0),
    "typical_p": (float, 0.0, 1.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "presence_penalty": (float, -2.0, 2.0),
    "repetition_penalty": (float, 0.0, 2.0),
    "n": (int, 1, 128),
    "max_tokens": (int, 0, None),
    "max_completion_tokens": (int, 0, None),
    "mirostat_target": (float, 0.0, None),
    "mirostat_lr": (float, 0.0, None),
    "seed": (int, -(2**63), 2**63 - 1),  # vLLM's: a 64-bit integer
    "echo_last": (int, 0, None),
    "prompt_truncate_len": (int, 1, None),
    "prompt_cache_max_len": (int, 0, None),
    "priority": (int, -(2**31), 2**31 - 1),
    "min_tokens": (int, 0, None),
    "truncate_prompt_tokens": (int, -1, None),
    "prompt_logprobs": (int, 0, 20),
    "dry_multiplier": (float, 0.0, None),
    "dry_base": (float, 1.0, None),
    "dry_allowed_length": (int, 0, None),
    "dry_penalty_last_n": (int, -1, None),
    "top_n_sigma": (float, None, None),
    "xtc_probability": (float, 0.0, 1.0),
    "xtc_threshold": (float, 0.0, 1.0),
    "dynatemp_range": (float, 0.0, None),
    "dynatemp_exponent": (float, 0.0, None),
    "length_penalty": (float, -10.0, 10.0),
    "n_indent": (int, 0, 4096),
    "t_max_predict_ms": (int, -1, None),  # -1 or 0: no limit, as llama.cpp's default -1
}
HOT = {"temperature": (float, 0.0, None)}  # llama.cpp's and SGLang's range (any temperature), for `parse`'s bounds
LLAMA_CPP = ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "top_n_sigma",
             "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent", "n_indent",
             "t_max_predict_ms")  # llama.cpp's samplers and limits: `SamplingParams`' defaults where not given
FLOAT32_MAX = 3.4e38
TOKEN_ID = re.compile(r"(0|[1-9][0-9]*)", re.ASCII)  # a logit_bias key: "1" and "01" must not name one token twice
TEMPLATE_OWN = ("messages", "tools", "add_generation_prompt", "tokenize", "conversation")  # no kwargs may set these
FLAGS = ("stream", "echo", "raw_output", "ignore_eos", "return_token_ids", "use_beam_search")
STRICTLY_POSITIVE = ("typical_p", "repetition_penalty", "mirostat_target", "mirostat_lr")
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOPS = 64  # every route's bound: vLLM, llama.cpp and Ollama take any number (lm-eval's code tasks send 8 or
#                more, SillyTavern a dozen); OpenAI's is 4
MAX_STOP_CHARS = 4096  # a stop string's length at most: each is looked for in the text each step


@dataclasses.dataclass
class Job:
    """A parsed request: prompts as token ids (one engine request each), the sampling settings and output options."""

    kind: str  # "chat" or "completion"
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's continuous_usage_stats: every chunk carries the usage so far
    echo: bool = False
    echo_last: int | None = None
    raw_output: bool = False
    return_token_ids: bool = False
    logprobs: int | None = None  # number of alternatives; None: no logprobs
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens `token_id:N`
    truncate: bool = True
    cache_max_len: int | None = None  # prompt_cache_max_len: reuse at most this many cached prompt tokens
    cache_key: str | None = None  # prompt_cache_isolation_key: share cached pages only under the same key
    priority: int = 0  # vLLM's: its place in line under --scheduling-policy priority (lower sooner)
    grammar: str | None = None  # response_format (or another API's field) as an llguidance grammar (None: free text)
    grammar_param: str = "response_format"  # the field that asked for it
    perf_metrics: bool = False  # perf_metrics_in_response
    tools: Tools | None = None  # chat: the functions the model may call, and tool_choice
    thinking: Thinking | None = None  # chat with a reasoning parser: split the thinking out (and its budget)
    prediction: list[int] | None = None  # token ids the output is expected to resemble (drafts for speculation)
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' logprobs and this many alternatives each
    keep_last: int | None = None  # vLLM's truncate_prompt_tokens: keep each prompt's last tokens (-1: all that fit)
    # chat with a model that reads images: the prompt's images in order, as preprocessed pixels; then, encoded on the
    # parse thread (`server.app`), as `(digest, pixels, features)` (`engine.images`)
    images: list = dataclasses.field(default_factory=list)
    # vLLM's `use_beam_search`: n beams per prompt (`engine.beam`), scored over length ** `length_penalty`
    beam_search: bool = False
    length_penalty: float = 1.0


def _number(body: dict, name: str, bounds: dict | None = None) -> Any:
    kind, lo, hi = (bounds or {}).get(name, NUMBERS[name])
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise bad(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {type(v).__name__}", name)
    if kind is float and not abs(v) <= FLOAT32_MAX:  # NaN and inf (1e400 reads as inf) too; ints compare exactly
        raise bad(f"'{name}' must be a finite number of magnitude at most {FLOAT32_MAX:.3g} (the sampler's float32), "
                  f"got {str(v)[:40]}", name)
    if (lo is not None and (v < lo or (v == lo and name in STRICTLY_POSITIVE))) or (hi is not None and v > hi):
        side = "(" if name in STRICTLY_POSITIVE else "["
        raise bad(f"'{name}' must be in {side}{lo}, {hi if hi is not None else 'inf'}], got {v}", name)
    return kind(v)


def _flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {type(v).__name__}", name)
    return v


def stop_strings(v: Any, param: str = "stop") -> list[str]:
    """An API's stop strings (a string or a list: at most `MAX_STOPS`, each non-empty and at most `MAX_STOP_CHARS`
    characters), or a 400 naming `param`."""
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"'{param}' must be a string or a list of strings", param)
    if len(stops) > MAX_STOPS:
        raise bad(f"'{param}' takes at most {MAX_STOPS} strings, got {len(stops)}", param)
    if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise bad(f"'{param}' strings must not be empty nor longer than {MAX_STOP_CHARS} characters", param)
    return stops


def _logit_bias(v: Any) -> dict[int, float]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, b in v.items():
        if not TOKEN_ID.fullmatch(k):
            raise bad(f"'logit_bias' key {k!r} is not a token id (a decimal integer without sign, spaces or leading "
                      "zeros)", "logit_bias")
        t = int(k)
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad(f"'logit_bias' values must be numbers in [-100, 100], got {b!r} for {k!r}", "logit_bias")
        out[t] = float(b)
    return out


def sampling(body: dict, bounds: dict | None = None) -> SamplingParams:
    """The sampling settings of a request body (validated types and ranges: `NUMBERS`', or `bounds`' where it names
    the field)."""
    num = {name: _number(body, name, bounds) for name in NUMBERS}
    max_tokens = num["max_completion_tokens"] if num["max_completion_tokens"] is not None else num["max_tokens"]
    return SamplingParams(
        max_tokens=max_tokens, temperature=num["temperature"], top_p=num["top_p"],
        top_k=None if num["top_k"] is None else max(num["top_k"], 0),
        min_p=num["min_p"], typical_p=num["typical_p"], repetition_penalty=num["repetition_penalty"],
        frequency_penalty=num["frequency_penalty"] or 0.0, presence_penalty=num["presence_penalty"] or 0.0,
        logit_bias=_logit_bias(body.get("logit_bias")), ignore_eos=_flag(body, "ignore_eos"),
        mirostat_target=num["mirostat_target"], mirostat_lr=num["mirostat_lr"] or 0.1, seed=num["seed"],
        n=num["n"] or 1, stop=stop_strings(body.get("stop")), min_tokens=num["min_tokens"] or 0,
        stop_token_ids=_token_ids(body.get("stop_token_ids"), "stop_token_ids"),
        include_stop_str_in_output=_flag(body, "include_stop_str_in_output"),
        skip_special_tokens=body.get("skip_special_tokens") is None or _flag(body, "skip_special_tokens"),
        allowed_token_ids=None if body.get("allowed_token_ids") is None else _token_ids(body["allowed_token_ids"],
                                                                                        "allowed_token_ids"),
        bad_words=_bad_words(body.get("bad_words")), dry_sequence_breakers=_breakers(body.get("dry_sequence_breakers")),
        **{k: num[k] for k in LLAMA_CPP if num[k] is not None})


def _bad_words(v: Any) -> list[str]:
    """vLLM's `bad_words`: a list of words (each with some text besides spaces)."""
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(w, str) and w.strip() for w in v):
        raise bad("'bad_words' must be a list of words (strings with text besides spaces)", "bad_words")
    return v


def _breakers(v: Any) -> list[str]:
    """llama.cpp's `dry_sequence_breakers`: a non-empty list of non-empty strings (its defaults when absent)."""
    if v is None:
        return list(DRY_BREAKERS)
    if not isinstance(v, list) or not v or not all(isinstance(b, str) and b for b in v) or len(v) > MAX_BREAKERS:
        raise bad(f"'dry_sequence_breakers' must be a list of 1 to {MAX_BREAKERS} non-empty strings",
                  "dry_sequence_breakers")
    return v


def _token_ids(v: Any, name: str) -> list[int]:
    """A list of token ids (non-negative integers; the engine checks them against the vocabulary)."""
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise bad(f"'{name}' must be a list of token ids (non-negative integers)", name)
    return v


def _unsupported(body: dict) -> None:
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise bad("'best_of' is not supported by this server (use n)", "best_of")


def parse(body: Any, kind: str, model: Model, thinks: str | None = None, bounds: dict | None = None,
          media: images.Media = images.NO_MEDIA) -> Job:
    """Validate a chat or completions body against `model` and turn it into a `Job`; `thinks`: how the server splits
    the model's thinking from its answer ("think", "seed", "mistral", "harmony" or "cohere": `reasoning.resolve`);
    `bounds`: another API's ranges for some numeric fields (llama.cpp's and SGLang's temperature has no upper bound,
    OpenAI's is 2); `media`: where pictures may be fetched from."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _unsupported(body)
    params = sampling(body, bounds)
    job = Job(kind, [], [], params, stream=_flag(body, "stream"), echo=_flag(body, "echo"),
              raw_output=_flag(body, "raw_output"), return_token_ids=_flag(body, "return_token_ids"),
              perf_metrics=_flag(body, "perf_metrics_in_response"))
    job.echo_last = _number(body, "echo_last")
    job.keep_last = _number(body, "truncate_prompt_tokens")
    job.prompt_logprobs = _number(body, "prompt_logprobs")
    if job.prompt_logprobs is not None and job.stream:
        raise bad("'prompt_logprobs' is for whole responses, not streams (echo with logprobs streams them)",
                  "prompt_logprobs")
    if job.keep_last == 0:
        raise bad("'truncate_prompt_tokens' must be -1 (keep what fits the context) or a number of tokens >= 1",
                  "truncate_prompt_tokens")
    job.cache_max_len = _number(body, "prompt_cache_max_len")
    job.tokens_as_ids = _flag(body, "return_tokens_as_token_ids")
    _flag(body, "parallel_tool_calls")  # a boolean with tools or without
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string", "user")
    job.cache_key = body.get("prompt_cache_isolation_key")
    job.priority = _number(body, "priority") or 0
    try:
        job.grammar = grammar_text(body.get("response_format"))
        if other := other_grammar(body):
            if job.grammar is not None:
                raise bad(f"'response_format' and '{other[1]}' both ask for structured output; give one", other[1])
            job.grammar, job.grammar_param = other
    except InvalidRequest as e:
        raise bad(str(e), e.param) from None
    if job.cache_key is not None and not isinstance(job.cache_key, str):
        raise bad("'prompt_cache_isolation_key' must be a string", "prompt_cache_isolation_key")
    if (salt := body.get("cache_salt")) is not None:  # vLLM's name for it
        if not isinstance(salt, str) or not 0 < len(salt) <= 1024:
            raise bad("'cache_salt' must be a non-empty string of at most 1024 characters", "cache_salt")
        if job.cache_key not in (None, salt):
            raise bad("'cache_salt' and 'prompt_cache_isolation_key' name the same thing; give one", "cache_salt")
        job.cache_key = salt
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not all(isinstance(opts.get(k, False), bool)
                                                 for k in ("include_usage", "continuous_usage_stats")):
            raise bad("'stream_options' must be an object like {'include_usage': true, 'continuous_usage_stats': "
                      "false}", "stream_options")
        if not job.stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        job.include_usage = bool(opts.get("include_usage"))
        job.continuous_usage = job.include_usage and bool(opts.get("continuous_usage_stats"))
    behaviour = body.get("context_length_exceeded_behavior", "truncate")
    if behaviour not in ("truncate", "error", None):
        raise bad("'context_length_exceeded_behavior' must be 'truncate' or 'error'",
                  "context_length_exceeded_behavior")
    job.truncate = behaviour != "error"
    if kind == "chat":
        if body.get("suffix") is not None:
            raise bad("'suffix' (fill in the middle) is for completions", "suffix")
        job.logprobs = _chat_logprobs(body)
        job.tools = tools.parse(body, bad)
        if job.tools is not None and job.tools.forced:
            # a forced turn is a call, with no text for `response_format` to shape: the call's grammar wins, as with
            # OpenAI (instructor's and the Agents SDK's forced tools send both); vLLM's own fields ask for the call's
            # text to be shaped otherwise, which cannot be
            if job.grammar is not None and job.grammar_param != "response_format":
                raise bad(f"a tool_choice that forces a call cannot be combined with '{job.grammar_param}'",
                          "tool_choice")
            try:
                job.grammar, job.grammar_param = job.tools.grammar(), "tool_choice"
            except InvalidRequest as e:  # a named custom tool's grammar
                raise bad(str(e), e.param) from None
        kwargs, budget, budget_param = template_kwargs(body)
        ids, text, job.images = chat_ids(model, body.get("messages"), _number(body, "prompt_truncate_len"),
                                         job.tools, kwargs, media)
        job.prompts, job.prompt_texts = [ids], [text]
        if thinks:
            tags = cohere.THINKING if thinks == "cohere" else reasoning.TAGS.get(thinks, reasoning.TAGS["think"])
            opened = reasoning.opens(text, tags[0])
            job.thinking = Thinking(opened, budget, form=thinks, budget_param=budget_param)
        if thinks in reasoning.SPECIAL or (job.tools is not None and job.tools.offered
                                           and tools.writes_special_marks(model.tokenizer)):
            job.params = dataclasses.replace(job.params, skip_special_tokens=False)  # read with them, then split
        if thinks in ("harmony", "cohere"):
            if job.tools is not None and job.tools.forced and (thinks == "harmony" or job.tools.raw is None):
                job.grammar = harmony.call_grammar(job.tools.called()) if thinks == "harmony" else \
                    cohere.call_grammar(job.tools.called(), job.tools.parallel and job.tools.target is None)
            elif job.grammar is not None and (thinks == "harmony" or job.tools is None or not job.tools.forced):
                job.grammar = harmony.answer_grammar(job.grammar) if thinks == "harmony" else \
                    cohere.answer_grammar(job.grammar, model.tokenizer.chat_template)
    else:
        if body.get("tools") is not None or body.get("functions") is not None:
            raise bad("tools are for chat completions", "tools")
        job.logprobs = _completion_logprobs(body)
        suffix = _suffix(model, body, job.echo or job.echo_last is not None)
        pairs = completion_prompts(model, body.get("prompt"), special=suffix is None)
        job.prompts, job.prompt_texts = [ids for ids, _ in pairs], [text for _, text in pairs]
        if suffix is not None:  # fill in the middle: the prompt is the prefix
            job.prompts = [infill.arrange(model.tokenizer, ids, suffix) for ids in job.prompts]
            params.stop_token_ids = [*params.stop_token_ids, *model.tokenizer.fim.ends]
    job.prediction = prediction(model, body)
    params.echo = ((job.echo or job.echo_last is not None) and job.logprobs is not None) or \
        job.prompt_logprobs is not None
    params.logprobs = job.logprobs is not None
    params.top_logprobs = job.logprobs or 0
    _beam_search(body, job)
    return job


def _beam_search(body: dict, job: Job) -> None:
    """vLLM's `use_beam_search` (with `length_penalty`): whole responses of free text, `n` beams a prompt; what
    beam search does not give is a 400, not dropped."""
    job.beam_search = _flag(body, "use_beam_search")
    job.length_penalty = _number(body, "length_penalty")
    if not job.beam_search:
        if job.length_penalty is not None:
            raise bad("'length_penalty' is for beam search ('use_beam_search': true)", "length_penalty")
        job.length_penalty = 1.0
        return
    job.length_penalty = 1.0 if job.length_penalty is None else job.length_penalty
    p = job.params
    if p.max_tokens is not None and p.max_tokens < 1:
        raise bad("beam search ('use_beam_search') needs max_tokens >= 1", "max_tokens")
    # what would change the scores a beam is ranked by (the sampler reports the raw logits' log-probabilities); the
    # draw's own settings (temperature, top_p, top_k, min_p, seed, ...) do not apply to a search
    scored = (("suffix", body.get("suffix") is not None), ("logit_bias", bool(p.logit_bias)),
              ("min_tokens", p.min_tokens > 0), ("bad_words", bool(p.bad_words)),
              ("allowed_token_ids", p.allowed_token_ids is not None), ("stop_token_ids", bool(p.stop_token_ids)),
              ("presence_penalty", p.presence_penalty != 0), ("frequency_penalty", p.frequency_penalty != 0),
              ("repetition_penalty", p.repetition_penalty not in (None, 1.0)), ("dry_multiplier", p.dry_multiplier > 0),
              (job.thinking.budget_param if job.thinking else "reasoning_effort",
               job.thinking is not None and job.thinking.budget is not None))
    refused = (*scored, ("stream", job.stream), ("logprobs", job.logprobs is not None),
               ("echo", job.echo or job.echo_last is not None), ("prompt_logprobs", job.prompt_logprobs is not None),
               (job.grammar_param, job.grammar is not None), ("prediction", job.prediction is not None),
               ("stop", bool(job.params.stop)), ("tools", job.tools is not None and bool(job.tools.functions)),
               ("images", bool(job.images)))
    for name, given in refused:
        if given:
            raise bad(f"beam search ('use_beam_search') does not serve '{name}'", name)


# Other servers' fields for structured output, each a way to build a grammar: vLLM's `structured_outputs` (keyed
# below) and its older `guided_*`, SGLang's `regex` / `json_schema` (a JSON string) / `ebnf`, llama.cpp's `grammar`
# (GBNF) / `json_schema` (an object).
GRAMMAR_BUILDERS = {"json": json_grammar, "regex": regex_grammar, "choice": choice_grammar, "grammar": gbnf_grammar,
                    "structural_tag": structural_tag_grammar}
GRAMMAR_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar", "json_schema": "json", "regex": "regex", "ebnf": "grammar",
                  "grammar": "grammar"}


def other_grammar(body: dict) -> tuple[str, str] | None:
    """`(grammar, field)` for structured output asked in vLLM's, SGLang's or llama.cpp's own fields (above); None
    when none asks. More than one is a 400: they would not combine."""
    asked = [(field, kind, body[field]) for field, kind in GRAMMAR_FIELDS.items() if body.get(field) is not None]
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise bad("'structured_outputs' must be an object such as {'json': <schema>}, {'regex': ...}, "
                      "{'choice': [...]} or {'grammar': ...}", "structured_outputs")
        asked += [(f"structured_outputs.{kind}", kind, outputs[kind]) for kind in GRAMMAR_BUILDERS
                  if outputs.get(kind) is not None]
        if outputs.get("json_object") is True:
            asked.append(("structured_outputs.json_object", "json", None))
    if not asked:
        return None
    if len(asked) > 1:
        raise bad(f"{' and '.join(repr(f) for f, _, _ in asked)} each ask for structured output; give one", asked[1][0])
    field, kind, value = asked[0]
    if kind == "json" and isinstance(value, str):  # SGLang's json_schema, vLLM's guided_json: JSON text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise bad(f"'{field}' is not JSON this server reads: {e}", field) from None
    return GRAMMAR_BUILDERS[kind](value, field), field


def prediction(model: Model, body: dict) -> list[int] | None:
    """Token ids of OpenAI's `prediction` (`{"type": "content", "content": text or text parts}`, or a plain string)
    or Fireworks' `speculation` (a string or token ids); None when neither is given."""
    pred, spec = body.get("prediction"), body.get("speculation")
    if pred is not None and spec is not None:
        raise bad("give 'prediction' or 'speculation', not both", "speculation")
    if pred is not None:
        if isinstance(pred, dict):
            if pred.get("type", "content") != "content":
                raise bad("'prediction.type' must be 'content'", "prediction")
            pred = text_of(pred.get("content"), "'prediction.content'", "prediction")
        elif not isinstance(pred, str):
            raise bad("'prediction' must be an object like {'type': 'content', 'content': '...'} or a string",
                      "prediction")
        return _text_ids(model, pred, "prediction")
    if spec is None:
        return None
    if isinstance(spec, str):
        return _text_ids(model, spec, "speculation")
    if not is_ids(spec):
        raise bad("'speculation' must be a string or a list of token ids", "speculation")
    return in_vocab(model, spec, "'speculation'", "speculation") or None


def _suffix(model: Model, body: dict, echo: bool) -> list[int] | None:
    """The token ids of a completion's `suffix` (fill in the middle: `server.infill`); None when it has none."""
    v = body.get("suffix")
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise bad("'suffix' must be a string", "suffix")
    if model.tokenizer is None or model.tokenizer.fim is None:
        raise bad(f"'suffix' asks to fill in the middle, and this model cannot: {infill.NO_FIM}", "suffix")
    if echo:
        raise bad("'echo' cannot be combined with 'suffix' (the prompt is the text before the middle)", "echo")
    if body.get("truncate_prompt_tokens") is not None:  # its cut from the left would drop the FIM prefix token
        raise bad("'truncate_prompt_tokens' cannot be combined with 'suffix'", "truncate_prompt_tokens")
    return model.tokenizer.encode(bounded(model, v, "suffix"), add_special_tokens=False)


def is_ids(p: Any) -> bool:
    """A list of token ids (ints, not bools)."""
    return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def in_vocab(model: Model, ids: list[int], where: str, param: str) -> list[int]:
    """`ids`, or a 400 naming `where` and `param` when one is not a token id of the model's vocabulary."""
    vocab = model.cfg.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise bad(f"{where}: token ids must be in [0, {vocab})", param)
    return list(ids)


def _text_ids(model: Model, text: str, param: str) -> list[int] | None:
    if model.tokenizer is None:
        raise bad(f"a text '{param}' needs the model's tokenizer; give token ids as 'speculation'", param)
    return model.tokenizer.encode(bounded(model, text, param), add_special_tokens=False) or None


def bounded(model: Model, text: str, param: str) -> str:
    """`text`, or a 400 when it must have more tokens than the model has positions: tokenizing takes ~1 s a MB of
    CPU, spent for nothing. Loosely: no token decodes to more characters than the vocabulary's longest token string,
    and a factor of 4 leaves room for normalizers that merge characters."""
    least = len(text) // (4 * model.tokenizer.longest_token)
    if least > model.cfg.max_position:
        raise bad(f"the {param} has {len(text)} characters, so more than {least} tokens: past this model's "
                  f"{model.cfg.max_position} positions", param)
    return text


def template_kwargs(body: dict) -> tuple[dict, int | None, str]:
    """`(chat-template arguments, thinking budget, the field that set it)` from `chat_template_kwargs`,
    `reasoning_effort`, and vLLM's `thinking_token_budget`, `continue_final_message`, `add_generation_prompt` and
    `documents` (the request's own template arguments win, but for `documents`)."""
    extra = body.get("chat_template_kwargs")
    if extra is not None and not isinstance(extra, dict):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    for key in TEMPLATE_OWN:
        if extra and key in extra:
            raise bad(f"'chat_template_kwargs' must not set {key!r}", "chat_template_kwargs")
    if body.get("chat_template") is not None:  # vLLM too refuses one unless started to trust them
        raise bad("a request's own 'chat_template' is not rendered here (templates run code on the server): the "
                  "model's template is used; pass its variables in 'chat_template_kwargs'", "chat_template")
    kwargs, budget = reasoning.effort(body.get("reasoning_effort"), bad)
    param = "reasoning_effort"
    limit = body.get("thinking_token_budget")  # vLLM's: a budget of thinking tokens that leaves the template as it is
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < -1:
            raise bad("'thinking_token_budget' must be an integer >= 0 (-1: no budget)", "thinking_token_budget")
        if limit >= 0 and (budget is None or limit < budget):
            budget, param = limit, "thinking_token_budget"
    if body.get("add_generation_prompt") is not None and not _flag(body, "add_generation_prompt"):
        kwargs["add_generation_prompt"] = False  # vLLM's: the prompt ends after the last message, no reply opened
    if _flag(body, "continue_final_message"):  # vLLM's: the reply continues the last (assistant) message
        if body.get("add_generation_prompt"):
            raise bad("'continue_final_message' continues the last message: 'add_generation_prompt' must be false",
                      "add_generation_prompt")
        kwargs.update(continue_final_message=True, add_generation_prompt=False)
    docs = body.get("documents")
    if docs is not None:  # retrieval documents, as the template reads them (transformers' `documents`)
        if not isinstance(docs, list) or not all(isinstance(d, dict) and all(isinstance(v, str) for v in d.values())
                                                 for d in docs):
            raise bad("'documents' must be a list of objects of strings, such as {'title': ..., 'text': ...}",
                      "documents")
    kwargs = {**kwargs, **(extra or {})}
    if docs is not None:
        kwargs["documents"] = docs
    return kwargs, budget, param


def _chat_logprobs(body: dict) -> int | None:
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise bad("'logprobs' must be a boolean in chat completions (use 'top_logprobs' for alternatives)", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise bad(f"'top_logprobs' must be an integer in [0, 20], got {top!r}", "top_logprobs")
        if not lp:
            raise bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    return (top or 0) if lp else None


def _completion_logprobs(body: dict) -> int | None:
    lp = body.get("logprobs")
    if lp is None:
        return None
    if isinstance(lp, bool):  # Fireworks accepts true/false too
        return 1 if lp else None
    if not isinstance(lp, int) or not 0 <= lp <= 20:  # OpenAI's bound is 5, vLLM's (and chat's) 20
        raise bad(f"'logprobs' must be an integer in [0, 20] in completions, got {lp!r}", "logprobs")
    return lp


def text_of(content: Any, where: str, param: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """Message content as text: a string, or a list of text parts (of the types `kinds`) joined; else a 400 that
    names `where` and `param`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of text parts", param)
    if not all(isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str) for p in content):
        raise bad(f"{where}: only text parts ({', '.join(kinds)}) are supported", param)
    return "".join(p["text"] for p in content)


def _content(m: dict, i: int, found: list | None, fetch: Callable[[str], Any], most: int) -> str | list[dict]:
    """A message's content as text; with `found` (a model that reads images) and image parts in it, as chat parts
    (`{"type": "text", "text"}` and `{"type": "image"}`), each image's pixels (`fetch(url)`) appended to `found`,
    at most `most` of them in all."""
    content, where = m.get("content"), f"messages[{i}].content"
    if content is None and m["role"] == "assistant":
        return ""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") in images.IMAGE_PARTS
                                                for p in content):
        return text_of(content, where, "messages")
    if found is None:
        raise bad(f"{where}: the served model reads text only; it takes no images", "messages")
    if m["role"] != "user":
        raise bad(f"{where}: images are for user messages", "messages")
    parts = []
    for k, p in enumerate(content):
        if isinstance(p, dict) and p.get("type") in images.IMAGE_PARTS:
            if len(found) >= most:
                raise bad(f"{where}[{k}]: more than {most} pictures in one request (--max-images)", "messages")
            try:
                found.append(fetch(images.url_of(p, f"{where}[{k}]")))
            except ValueError as e:
                raise bad(f"{where}[{k}]: {e}", "messages") from None
            parts.append({"type": "image"})
        else:
            parts.append({"type": "text", "text": text_of([p], f"{where}[{k}]", "messages")})
    return parts


def _as_template_reads(model: Model, messages: list[dict]) -> list[dict]:
    """A model that reads images: its messages in the form its chat template reads, every content as parts where
    it loops over them (`Tokenizer.content_parts`: LLaVA's), else as text with the image token's text at each
    image."""
    if model.vision is None:
        return messages
    if model.tokenizer.content_parts:
        return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str)
                else m for m in messages]
    mark = model.tokenizer.decode([model.vision.marks], skip_special_tokens=False)
    return [{**m, "content": "".join(p.get("text", mark) for p in m["content"])}
            if isinstance(m.get("content"), list) else m for m in messages]


def chat_text(model: Model, messages: Any, with_tools: Tools | None = None, kwargs: dict | None = None,
              found: list | None = None, fetch: Callable[[str], Any] | None = None,
              media: images.Media = images.NO_MEDIA) -> str:
    """The chat template applied to validated messages (and tools, and extra template arguments), with the
    generation prompt; their images' pixels appended to `found` where given (`_content`; `fetch(url)` reads a
    picture, by default as `media` allows)."""
    fetch = fetch or (lambda url: images.pixels(url, model.vision, media))
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}", "messages")
        one = {"role": "system" if role == "developer" else role,
               "content": _content(m, i, found, fetch, media.max_images)}
        if role == "assistant" and m.get("tool_calls") is not None:
            one["tool_calls"] = m["tool_calls"]
        if role == "assistant" and (said := _reasoning_of(m, i)) is not None:
            one["reasoning_content"] = said  # the template reads it under any of its names (`Tokenizer`)
        if isinstance(m.get("name"), str):
            one["name"] = m["name"]
        if role == "tool":
            one["tool_call_id"] = str(m.get("tool_call_id", ""))
        clean.append(one)
    clean, extra = tools.render(clean, with_tools, model.tokenizer)
    clean = _as_template_reads(model, clean)
    extra = {**(kwargs or {}), **extra}
    options = {"add_generation_prompt": True, **extra}
    try:
        return model.tokenizer.apply_chat_template(clean, tokenize=False, **options)
    except Exception as e:  # a template may reject an order of roles, want tool arguments as text, or refuse
        as_text = tools.string_arguments(clean)  # earlier thinking beside content and calls (gpt-oss's)
        for retry in (as_text, _unthought(clean), _unthought(as_text)):
            try:
                if retry is not None:
                    return model.tokenizer.apply_chat_template(retry, tokenize=False, **options)
            except Exception:
                pass
        raise bad(f"the chat template rejected these messages: {e}", "messages") from None


def _unthought(messages: list[dict] | None) -> list[dict] | None:
    """The messages without the earlier thinking of those that also hold content and tool calls (gpt-oss's template
    refuses all three in one message); None if none does."""
    if messages is None or not any(m.get("reasoning_content") and m.get("content") and m.get("tool_calls")
                                   for m in messages):
        return None
    return [{k: v for k, v in m.items() if k != "reasoning_content"} if m.get("content") and m.get("tool_calls")
            else m for m in messages]


def _reasoning_of(message: dict, i: int) -> str | None:
    """An assistant message's earlier thinking, sent back as vLLM's `reasoning`, DeepSeek's `reasoning_content` or
    gpt-oss's `thinking` (the first given): templates that interleave thinking with tool calls read it back."""
    for name in REASONING:
        said = message.get(name)
        if said is not None:
            if not isinstance(said, str):
                raise bad(f"messages[{i}].{name} must be a string", "messages")
            return said
    return None


def _tool_history(messages: list) -> None:
    """OpenAI's checks of a conversation's tool turns: each assistant call is `{"id", "function": {"name",
    "arguments": a string}}`, and a tool message answers a call made before it (by `tool_call_id` when given)."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue  # chat_text names it
        if m.get("role") == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise bad(f"messages[{i}].tool_calls must be a list of tool calls", "messages")
            for k, c in enumerate(calls):
                custom = isinstance(c, dict) and c.get("type") == "custom"
                fn = c.get("custom" if custom else "function") if isinstance(c, dict) else None
                if not (isinstance(fn, dict) and isinstance(c.get("id"), str) and isinstance(fn.get("name"), str)
                        and isinstance(fn.get("input" if custom else "arguments"), str)):
                    raise bad(f"messages[{i}].tool_calls[{k}] must be {{'id': str, 'type': 'function', 'function': "
                              "{'name': str, 'arguments': str}} or {'id': str, 'type': 'custom', 'custom': {'name': "
                              "str, 'input': str}}", "messages")
                called.add(c["id"])
        elif m.get("role") == "tool":
            answers = m.get("tool_call_id")
            if answers is not None and not isinstance(answers, str):
                raise bad(f"messages[{i}].tool_call_id must be a string", "messages")
            if answers is None and isinstance(m.get("name"), str):  # a named tool's output (Codex's goal)
                continue
            if not called or (answers is not None and answers not in called):
                raise bad(f"messages[{i}] has role 'tool' but answers no earlier assistant tool call"
                          + (f" with id {answers!r}" if answers is not None else ""), "messages")


def chat_ids(model: Model, messages: Any, truncate_len: int | None = None, with_tools: Tools | None = None,
             kwargs: dict | None = None, media: images.Media = images.NO_MEDIA) -> tuple[list[int], str, list]:
    """`(token ids, text, images)` of validated messages through the chat template (it writes the special tokens
    itself). A model that reads images gets their preprocessed pixels, in order, and each image token of the text
    repeated to the image's length, as transformers' processor writes it (`engine.images`); another, no images.
    Pictures by link are fetched as `media` allows (`server.images`).
    `truncate_len` (Fireworks' `prompt_truncate_len`): drop the fewest oldest non-system messages that bring the
    prompt to at most that many tokens (the last message always stays), found by bisection over how many; each
    picture is read once, however many renderings the bisection tries."""
    fetch = functools.cache(lambda url: images.pixels(url, model.vision, media))

    def render(drop: int, shortest: bool = False) -> tuple[list[int], str, list]:
        gone = set(droppable[:drop])
        kept = [m for i, m in enumerate(messages) if i not in gone] if drop else messages  # validated by the first
        found = [] if model.vision is not None else None
        text = chat_text(model, kept, with_tools, kwargs, found, fetch, media)
        if shortest:  # no fewer turns can follow: too long now is too long
            bounded(model, text, "messages")
        written = vision.sequence(model.vision, lambda t: model.tokenizer.decode([t], skip_special_tokens=False)) \
            if found is not None else None
        if written is not None:  # Gemma 3's processor writes each picture out in the text
            text = text.replace(*written)
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        if found is not None:
            try:
                ids = vision.expand(ids, model.vision, len(found))
            except ValueError as e:
                raise bad(f"the messages' text {e} (an image token typed in text counts)", "messages") from None
        return ids, text, found or []

    if isinstance(messages, list):
        _tool_history(messages)
    droppable: list[int] = []
    ids, text, found = render(0, shortest=truncate_len is None)
    if truncate_len is None or len(ids) <= truncate_len:
        return ids, text, found
    droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") not in ("system", "developer")]
    if not droppable:
        return ids, text, found
    # The fewest drops k in 1..n at which the prompt fits, or the template rejects what is left (dropping one turn
    # at a time stopped there too, with that 400): both only grow with k, so bisect, then render the answer.
    low, high, tried = 1, len(droppable), {}
    while low < high:
        mid = (low + high) // 2
        try:
            tried[mid] = render(mid)
            stop = len(tried[mid][0]) <= truncate_len
        except ApiError:
            stop = True
        if stop:
            high = mid
        else:
            low = mid + 1
    return tried.get(low) or render(low, shortest=low == len(droppable))


def completion_prompts(model: Model, prompt: Any, special: bool = True) -> list[tuple[list[int], str]]:
    """`(token ids, text)` of each prompt: a string, a list of strings, a list of token ids, or a list of those;
    text is tokenized with the tokenizer's special tokens (a BOS) when `special`."""
    def ids(p, where):
        if isinstance(p, str):
            return model.tokenizer.encode(bounded(model, p, "prompt"), add_special_tokens=special), p
        if is_ids(p):
            return in_vocab(model, p, where, "prompt"), model.tokenizer.decode(p, skip_special_tokens=False)
        raise bad(f"{where} must be a string or a list of token ids", "prompt")

    if prompt is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        if len(prompt) > 128:
            raise bad("at most 128 prompts per request", "prompt")
        return [ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    if isinstance(prompt, list) and not prompt:
        raise bad("'prompt' must not be empty", "prompt")
    return [ids(prompt, "'prompt'")]
