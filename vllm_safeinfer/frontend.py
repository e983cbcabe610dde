"""Frontend hooks (the process that accepts requests).

`validate_params` receives only the SamplingParams, yet checks such as enforce, vector
names or whether an expert is loaded need the server's config. The frontend's
`InputProcessor` knows it: while it validates a request, the parsed config sits in a
context variable that `validate_params` reads. A context variable, not a global, so two
engines in one process (tests, a Ray actor) each validate against their own config.
"""
from __future__ import annotations

from contextvars import ContextVar

from vllm_safeinfer.config import SafeInferConfig

_validating: ContextVar[SafeInferConfig | None] = ContextVar("safeinfer_config", default=None)


def config_being_validated() -> SafeInferConfig | None:
    """The config of the InputProcessor validating the current request, if any."""
    return _validating.get()


def install() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_safeinfer_hooked", False):
        return
    original_init = InputProcessor.__init__
    original_validate = InputProcessor._validate_params

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        original_init(self, vllm_config, *args, **kwargs)
        self._safeinfer_config = SafeInferConfig.from_additional_config(
            vllm_config.additional_config
        )

    def _validate_params(self, params, supported_tasks):
        token = _validating.set(getattr(self, "_safeinfer_config", None))
        try:
            return original_validate(self, params, supported_tasks)
        finally:
            _validating.reset(token)

    InputProcessor.__init__ = __init__
    InputProcessor._validate_params = _validate_params
    InputProcessor._safeinfer_hooked = True
    _refuse_beam_search()


BEAM_SEARCH_REFUSED = (
    "beam search is not supported with SafeInfer: vLLM ranks beams by the served model's "
    "raw logprobs, which ignore the steering and expert mixing"
)


def _refuse_beam_search() -> None:
    """Beam search ranks candidates by raw logprobs: with SafeInfer configured it would
    silently ignore the mixing, so it is refused."""
    from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    offline, online = BeamSearchOfflineMixin.beam_search, BeamSearchOnlineMixin.beam_search

    def offline_beam_search(self, *args, **kwargs):
        if SafeInferConfig.from_additional_config(self.llm_engine.vllm_config.additional_config):
            raise ValueError(BEAM_SEARCH_REFUSED)
        return offline(self, *args, **kwargs)

    async def online_beam_search(self, *args, **kwargs):
        if SafeInferConfig.from_additional_config(self.engine_client.vllm_config.additional_config):
            raise ValueError(BEAM_SEARCH_REFUSED)
        async for output in online(self, *args, **kwargs):
            yield output

    BeamSearchOfflineMixin.beam_search = offline_beam_search
    BeamSearchOnlineMixin.beam_search = online_beam_search
