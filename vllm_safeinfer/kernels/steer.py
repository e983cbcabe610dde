"""Per-request residual steering (SafeInfer's safety amplification), fused.

For every live token t (t < query_start_loc[R]) of batch row r (the row whose
query range holds t) with state slot s (r, or slot_mapping[r] under vLLM's
Model Runner V2), when the token is the last prompt token or a generated one, within
the row's steered window (prompt_len[s] - 1 <= positions[t] < prompt_len[s] - 1 +
steer_tokens[s]) and scale[s] != 0:

    hidden[t] += scale[s] * vectors[vector_id[s]]      (fp32 accumulate, one rounding)

in place. Everything is read from device tensors (no host sync, no data-dependent
shapes) so the op can be captured in CUDA graphs and stays opaque to torch.compile.
CUDA-graph padding tokens and rows with scale 0 are left bit-for-bit untouched.
"""
import torch
import triton
import triton.language as tl

from vllm_safeinfer.kernels.ops import mutating_op

# Widest hidden slice one program touches per loop step; larger rows loop.
_MAX_BLOCK_H = 2048


def token_rows(query_start_loc: torch.Tensor, num_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token indices, each token's batch row): the row whose query range holds it, by
    binary search over `query_start_loc` (padding tokens past the last row get it)."""
    tokens = torch.arange(num_tokens, device=query_start_loc.device,
                          dtype=query_start_loc.dtype)
    rows = torch.searchsorted(query_start_loc[1:], tokens, right=True)
    return tokens, rows.clamp_(max=query_start_loc.numel() - 2)


def steered_tokens(num_tokens: int, positions: torch.Tensor, query_start_loc: torch.Tensor,
                   strength: torch.Tensor, prompt_len: torch.Tensor,
                   steer_tokens: torch.Tensor, slot_mapping: torch.Tensor | None
                   ) -> tuple[torch.Tensor, ...]:
    """(each token's fp32 strength, its state slot, whether it is steered): a live token
    of a row with a non-zero strength, in the row's window from its last prompt token."""
    tokens, rows = token_rows(query_start_loc, num_tokens)
    slots = rows if slot_mapping is None else slot_mapping[rows].long()
    coef = strength[slots].float()
    start = prompt_len[slots] - 1
    gate = ((tokens < query_start_loc[-1]) & (positions >= start)
            & (positions < start + steer_tokens[slots]) & (coef != 0))
    return coef, slots, gate


def steer_reference(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: torch.Tensor,
    vector_id: torch.Tensor,
    prompt_len: torch.Tensor,
    steer_tokens: torch.Tensor,
    vectors: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Pure-torch steering, in place: the kernel's oracle and the CPU serving path."""
    if hidden.shape[0] == 0 or query_start_loc.numel() < 2:
        return
    coef, rows, gate = steered_tokens(hidden.shape[0], positions, query_start_loc, scale,
                                      prompt_len, steer_tokens, slot_mapping)
    steered = hidden.float() + coef[:, None] * vectors[vector_id[rows]].float()
    # `where`, not `add_`: ungated rows must keep their exact bits (-0.0, no 0 * inf).
    hidden.copy_(torch.where(gate[:, None], steered.to(hidden.dtype), hidden))


@triton.jit
def token_slot(token, query_start_loc_ptr, slot_mapping_ptr, num_rows,
               SEARCH_STEPS: tl.constexpr, HAS_SLOT_MAPPING: tl.constexpr):
    """The state slot of a live token's row: the upper bound over query_start_loc[1:]
    (first row r with qsl[r + 1] > token), through slot_mapping under Model Runner V2."""
    lo = 0
    hi = num_rows
    for _ in tl.static_range(SEARCH_STEPS):
        searching = lo < hi
        mid = (lo + hi) // 2
        row_end = tl.load(query_start_loc_ptr + 1 + mid, mask=searching, other=0)
        go_right = searching & (row_end <= token)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(searching & ~go_right, mid, hi)
    row = tl.minimum(lo, num_rows - 1)
    if HAS_SLOT_MAPPING:
        return tl.load(slot_mapping_ptr + row).to(tl.int64)
    return row.to(tl.int64)


@triton.jit
def steered_slot(token, positions_ptr, query_start_loc_ptr, slot_mapping_ptr, strength_ptr,
                 prompt_len_ptr, steer_tokens_ptr, num_rows, SEARCH_STEPS: tl.constexpr,
                 HAS_SLOT_MAPPING: tl.constexpr):
    """(state slot, fp32 strength, whether it is steered) of a live token: its row's
    strength is non-zero and its position in the row's window from the last prompt
    token (`steered_tokens`, one token)."""
    slot = token_slot(token, query_start_loc_ptr, slot_mapping_ptr, num_rows,
                      SEARCH_STEPS, HAS_SLOT_MAPPING)
    strength = tl.load(strength_ptr + slot).to(tl.float32)
    position = tl.load(positions_ptr + token)
    first = tl.load(prompt_len_ptr + slot) - 1
    in_window = (position >= first) & (position < first + tl.load(steer_tokens_ptr + slot))
    return slot, strength, in_window & (strength != 0.0)


# An int argument equal to 1 would be compiled as a constant; R = 1 keeps the same code.
@triton.jit(do_not_specialize=["num_rows"])
def _steer_kernel(
    hidden_ptr,
    hidden_stride,
    positions_ptr,
    query_start_loc_ptr,
    slot_mapping_ptr,
    scale_ptr,
    vector_id_ptr,
    prompt_len_ptr,
    steer_tokens_ptr,
    vectors_ptr,
    vectors_stride,
    num_rows,
    hidden_size,
    SEARCH_STEPS: tl.constexpr,
    HAS_SLOT_MAPPING: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    if token < tl.load(query_start_loc_ptr + num_rows):
        slot, coef, steered = steered_slot(
            token, positions_ptr, query_start_loc_ptr, slot_mapping_ptr, scale_ptr,
            prompt_len_ptr, steer_tokens_ptr, num_rows, SEARCH_STEPS, HAS_SLOT_MAPPING)
        if steered:
            vector = vectors_ptr + tl.load(vector_id_ptr + slot).to(tl.int64) * vectors_stride
            row_ptr = hidden_ptr + token.to(tl.int64) * hidden_stride
            for start in range(0, hidden_size, BLOCK_H):
                cols = start + tl.arange(0, BLOCK_H)
                mask = cols < hidden_size
                h = tl.load(row_ptr + cols, mask=mask)
                v = tl.load(vector + cols, mask=mask).to(tl.float32)
                tl.store(row_ptr + cols, (h.to(tl.float32) + coef * v).to(h.dtype), mask=mask)


def steer_triton(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: torch.Tensor,
    vector_id: torch.Tensor,
    prompt_len: torch.Tensor,
    steer_tokens: torch.Tensor,
    vectors: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Launch the fused kernel (one program per token), in place.

    Fixed launch configuration and no autotuning or host reads, so it is CUDA-graph
    capturable; it recompiles only when the bit length of R changes (search depth).
    """
    num_tokens, hidden_size = hidden.shape
    num_rows = query_start_loc.numel() - 1
    if num_tokens == 0 or num_rows == 0:
        return
    if hidden.stride(1) != 1 or vectors.stride(1) != 1:
        raise ValueError("steer_triton needs hidden and vectors contiguous along the hidden dim")
    _steer_kernel[(num_tokens,)](
        hidden,
        hidden.stride(0),
        positions,
        query_start_loc,
        slot_mapping,
        scale,
        vector_id,
        prompt_len,
        steer_tokens,
        vectors,
        vectors.stride(0),
        num_rows,
        hidden_size,
        SEARCH_STEPS=num_rows.bit_length(),
        HAS_SLOT_MAPPING=slot_mapping is not None,
        BLOCK_H=min(triton.next_power_of_2(hidden_size), _MAX_BLOCK_H),
        num_warps=4,
    )


# No argument may be called `mode`: it collides with inductor's redirect_to_mode.
@mutating_op("steer_", ("hidden",))
def steer_(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: torch.Tensor,
    vector_id: torch.Tensor,
    prompt_len: torch.Tensor,
    steer_tokens: torch.Tensor,
    vectors: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Steer `hidden` in place; an opaque op so compiled graphs keep it as one call."""
    if hidden.device.type in ("cuda", "xpu"):
        steer_triton(hidden, positions, query_start_loc, scale, vector_id, prompt_len,
                     steer_tokens, vectors, slot_mapping)
    elif bool(scale.any()):  # on CPU the check is free and spares the [T, H] pass
        steer_reference(hidden, positions, query_start_loc, scale, vector_id, prompt_len,
                        steer_tokens, vectors, slot_mapping)
