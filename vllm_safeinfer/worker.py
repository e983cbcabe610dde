"""Wiring inside a vLLM worker, run right after `Worker.load_model`: before memory
profiling, torch.compile and CUDA-graph capture, so all of them see the steering and the
expert."""
from __future__ import annotations

import logging

from vllm_safeinfer.compat import check_runner_internals
from vllm_safeinfer.config import SafeInferConfig
from vllm_safeinfer.expert import install_expert
from vllm_safeinfer.logits_processor import FQCN, SafeInferLogitsProcessor
from vllm_safeinfer.steering import install_steering

logger = logging.getLogger(__name__)


def find_logits_processor(runner) -> SafeInferLogitsProcessor:
    input_batch = getattr(runner, "input_batch", None)
    processors = getattr(getattr(input_batch, "logitsprocs", None), "all", ())
    for processor in processors:
        if isinstance(processor, SafeInferLogitsProcessor):
            return processor
    raise RuntimeError(
        f"SafeInfer is configured but its logits processor ({FQCN}) is not active in "
        f"{type(runner).__name__}: steering, validation and safety-guided decoding would be "
        "off. It needs vLLM's V1 model runner, a generative model and no speculative decoding."
    )


def install_into_worker(worker, config: SafeInferConfig) -> None:
    runner = worker.model_runner
    processor = find_logits_processor(runner)
    model = runner.get_model()
    check_runner_internals(runner, model)
    state = processor.state
    if state.vectors.layers:
        install_steering(model, state, runner.query_start_loc.gpu)
    if config.has_expert:
        processor.expert = install_expert(model, worker.vllm_config, config)
    logger.info(
        "SafeInfer installed: steered layers %s, vectors %s, expert %s, default mode %s",
        list(state.vectors.layers), sorted(state.vectors.entries), config.expert_model,
        config.mode.value,
    )
    for name, entry in sorted(state.vectors.entries.items()):
        logger.info(
            "SafeInfer vector %r: layer %d, default gamma %g, relative dose gamma*|SV|/|h| %s",
            name, entry.layer, entry.gamma,
            "unknown (the file records no residual norm)" if entry.dose is None
            else f"{entry.dose:.3g}",
        )


def publish_vector(worker, name: str, path: str, version: int) -> None:
    """`Worker.safeinfer_publish_vector`, reached through vLLM's `collective_rpc` when an
    operator publishes a vector: load it into this worker's table as a new version."""
    from vllm_safeinfer.vectors import SafetyVector

    processor = find_logits_processor(worker.model_runner)
    processor.state.publish(name, path, SafetyVector.load(path), version)
    processor.config = processor.config.with_vector(name, path)
