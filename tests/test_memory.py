"""The KV pool's default size (`engine.memory`): the share of an accelerator's memory, the bound kept for the
programs' working memory against XLA's own figure for compiled programs, and the CPU's fixed pool."""

import pytest

import jax

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


def test_a_cpu_pool_is_four_gib_unless_sized():
    """`kv_cache_gb` 0 on a CPU: the fixed pool (host memory is everyone's), no fit; a size given is taken."""
    model = _model(_LLAMA, "xla")
    runner = Runner(model, RunnerConfig(max_num_seqs=4, max_model_len=256))
    assert runner.fit is None and runner.rc.kv_cache_gb == memory.CPU_GB
    assert runner.num_pages == plan_pages(model, runner.rc)
    assert Runner(model, RunnerConfig(max_num_seqs=4, max_model_len=256, kv_cache_gb=0.01)).rc.kv_cache_gb == 0.01


def test_the_flat_step_by_default_only_where_the_ragged_kernel_attends():
    """With the `pallas-gpu` backend the flat step is the default for plain attention; a model with a window or
    soft-capping would attend through `paged.flat_reference` (every token's pages gathered), so it keeps separate
    prefill and decode calls unless asked."""
    rc = RunnerConfig(max_num_seqs=4, max_model_len=256, kv_cache_gb=0.01, tune_kernels=False)
    assert Runner(_model(_LLAMA, "pallas-gpu"), rc).flat
    gemma = _model(_GEMMA, "pallas-gpu")
    assert not gemma.cfg.plain_attention and not Runner(gemma, rc).flat
    assert Runner(gemma, RunnerConfig(**{**rc.__dict__, "flat_step": True})).flat


@pytest.mark.parametrize("flat", [False, True])
def test_the_working_memory_bound_holds_for_the_compiled_programs(flat):
    """XLA's own figure for every program the full warm-up compiles (`memory_analysis`, the most in
    `PROGRAMS["working"]`) stays under `memory.working_bytes` for the runner's steps, with attention through the
    reference (the `xla` backend; separate calls, or the flat step's per-token gathers). On this CPU's compiler: a
    proxy for an accelerator's, whose server warns where a program passes the bound. Without the reference's
    scores and gathers the bound falls under the prefills' figure (checked)."""
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
