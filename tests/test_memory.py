"""The KV pool's default size (`engine.memory`): the share of an accelerator's memory, the bound kept for the
programs' working memory against XLA's own figure for compiled programs, and the CPU's fixed pool."""

import dataclasses

import jax
import pytest

from engine import RunnerConfig, memory
from engine.compile import PROGRAMS, compile_all
from engine.runner import Runner, plan_pages
from models import Model, ModelConfig, build, init_params
from models.sharding import make_mesh

_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=4096, hidden_size=128, intermediate_size=512,
              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
              tie_word_embeddings=False)
_GEMMA = dict(_LLAMA, architectures=["Gemma3ForCausalLM"], head_dim=16, sliding_window=64, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0)


def _model(hf: dict, backend: str) -> Model:
    cfg = ModelConfig.from_hf(hf)
    module = build(cfg, backend)
    return Model("tiny", cfg, module, init_params(module, 0), make_mesh(1), None, {}, (), "random")


def test_the_share_of_a_device_and_what_is_left_for_the_pool(monkeypatch):
    """A GPU's allocator limit is XLA_PYTHON_CLIENT_MEM_FRACTION's share of the card (JAX's 0.75 unless set): the
    utilization is taken of the card, never past the limit; a TPU's limit is the whole device. The pool is what
    is left after the weights and the reserve, times the devices it is spread over, and none left is an error that
    names the flags."""
    gib = 1 << 30
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert memory.usable_bytes(60 * gib, "gpu", 0.9) == 60 * gib  # 0.75 of an 80 GiB card: JAX's own limit
    assert memory.usable_bytes(60 * gib, "gpu", 0.5) == 40 * gib
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # as the server sets it
    assert memory.usable_bytes(72 * gib, "gpu", 0.9) == 72 * gib
    assert memory.usable_bytes(100 * gib, "tpu", 0.9) == 90 * gib
    fit = memory.fit(72 * gib, 15 * gib, 7 * gib, 2)
    assert fit.pool == 100 * gib and "100.0 GiB a data shard" in str(fit)
    with pytest.raises(ValueError, match="--gpu-memory-utilization or pass --kv-cache-gb"):
        memory.fit(20 * gib, 15 * gib, 7 * gib, 1)


def test_the_default_pool_from_the_devices_memory(caplog):
    """`memory.default_pool` from devices' memory figures (here given: a CPU reports none, and gets `CPU_GB`): the
    device with the least left sets the pool, less the runner's working-memory bound; with the `pallas-gpu` kernels
    (no reference attention) a model that leaves no room is an error; with the reference's bound over the model's
    whole context leaving none, the 4 GiB pool with a warning naming --max-model-len."""
    import logging

    gib = 1 << 30
    rc = RunnerConfig(max_num_seqs=4, max_model_len=256, kv_cache_gb=0.01, tune_kernels=False)
    kernel = _model(_LLAMA, "pallas-gpu")
    tokens, rows, reference = Runner(kernel, rc)._working(kernel, rc)
    assert reference is None
    layer = sum(x.nbytes for x in jax.tree.leaves(kernel.params)) // kernel.cfg.num_layers
    reserve = memory.working_bytes(kernel.cfg, tokens, rows, layer, None)
    stats = [{"bytes_limit": 10 * gib, "bytes_in_use": 2 * gib}, {"bytes_limit": 10 * gib, "bytes_in_use": 3 * gib}]
    fit = memory.default_pool(kernel, tokens, rows, None, 0.9, stats)  # a CPU model: 0.9 of the limit, as a TPU's
    assert (fit.usable, fit.in_use, fit.reserve) == (9 * gib, 3 * gib, reserve)
    assert fit.pool % memory.GRAIN == 0 and 0 <= 6 * gib - reserve - fit.pool < memory.GRAIN  # whole grains
    assert memory.default_pool(kernel, tokens, rows, None, 0.9) is None  # this CPU's devices report nothing
    assert memory.default_pool(kernel, tokens, rows, None, 0.9, [None]) is None
    with pytest.raises(ValueError, match="no memory left"):
        memory.default_pool(kernel, tokens, rows, None, 0.9, [{"bytes_limit": 4 * gib, "bytes_in_use": 4 * gib}])
    long = _model({**_LLAMA, "max_position_embeddings": 1 << 20}, "xla")  # a million tokens through the reference
    rc = RunnerConfig(max_num_seqs=4, kv_cache_gb=0.01)
    args = Runner(long, dataclasses.replace(rc, max_model_len=256))._working(long, rc)  # the model's whole context
    assert args[2][2] > 1 << 20
    with caplog.at_level(logging.WARNING, logger="sparkler.engine"):
        assert memory.default_pool(long, *args, 0.9, stats) is None
    assert "--max-model-len" in caplog.text


