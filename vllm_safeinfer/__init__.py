"""SafeInfer (safety amplification + safety-guided decoding) served inside vLLM.

Installing the package enables the `vllm.general_plugins` entry point
`vllm_safeinfer.plugin:register`; `additional_config={"safeinfer": {...}}` switches it on.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package (CLI, models, data) must not import vLLM.
    if name == "SafeInferLogitsProcessor":
        from vllm_safeinfer.engine.logits_processor import SafeInferLogitsProcessor

        return SafeInferLogitsProcessor
    raise AttributeError(name)
