"""Wiring inside a vLLM worker, run right after `Worker.load_model`: before memory
profiling, torch.compile and CUDA-graph capture, so all of them see the steering and the
expert."""
from __future__ import annotations

import logging

from vllm_safeinfer.common.compat import check_runner_internals
from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.startup import load_probe
from vllm_safeinfer.engine.expert import install_expert
from vllm_safeinfer.engine.expert_rows import ExpertRowPlanner
from vllm_safeinfer.engine.gating import install_probe
from vllm_safeinfer.engine.logits_processor import FQCN, SafeInferLogitsProcessor
from vllm_safeinfer.engine.shared_expert import forward_tokens
from vllm_safeinfer.engine.steering import install_steering

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
    query_start_loc = runner.query_start_loc.gpu
    probe = None
    if config.probe is not None:
        probe = load_probe(config, runner.model_config, state.vectors.layers)
        threshold = probe.threshold if config.probe_threshold is None else config.probe_threshold
        install_probe(model, state, probe, threshold, query_start_loc,
                      forward_tokens(worker.vllm_config.scheduler_config,
                                     config.expert_shares_weights))
    if state.vectors.layers:
        install_steering(model, state, query_start_loc)
    if config.has_expert:
        processor.expert = install_expert(
            model, worker.vllm_config, config,
            lambda layer_names: ExpertRowPlanner(runner, state, layer_names))
    logger.info(
        "SafeInfer installed: steered layers %s, vectors %s, expert %s, harm probe %s, "
        "default mode %s", list(state.vectors.layers), sorted(state.vectors.entries),
        config.expert_model, None if probe is None else (
            f"layers {list(probe.layers)} at {probe.position}"
            + (", answer monitor on" if probe.monitors else "")),
        config.mode.value,
    )
    for name, entry in sorted(state.vectors.entries.items()):
        logger.info(
            "SafeInfer vector %r: %s at layers %s, default gamma %g, relative dose "
            "gamma*|SV|/|h| %s", name, entry.describe()["steering"], list(entry.layers),
            entry.gamma,
            "unknown (the file records no residual norm)" if entry.dose is None
            else f"{entry.dose:.3g}",
        )


def gate_decisions(worker, request_ids: list[str]) -> dict[str, dict]:
    """`Worker.safeinfer_gate_decisions`: the harm probe's verdicts of `request_ids`."""
    processor = find_logits_processor(worker.model_runner)
    processor.collect_verdicts()
    return processor.gate_log.lookup(list(request_ids))


def report_metrics(worker) -> None:
    """`Worker.safeinfer_report_metrics`, asked by the API server before it answers a
    scrape of `/metrics`: add the device-side tallies and the verdicts taken since the
    last engine step (after a request's last step the engine may not step again)."""
    processor = find_logits_processor(worker.model_runner)
    processor.collect_verdicts()
    processor.changed_tokens.report()
