"""Prefix caching that stays correct under steering, gating and a partly-run expert
(engine-core side).

Steering changes the KV cache from a request's last prompt token on (every later layer
and token sees the added vector). So a full block that contains a steered position may
only be reused by a request steered the same way with the same prompt boundary, while
blocks before that position hold plain KV and stay shareable with everyone (a shared
system prompt keeps its cache hits). vLLM chains block hashes, so adding a key to the
first steered block separates every block after it too. A gated request (mode `auto`)
is keyed the same way, with its probe in the key: its KV from the last prompt token on
depends on the probe's verdict, which depends on the prompt alone, so requests that
share such a block share the verdict.

A gated request's verdict sums the probe's scores over a window of its prompt (the
user's content, or one token), and the answer monitor over its generated tokens: the
worker computes those only for tokens it runs. So a gated request reads the prefix cache
only up to the block holding the start of its read window: a shared system prompt keeps
its hits, and a request resumed after preemption recomputes its window and its answer,
and reaches the same decisions.

The unsafe expert writes its KV only for rows that mix (`expert_rows.py`), so every block
of a mixing request carries one more key: mixing requests share blocks among
themselves (all hold the expert's KV) and never with `off` or `sa` requests (whose
blocks lack it).

The engine core resolves each request's options itself, from the request's own options
and its own config, as the request arrives (`EngineCore.preprocess_add_request`, before
vLLM hashes the prompt's blocks), and stamps the result (`common/contract.Stamp`): the
workers build their rows from that stamp alone. A request handed to the engine without
the frontend's validation, or carrying a forged stamp, still gets the right one. The
engine core reads no vector file: each vector's identity comes in the config, from the
API server's one read (`common/vector_files`). The key
joins the block hash through a helper that `generate_block_hash_extra_keys` looks up in
its own module on every call, so every caller of it sees the key, wherever it was
imported (the block pool, the KV offloading manager).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.contract import PUBLISH_VECTOR, STAMP_ARG, Stamp
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.request_options import resolve_or_defaults

logger = logging.getLogger(__name__)

EXPERT_KEY = ("safeinfer", "expert-kv")


def _stamp(request) -> Stamp | None:
    params = request.sampling_params
    return None if params is None else Stamp.of(params.extra_args)


def steering_block_key(request, end_token_idx: int) -> list[tuple]:
    """Extra hash keys for the block ending at `end_token_idx` (exclusive)."""
    stamp = _stamp(request)
    if stamp is None:
        return []
    keys = [EXPERT_KEY] if stamp.writes_expert_kv else []
    boundary = request.num_prompt_tokens - 1  # the first steered or gated position
    if stamp.kv_key is not None and end_token_idx > boundary:
        keys.append(("safeinfer", stamp.kv_key, boundary))
    return keys


def cacheable_tokens(request) -> int | None:
    """How many leading tokens a gated request may read from the prefix cache (the start
    of its probe's read window); None for any other request."""
    stamp = _stamp(request)
    return None if stamp is None or stamp.read_window is None else stamp.read_window[0]


class EngineCoreState:
    """What the engine core knows to stamp requests: the config, the content identity
    (sha256) each vector name means now (from the config: the API server's read), the
    harm probe and its identity."""

    def __init__(self, config: SafeInferConfig | None) -> None:
        self.config = config
        if config is not None:
            missing = sorted(set(config.vectors) - set(config.vector_sha256))
            if missing:
                raise ValueError(f"SafeInfer: vectors {missing} reached the engine core "
                                 "without the identity the API server read them with; start "
                                 "the engine through vLLM's EngineArgs with the plugin loaded")
        self.probe = None
        if config is not None and config.probe is not None:
            from vllm_safeinfer.common.probe import HarmProbe

            self.probe = HarmProbe.load(config.probe)
        self.gate = gate_identity(config, self.probe)

    def publish(self, name: str, where: str, sha256: str) -> None:
        """From now on requests naming `name` steer with (and are keyed by) `sha256`."""
        if self.config is None:
            raise ValueError("SafeInfer is not configured on this engine")
        self.config = self.config.with_vector(name, where, sha256)

    @property
    def vectors(self) -> Mapping[str, str]:
        """The identity (sha256) each vector name means now: the config's."""
        return {} if self.config is None else self.config.vector_sha256

    def stamp(self, request) -> None:
        """Resolve the request's options once, against this engine core's config, and
        write the result (`Stamp`: the mode, the vector's identity, the strengths, the
        cache key, a gated request's probe read window, the request's id) into the
        `EngineCoreRequest`'s `extra_args`, replacing whatever the request carried
        there."""
        params = request.sampling_params
        if params is None:
            return
        extra_args = {k: v for k, v in (params.extra_args or {}).items() if k != STAMP_ARG}
        config = self.config
        if config is not None:
            settings, error = resolve_or_defaults(extra_args, config)
            if error is not None:
                logger.warning("SafeInfer: request %s reached the engine with options that do "
                               "not resolve (%s); it runs with the server's defaults",
                               request.request_id, error)
            vector = self.vectors.get(settings.vector) if settings.mode.steers else None
            window = None
            if settings.gated and self.probe is not None and request.prompt_token_ids:
                window = tuple(self.probe.read_window(request.prompt_token_ids))
            extra_args[STAMP_ARG] = Stamp(
                request_id=getattr(request, "external_req_id", None) or request.request_id,
                mode=Mode.AUTO if settings.gated else settings.mode, runs=settings.mode,
                vector_sha256=vector, gamma=settings.gamma, lam=settings.lam,
                kv_key=settings.kv_key(vector, self.gate), read_window=window).to_args()
        params.extra_args = extra_args or None


def gate_identity(config: SafeInferConfig | None, probe) -> str:
    """What a gated request's cache identity names of the probe: its content and the
    threshold in force."""
    if config is None or probe is None:
        return ""
    threshold = probe.threshold if config.probe_threshold is None else config.probe_threshold
    return f"{probe.content_sha256()[:16]}@{threshold!r}"


def install() -> None:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.engine.core import EngineCore

    original_keys = kv_cache_utils._gen_prompt_embeds_extra_hash_keys
    if getattr(original_keys, "_safeinfer", False):
        return

    def _gen_prompt_embeds_extra_hash_keys(request, start_token_idx, end_token_idx):
        keys = original_keys(request, start_token_idx, end_token_idx)
        extra = steering_block_key(request, end_token_idx)
        return [*keys, *extra] if extra else keys

    original_preprocess = EngineCore.preprocess_add_request

    def safeinfer_state(self) -> EngineCoreState:
        if not hasattr(self, "_safeinfer_state"):
            self._safeinfer_state = EngineCoreState(SafeInferConfig.from_additional_config(
                self.vllm_config.additional_config))
        return self._safeinfer_state

    def preprocess_add_request(self, request):
        safeinfer_state(self).stamp(request)
        return original_preprocess(self, request)

    def publish_vector(self, name: str, where: str, sha256: str) -> None:
        """Utility call from the API server, after every worker staged the contents."""
        safeinfer_state(self).publish(name, where, sha256)

    original_computed = KVCacheManager.get_computed_blocks

    def get_computed_blocks(self, request):
        blocks, num_computed, boundary = original_computed(self, request)
        cap = cacheable_tokens(request)
        if cap is None or num_computed <= cap:
            return blocks, num_computed, boundary
        sizes = [manager.block_size for manager in self.coordinator.single_type_managers]
        kept = cap // max(sizes) * max(sizes)
        blocks = KVCacheBlocks(tuple(list(group[:kept // size])
                                     for group, size in zip(blocks.blocks, sizes)))
        return blocks, kept, boundary if boundary <= kept else 0

    _gen_prompt_embeds_extra_hash_keys._safeinfer = True
    KVCacheManager.get_computed_blocks = get_computed_blocks
    kv_cache_utils._gen_prompt_embeds_extra_hash_keys = _gen_prompt_embeds_extra_hash_keys
    EngineCore.preprocess_add_request = preprocess_add_request
    setattr(EngineCore, PUBLISH_VECTOR, publish_vector)