def test_a_cpu_pool_is_four_gib_unless_sized(monkeypatch):
    """`kv_cache_gb` 0 on a CPU: the fixed pool (host memory is everyone's), no fit; a size given is taken. The
    fixed size is patched small here: a 4 GiB pool, zero-filled, would stay in the test process's memory."""
    assert memory.CPU_GB == 4.0
    monkeypatch.setattr(memory, "CPU_GB", 0.02)
    model = _model(_LLAMA, "xla")
    runner = Runner(model, RunnerConfig(max_num_seqs=4, max_model_len=256))
    assert runner.fit is None and runner.rc.kv_cache_gb == 0.02
    assert runner.num_pages == plan_pages(model, dataclasses.replace(runner.rc, kv_cache_gb=0.02))
    assert Runner(model, RunnerConfig(max_num_seqs=4, max_model_len=256, kv_cache_gb=0.01)).rc.kv_cache_gb == 0.01


def test_the_flat_step_by_default_only_where_the_ragged_kernel_attends():
    """Asked for the `pallas-gpu` backend, plain attention gets it and the flat step by default; a model with a
    window or soft-capping attends through `xla` instead (`resolve_backend`: `paged.flat_reference` would gather
    every token's pages), so it keeps separate prefill and decode calls unless asked."""
    rc = RunnerConfig(max_num_seqs=4, max_model_len=256, kv_cache_gb=0.01, tune_kernels=False)
    assert Runner(_model(_LLAMA, "pallas-gpu"), rc).flat
    gemma = _model(_GEMMA, "pallas-gpu")
    assert not gemma.cfg.plain_attention and gemma.module.backend == "xla" and not Runner(gemma, rc).flat
    assert Runner(gemma, dataclasses.replace(rc, flat_step=True)).flat


@pytest.mark.quick_compile
@pytest.mark.parametrize("flat", [False, True])
def test_the_working_memory_bound_holds_for_the_compiled_programs(flat):
    """XLA's own figure for every program the full warm-up compiles (`memory_analysis`, the most in
    `PROGRAMS["working"]`) stays under `memory.working_bytes` for the runner's steps, with attention through the
    reference (the `xla` backend; separate calls, or the flat step's per-token gathers). On this CPU's compiler: a
    proxy for an accelerator's, whose server warns where a program passes the bound. Without the reference's
    scores and gathers the bound falls under the prefills' figure (checked). Compiled with XLA's optimizations mostly
    off (`quick_compile`): the HLO passes that decide the buffers still run, and the figure was the same byte for
    byte as with them (15,480,536), in a third of the time."""
    model = _model(_LLAMA, "xla")
    rc = RunnerConfig(max_num_seqs=8, max_model_len=128, kv_cache_gb=0.01, flat_step=flat, decode_batch_sizes=(8,),
                      max_prefill_tokens=128)
    runner = Runner(model, rc)
    PROGRAMS["working"] = 0
    compile_all(runner.warm_jobs(full=True))
    layer = sum(x.nbytes for x in jax.tree.leaves(model.params)) // model.cfg.num_layers
    tokens, rows, reference = runner._working(model, rc)
    assert reference is not None
    bound = memory.working_bytes(model.cfg, tokens, rows, layer, reference)
    assert 0 < PROGRAMS["working"] <= bound
    if not flat:
        assert memory.working_bytes(model.cfg, tokens, rows, layer, None) < PROGRAMS["working"]
