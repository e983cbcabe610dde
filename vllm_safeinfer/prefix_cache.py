"""Prefix caching that stays correct under steering (engine-core side).

Steering changes the KV cache from a request's last prompt token on (every later layer
and token sees the added vector). So a full block that contains a steered position may
only be reused by a request steered the same way with the same prompt boundary, while
blocks before that position hold plain KV and stay shareable with everyone (a shared
system prompt keeps its cache hits). vLLM chains block hashes, so adding a key to the
first steered block separates every block after it too.

The engine core decides each request's steering identity itself, from the request's own
options and its own config, as the request arrives (`EngineCore.preprocess_add_request`,
before vLLM hashes the prompt's blocks): a request handed to the engine without the
frontend's validation, or carrying a forged identity, still gets the right one. The key
joins the block hash through a helper that `generate_block_hash_extra_keys` looks up in
its own module on every call, so every caller of it sees the key, wherever it was
imported (the block pool, the KV offloading manager).
"""
from __future__ import annotations

import logging

from vllm_safeinfer.config import SafeInferConfig
from vllm_safeinfer.request_options import resolve_or_defaults

logger = logging.getLogger(__name__)

KV_KEY_ARG = "_safeinfer_kv"
VERSION_ARG = "_safeinfer_vector_version"
STAMPS = (KV_KEY_ARG, VERSION_ARG)


def steering_block_key(request, end_token_idx: int) -> tuple | None:
    """Extra hash key for the block ending at `end_token_idx` (exclusive), or None."""
    params = request.sampling_params
    key = (params.extra_args or {}).get(KV_KEY_ARG) if params is not None else None
    if key is None:
        return None
    boundary = request.num_prompt_tokens - 1  # the first steered position
    if end_token_idx <= boundary:
        return None
    return ("safeinfer", key, boundary)


def stamp_steering_identity(request, config: SafeInferConfig | None,
                            versions: dict[str, int]) -> None:
    """Write the engine core's own steering identity (and the version of the vector it
    steers with, which the worker reads) into an `EngineCoreRequest`'s `extra_args`,
    replacing whatever the request carried under those keys."""
    params = request.sampling_params
    if params is None:
        return
    extra_args = {k: v for k, v in (params.extra_args or {}).items() if k not in STAMPS}
    if config is not None:
        settings, error = resolve_or_defaults(extra_args, config)
        if error is not None:
            logger.warning("SafeInfer: request %s reached the engine with options that do not "
                           "resolve (%s); it runs with the server's defaults",
                           request.request_id, error)
        if settings.mode.steers:
            version = versions.get(settings.vector, 0)
            extra_args[KV_KEY_ARG] = settings.kv_key(version)
            extra_args[VERSION_ARG] = version
    params.extra_args = extra_args or None


def install() -> None:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.core import EngineCore

    original_keys = kv_cache_utils._gen_prompt_embeds_extra_hash_keys
    if getattr(original_keys, "_safeinfer", False):
        return

    def _gen_prompt_embeds_extra_hash_keys(request, start_token_idx, end_token_idx):
        keys = original_keys(request, start_token_idx, end_token_idx)
        extra = steering_block_key(request, end_token_idx)
        return keys if extra is None else [*keys, extra]

    original_preprocess = EngineCore.preprocess_add_request

    def safeinfer_state(self) -> tuple[SafeInferConfig | None, dict[str, int]]:
        if not hasattr(self, "_safeinfer_config"):
            self._safeinfer_config = SafeInferConfig.from_additional_config(
                self.vllm_config.additional_config)
            self._safeinfer_versions = {}
        return self._safeinfer_config, self._safeinfer_versions

    def preprocess_add_request(self, request):
        stamp_steering_identity(request, *safeinfer_state(self))
        return original_preprocess(self, request)

    def safeinfer_publish_vector(self, name: str, path: str, version: int) -> None:
        """Utility call from the frontend, after every worker loaded the version: from
        now on requests naming `name` steer with (and are keyed by) `version`."""
        config, versions = safeinfer_state(self)
        self._safeinfer_config = config.with_vector(name, path)
        versions[name] = version

    _gen_prompt_embeds_extra_hash_keys._safeinfer = True
    kv_cache_utils._gen_prompt_embeds_extra_hash_keys = _gen_prompt_embeds_extra_hash_keys
    EngineCore.preprocess_add_request = preprocess_add_request
    EngineCore.safeinfer_publish_vector = safeinfer_publish_vector
