"""The `vllm.general_plugins` entry point. vLLM calls `register()` in every process it
starts (frontend, engine core, each worker, Ray actors included); it must be idempotent,
cheap, and touch no GPU. It only installs hooks; each hook does nothing unless
`additional_config["safeinfer"]` is present.
"""
from __future__ import annotations

import logging
import os

from vllm_safeinfer.common import contract
from vllm_safeinfer.common.config import IDENTITIES_KEY, SafeInferConfig

logger = logging.getLogger(__name__)

V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"

_registered = False


def is_registered() -> bool:
    """Whether `register()` ran in this process."""
    return _registered


def register() -> None:
    """Install the hooks. On a vLLM whose internals the plugin does not know, install
    nothing but a guard: vLLM keeps working for everyone who does not configure
    SafeInfer, and a start that configures it fails with the reason."""
    global _registered
    if _registered:
        return
    from vllm_safeinfer.common import compat
    from vllm_safeinfer.engine import prefix_cache
    from vllm_safeinfer.server import frontend

    try:
        compat.check_vllm_internals()
    except RuntimeError as err:
        logger.warning("%s vLLM runs without SafeInfer; configuring `safeinfer` fails the "
                       "start.", err)
        _guard_engine_config(err)
    else:
        _hook_engine_config()
        frontend.install()
        prefix_cache.install()
        _hook_worker()
    _registered = True


def _guard_engine_config(error: RuntimeError) -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = getattr(EngineArgs, "create_engine_config", None)
    if original is None:
        return

    def create_engine_config(self, *args, **kwargs):
        if SafeInferConfig.from_additional_config(self.additional_config) is not None:
            raise error
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


def with_processor(processors: list | None) -> list:
    """`processors` plus SafeInfer's logits processor, unless it is already named."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from vllm_safeinfer.engine.logits_processor import FQCN, SafeInferLogitsProcessor

    processors = list(processors or [])
    for entry in processors:
        cls = entry
        if isinstance(entry, str) and entry.startswith("vllm_safeinfer"):
            cls = resolve_obj_by_qualname(entry.replace(":", "."))
        if cls is SafeInferLogitsProcessor:
            return processors
    return [*processors, FQCN]


def _hook_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_safeinfer.common.compat import fit_fused_expert, supported_vllm_range

    original = EngineArgs.create_engine_config
    if getattr(original, "_safeinfer", False):
        return

    def create_engine_config(self, *args, **kwargs):
        from vllm_safeinfer.server.frontend import UNPATCHED

        config = SafeInferConfig.from_additional_config(self.additional_config)
        if config is not None and UNPATCHED:
            raise RuntimeError("SafeInfer cannot guard this vLLM's " + "; ".join(UNPATCHED)
                               + f". Supported vLLM: {supported_vllm_range()}.")
        if config is not None:
            self.logits_processors = with_processor(self.logits_processors)
            if os.environ.get(V2_RUNNER_ENV) != "0":
                # Read lazily by vLLM and inherited by the engine and worker processes.
                os.environ[V2_RUNNER_ENV] = "0"
                logger.warning(
                    "SafeInfer: using vLLM's V1 model runner (%s=0); Model Runner V2 "
                    "support is not verified yet", V2_RUNNER_ENV,
                )
        vllm_config = original(self, *args, **kwargs)
        if config is not None:
            from vllm_safeinfer.common.startup import check_startup

            # Every other process parses the config with each vector's identity.
            checked = check_startup(vllm_config, config)
            vllm_config.additional_config = {**vllm_config.additional_config,
                                             IDENTITIES_KEY: dict(checked.vector_sha256)}
            fit_fused_expert(vllm_config, config.expert_shares_weights)
        return vllm_config

    create_engine_config._safeinfer = True
    EngineArgs.create_engine_config = create_engine_config


def _hook_worker() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.load_model
    if getattr(original, "_safeinfer", False):
        return

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        config = SafeInferConfig.from_additional_config(self.vllm_config.additional_config)
        if config is not None:
            from vllm_safeinfer.engine.worker import install_into_worker

            install_into_worker(self, config)

    load_model._safeinfer = True
    Worker.load_model = load_model

    def stage_vector(self, name: str, where: str, data: bytes, sha256: str) -> None:
        from vllm_safeinfer.engine.publishing import stage_vector
        from vllm_safeinfer.engine.worker import find_logits_processor

        stage_vector(find_logits_processor(self.model_runner), name, where, data, sha256)

    def take_back_vector(self, sha256: str) -> None:
        from vllm_safeinfer.engine.publishing import take_back_vector
        from vllm_safeinfer.engine.worker import find_logits_processor

        take_back_vector(find_logits_processor(self.model_runner), sha256)

    def gate_decisions(self, request_ids: list[str]) -> dict[str, dict]:
        from vllm_safeinfer.engine.worker import gate_decisions

        return gate_decisions(self, request_ids)

    def report_metrics(self) -> None:
        from vllm_safeinfer.engine.worker import report_metrics

        report_metrics(self)

    for name, method in ((contract.STAGE_VECTOR, stage_vector),
                         (contract.TAKE_BACK_VECTOR, take_back_vector),
                         (contract.GATE_DECISIONS, gate_decisions),
                         (contract.REPORT_METRICS, report_metrics)):
        setattr(Worker, name, method)
