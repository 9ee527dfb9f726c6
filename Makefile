# Two commands on a fresh machine: `make serve` and `make test`. Both are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct
# The host's accelerator: an NVIDIA GPU (nvidia-smi lists one), a TPU VM (its /dev/accel* or /dev/vfio devices),
# else the CPU. ACCEL=cpu|cuda|tpu overrides; it picks the JAX build installed (pyproject's extras).
ACCEL ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo cuda; \
	elif ls /dev/accel0 /dev/vfio/0 >/dev/null 2>&1; then echo tpu; else echo cpu; fi)
comma := ,
# Python keeps each imported module's bytecode (__pycache__) for the next process: the suite starts dozens (workers,
# servers, scripts), and an environment that forbids it (PYTHONDONTWRITEBYTECODE, set on some CI hosts) would have
# each of them compile JAX, Flax and transformers from source again (~4 s of CPU each, 6.7 s -> 2.6 s for one import).
unexport PYTHONDONTWRITEBYTECODE
EXTRAS := test$(if $(filter cuda tpu,$(ACCEL)),$(comma)$(ACCEL))
STAMP := $(VENV)/.installed-$(ACCEL)

.PHONY: setup serve test test-optional bench bench-paging bench-serve bench-spec bench-beam bench-startup bench-flat bench-lora bench-embed bench-images bench-gpu bench-gpu-serve soak

# uv installs the packages: a fresh venv's in ~12 s where pip took ~45 (it downloads in parallel and links files
# from its cache: ~3 s the second time). Neither writes bytecode for the ~20k files up front; Python writes it for
# the modules a process imports, when it first imports them. uv reads no pip configuration: a host's own wheel
# folders (PIP_FIND_LINKS) are passed on.
UV := uv==0.13.9
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q $(UV)
	$(BIN)/uv pip install -q --python $(BIN)/python $(foreach d,$(PIP_FIND_LINKS),--find-links $(d)) \
		-e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed*
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/python -m models.loading.fetch $(MODEL)

serve: setup
	$(BIN)/sparkler serve --model $(MODEL) $(ARGS)

# On the CPU the test files run on two worker processes (pytest-xdist; a file's tests stay on one worker): XLA
# compiles on about one and a half cores, so two compilations at once finish sooner. On a GPU or TPU host they run in
# one process, which owns the accelerator. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(if $(filter cpu,$(ACCEL)),2,0)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-optional: setup
	$(BIN)/python -m pytest -q -m optional tests

bench: setup
	$(BIN)/python bench/bench.py

bench-paging: setup
	$(BIN)/python bench/paging.py

# Sparkler's server beside llama.cpp's llama-server (built once by ../shared/peers/llama-server.sh), over HTTP.
bench-serve: setup
	$(BIN)/python bench/serve.py $(ARGS)

# Speculative decoding: each workload with and without drafts (a prediction, n-gram lookup), over HTTP.
bench-spec: setup
	$(BIN)/python bench/speculative.py $(ARGS)

# Beam search beside transformers' generate(num_beams=...) on the same weights.
bench-beam: setup
	$(BIN)/python bench/beam.py $(ARGS)

# Ready times (cold: an empty cache; warm) and rates of the default path beside --quantization none, over HTTP.
bench-startup: setup
	$(BIN)/python bench/startup.py $(ARGS)

# The flat step (prompts, chunks and the streams' next tokens in one forward pass) against separate calls.
bench-flat: setup
	$(BIN)/python bench/flat.py $(ARGS)

# What LoRA slots cost: the engine alone without them, with them unused, and with every request on an adapter.
bench-lora: setup
	$(BIN)/python bench/lora.py $(ARGS)

# /v1/embeddings beside llama.cpp's llama-server --embeddings on the same GGUF: rates, and how far the vectors agree.
bench-embed: setup
	$(BIN)/python bench/embed.py $(ARGS)

# A picture's preprocessing and vision tower (LLaVA 1.5's shape) beside transformers' on the same weights.
bench-images: setup
	$(BIN)/python bench/images.py $(ARGS)

# On a GPU host, with the host's own JAX, Flax and PyTorch (no venv, no network): see bench/gpu.py.
bench-gpu:
	PYTHONPATH=. $(PY) bench/gpu.py $(ARGS)

# Serving on a GPU host through HTTP (issue 21); write the tokenizer files first where the packaged GGUF is
# (`python bench/gpu_serve.py --write-tokenizer .gpu_tok`) and carry them: see bench/gpu_serve.py.
bench-gpu-serve:
	PYTHONPATH=. $(PY) bench/gpu_serve.py --tokenizer .gpu_tok $(ARGS)

soak: setup
	$(BIN)/python bench/soak.py --clients 128 --seconds 600
