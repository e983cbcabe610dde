"""Per-request target-projection steering, fused: the residual's component along a unit
direction is set to a target value instead of being added to.

For every live token t of batch row r with state slot s (r, or slot_mapping[r] under
Model Runner V2), when the token is the last prompt token or a generated one, within
the row's steered window (prompt_len[s] - 1 <= positions[t] < prompt_len[s] - 1 +
steer_tokens[s]) and target[s] != 0:

    u = units[vector_id[s]]                          (unit length)
    x = hidden[t] + residual[t]                      (the residual stream; vLLM's decoder
                                                      layers return it in two parts)
    hidden[t] += (target[s] - x . u) * u             (fp32 dot and update, one rounding)

in place, so the stream's component along u becomes target[s]. A strong add pushes
the component far past anything the model has seen and the text loops; setting it
holds it at a calibrated value at every steered token and layer (directional
patching), and a window of the answer's first positions (steer_tokens) lets the model
finish the refusal it began on its own. Target 0 means "not projected" (as gamma 0
means "not added"): a request cannot ablate the direction. Same launch discipline as
`steer.py`: device tensors only, no host sync, CUDA-graph capturable, padding tokens
and unprojected rows left bit-for-bit untouched.
"""
import torch
import triton
import triton.language as tl

from vllm_safeinfer.kernels.ops import mutating_op
from vllm_safeinfer.kernels.steer import steered_slot, steered_tokens

_MAX_BLOCK_H = 2048


def project_reference(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    target: torch.Tensor,
    vector_id: torch.Tensor,
    prompt_len: torch.Tensor,
    steer_tokens: torch.Tensor,
    units: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Pure-torch target projection, in place: the kernel's oracle and the CPU path."""
    if hidden.shape[0] == 0 or query_start_loc.numel() < 2:
        return
    goal, slots, gate = steered_tokens(hidden.shape[0], positions, query_start_loc, target,
                                       prompt_len, steer_tokens, slot_mapping)
    unit = units[vector_id[slots]].float()
    current = hidden.float()
    stream = current if residual is None else current + residual.float()
    along = (stream * unit).sum(dim=-1)
    projected = current + (goal - along)[:, None] * unit
    hidden.copy_(torch.where(gate[:, None], projected.to(hidden.dtype), hidden))


@triton.jit(do_not_specialize=["num_rows"])
def _project_kernel(
    hidden_ptr,
    hidden_stride,
    residual_ptr,
    residual_stride,
    positions_ptr,
    query_start_loc_ptr,
    slot_mapping_ptr,
    target_ptr,
    vector_id_ptr,
    prompt_len_ptr,
    steer_tokens_ptr,
    units_ptr,
    units_stride,
    num_rows,
    hidden_size,
    SEARCH_STEPS: tl.constexpr,
    HAS_SLOT_MAPPING: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    if token < tl.load(query_start_loc_ptr + num_rows):
        slot, goal, steered = steered_slot(
            token, positions_ptr, query_start_loc_ptr, slot_mapping_ptr, target_ptr,
            prompt_len_ptr, steer_tokens_ptr, num_rows, SEARCH_STEPS, HAS_SLOT_MAPPING)
        if steered:
            unit = units_ptr + tl.load(vector_id_ptr + slot).to(tl.int64) * units_stride
            row_ptr = hidden_ptr + token.to(tl.int64) * hidden_stride
            along = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for start in range(0, hidden_size, BLOCK_H):
                cols = start + tl.arange(0, BLOCK_H)
                mask = cols < hidden_size
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    res_ptr = residual_ptr + token.to(tl.int64) * residual_stride
                    x += tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                u = tl.load(unit + cols, mask=mask, other=0.0).to(tl.float32)
                along += x * u
            shift = goal - tl.sum(along, axis=0)
            for start in range(0, hidden_size, BLOCK_H):
                cols = start + tl.arange(0, BLOCK_H)
                mask = cols < hidden_size
                h = tl.load(row_ptr + cols, mask=mask)
                u = tl.load(unit + cols, mask=mask).to(tl.float32)
                tl.store(row_ptr + cols, (h.to(tl.float32) + shift * u).to(h.dtype), mask=mask)


def project_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    target: torch.Tensor,
    vector_id: torch.Tensor,
    prompt_len: torch.Tensor,
    steer_tokens: torch.Tensor,
    units: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Launch the fused kernel (one program per token: a dot pass, then an update pass)."""
    num_tokens, hidden_size = hidden.shape
    num_rows = query_start_loc.numel() - 1
    if num_tokens == 0 or num_rows == 0:
        return
    if hidden.stride(1) != 1 or units.stride(1) != 1 or (
            residual is not None and residual.stride(1) != 1):
        raise ValueError("project_triton needs hidden, residual and units contiguous along "
                         "the hidden dim")
    _project_kernel[(num_tokens,)](
        hidden,
        hidden.stride(0),
        residual,
        0 if residual is None else residual.stride(0),
        positions,
        query_start_loc,
        slot_mapping,
        target,
        vector_id,
        prompt_len,
        steer_tokens,
        units,
        units.stride(0),
        num_rows,
        hidden_size,
        SEARCH_STEPS=num_rows.bit_length(),
        HAS_SLOT_MAPPING=slot_mapping is not None,
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=min(triton.next_power_of_2(hidden_size), _MAX_BLOCK_H),
        num_warps=4,
    )


@mutating_op("project_", ("hidden",))
def project_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    target: torch.Tensor,
    vector_id: torch.Tensor,
    prompt_len: torch.Tensor,
    steer_tokens: torch.Tensor,
    units: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Project `hidden` (+ `residual`, read only) in place; an opaque op so compiled
    graphs keep it as one call."""
    if hidden.device.type in ("cuda", "xpu"):
        project_triton(hidden, residual, positions, query_start_loc, target, vector_id,
                       prompt_len, steer_tokens, units, slot_mapping)
    elif bool(target.any()):  # on CPU the check is free and spares the [T, H] pass
        project_reference(hidden, residual, positions, query_start_loc, target, vector_id,
                          prompt_len, steer_tokens, units, slot_mapping)
