"""Prefix caching that stays correct under steering (engine-core side).

Steering changes the KV cache from a request's last prompt token on (every later layer
and token sees the added vector). So a full block that contains a steered position may
only be reused by a request steered the same way with the same prompt boundary, while
blocks before that position hold plain KV and stay shareable with everyone (a shared
system prompt keeps its cache hits). vLLM chains block hashes, so adding a key to the
first steered block separates every block after it too.
"""
from __future__ import annotations

from vllm_safeinfer.frontend import KV_KEY_ARG


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


def install() -> None:
    from vllm.v1.core import block_pool, kv_cache_utils

    original = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(original, "_safeinfer", False):
        return

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        extra = steering_block_key(request, end_token_idx)
        if extra is not None:
            keys = (*(keys or ()), extra)
        return keys, next_mm_idx

    generate_block_hash_extra_keys._safeinfer = True
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    block_pool.generate_block_hash_extra_keys = generate_block_hash_extra_keys
