"""Frontend hooks (the process that accepts requests).

`validate_params` receives only the SamplingParams, yet checks such as enforce, vector
names or whether an expert is loaded need the server's config. The frontend's
`InputProcessor` knows it: while it processes a request, the parsed config is in force
(`request_options.validating_with`), and what the request resolved to comes back from
that one resolution: each admitted request's mode is noted for the per-mode metrics
(`metrics`), once per child of an `n > 1` request.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import ModuleType

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.request_options import validating_with
from vllm_safeinfer.server.metrics import note_mode

logger = logging.getLogger(__name__)

def install() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_safeinfer_hooked", False):
        return
    original_init = InputProcessor.__init__

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        original_init(self, vllm_config, *args, **kwargs)
        self._safeinfer_config = SafeInferConfig.from_additional_config(
            vllm_config.additional_config
        )

    original_process = InputProcessor.process_inputs

    def process_inputs(self, request_id, *args, **kwargs):
        config = getattr(self, "_safeinfer_config", None)
        with validating_with(config) as validation:
            request = original_process(self, request_id, *args, **kwargs)
        settings = validation.settings
        if config is not None and settings is not None:
            note_mode(request_id, Mode.AUTO if settings.gated else settings.mode,
                      max(1, request.sampling_params.n))
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs
    InputProcessor._safeinfer_hooked = True
    _refuse_beam_search()


BEAM_SEARCH_REFUSED = (
    "beam search is not supported with SafeInfer: vLLM ranks beams by the served model's "
    "raw logprobs, which ignore the steering and expert mixing"
)


def _refuse_beam_search() -> None:
    """Beam search ranks candidates by raw logprobs: with SafeInfer configured it would
    silently ignore the mixing, so it is refused. The two beam-search entrypoints belong
    to the frontend; they are patched when something imports them, so the engine core
    and the workers, which load this plugin too, never import them."""
    patch_on_import("vllm.entrypoints.generate.beam_search.offline", _refuse_offline)
    patch_on_import("vllm.entrypoints.generate.beam_search.online", _refuse_online)


def _refuse_offline(module: ModuleType) -> None:
    mixin = module.BeamSearchOfflineMixin
    original = mixin.beam_search

    def beam_search(self, *args, **kwargs):
        if SafeInferConfig.from_additional_config(self.llm_engine.vllm_config.additional_config):
            raise ValueError(BEAM_SEARCH_REFUSED)
        return original(self, *args, **kwargs)

    beam_search._safeinfer = True
    mixin.beam_search = beam_search


def _refuse_online(module: ModuleType) -> None:
    mixin = module.BeamSearchOnlineMixin
    original = mixin.beam_search

    async def beam_search(self, *args, **kwargs):
        if SafeInferConfig.from_additional_config(self.engine_client.vllm_config.additional_config):
            raise ValueError(BEAM_SEARCH_REFUSED)
        async for output in original(self, *args, **kwargs):
            yield output

    beam_search._safeinfer = True
    mixin.beam_search = beam_search


def patch_on_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run `patch` on module `name` now if it is imported, else right after its import.
    A module whose shape changed is left as it is (vLLM must keep importing) and named
    in `UNPATCHED`, which fails the start of an engine that configures SafeInfer."""
    module = sys.modules.get(name)
    if module is not None:
        _patch_or_record(module, patch)
    else:
        sys.meta_path.insert(0, _PatchAfterImport(name, patch))


UNPATCHED: list[str] = []


def _patch_or_record(module: ModuleType, patch: Callable[[ModuleType], None]) -> None:
    try:
        patch(module)
    except AttributeError as err:
        UNPATCHED.append(f"{module.__name__} ({err})")
        logger.warning("SafeInfer cannot guard %s on this vLLM: %s", module.__name__, err)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """A finder that steps aside for the real one, then patches what it loaded."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.patch = patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_patch(module: ModuleType) -> None:
                exec_module(module)
                _patch_or_record(module, self.patch)

            spec.loader.exec_module = exec_and_patch
        return spec
