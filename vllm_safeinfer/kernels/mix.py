"""SafeInfer's safety-guided decoding mix, fused.

    out = (lp - lam * max(lp, lp_expert)) / (1 - lam)

with lp the fp32 log-softmax over the real vocabulary (ids >= vocab_size get -inf).
The canonical definition, and so the reference, is `vllm_safeinfer.common.mixing.safeinfer_mix`;
the kernel does one program per row: both row-wise online log-softmaxes in one read
pass, then a second pass that writes, so a 151936-wide row costs two reads of each input
and one write instead of the reference's string of full-size fp32 temporaries.
"""
import torch
import triton
import triton.language as tl

from vllm_safeinfer.common.mixing import safeinfer_mix

# Vocabulary slice per loop step: fixed, so large vocabularies loop instead of spilling.
_BLOCK_V = 4096


def mix_reference(
    logits: torch.Tensor,
    expert_logits: torch.Tensor,
    lam: torch.Tensor,
    active: torch.Tensor,
    vocab_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`safeinfer_mix` on the active rows; inactive rows kept (in place) or copied (`out`)."""
    mixed = safeinfer_mix(logits, expert_logits, lam, vocab_size)
    # Inactive rows may hold lam = 1 and so NaN in `mixed`; `where` drops them.
    result = torch.where(active.to(torch.bool).unsqueeze(-1), mixed, logits)
    target = logits if out is None else out
    return target.copy_(result)


@triton.jit
def _mix_kernel(
    logits_ptr,
    logits_stride,
    expert_ptr,
    expert_stride,
    out_ptr,
    out_stride,
    lam_ptr,
    active_ptr,
    vocab_size,
    width,
    IN_PLACE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * logits_stride
    expert_src = expert_ptr + row * expert_stride
    dst = out_ptr + row * out_stride
    if tl.load(active_ptr + row) != 0:
        # Pass 1: running max and rescaled sum of exp for both rows at once.
        m = float("-inf")
        s = 0.0
        m_e = float("-inf")
        s_e = 0.0
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            real = cols < vocab_size
            x = tl.load(src + cols, mask=real, other=float("-inf")).to(tl.float32)
            x_e = tl.load(expert_src + cols, mask=real, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_e_new = tl.maximum(m_e, tl.max(x_e, 0))
            # While everything seen is -inf, shift by 0 so exp never sees -inf - -inf.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            shift_e = tl.where(m_e_new == float("-inf"), 0.0, m_e_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
            s_e = s_e * tl.exp(m_e - shift_e) + tl.sum(tl.exp(x_e - shift_e), 0)
            m = m_new
            m_e = m_e_new
        log_s = tl.log(s)
        log_s_e = tl.log(s_e)
        lam = tl.load(lam_ptr + row).to(tl.float32)
        # Pass 2: write the mix; padded ids load -inf, so lp = -inf and they stay -inf.
        for start in range(0, width, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            real = cols < vocab_size
            x = tl.load(src + cols, mask=real, other=float("-inf")).to(tl.float32)
            x_e = tl.load(expert_src + cols, mask=real, other=float("-inf")).to(tl.float32)
            lp = (x - m) - log_s
            lp_e = (x_e - m_e) - log_s_e
            mixed = (lp - lam * tl.maximum(lp, lp_e)) / (1.0 - lam)
            # lp = -inf: the token is impossible; lp - lam * (-inf) would be NaN.
            mixed = tl.where(lp == float("-inf"), lp, mixed)
            tl.store(dst + cols, mixed.to(dst.dtype.element_ty), mask=cols < width)
    elif not IN_PLACE:
        for start in range(0, width, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < width
            x = tl.load(src + cols, mask=in_row)
            tl.store(dst + cols, x.to(dst.dtype.element_ty), mask=in_row)


def mix_triton(
    logits: torch.Tensor,
    expert_logits: torch.Tensor,
    lam: torch.Tensor,
    active: torch.Tensor,
    vocab_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused mix of `[N, V]` logits: into `out`, or in place into `logits` when `out` is None.

    `lam` is fp32 `[N]`, `active` bool or int `[N]`; inactive rows are left as they are
    (in place) or copied (`out`). Fixed launch configuration, no host reads.
    """
    num_rows, width = logits.shape
    if expert_logits.shape != logits.shape:
        raise ValueError(
            f"expert logits {tuple(expert_logits.shape)} do not match logits {tuple(logits.shape)}"
        )
    target = logits if out is None else out
    if target.shape != logits.shape:
        raise ValueError(f"out {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if logits.stride(1) != 1 or expert_logits.stride(1) != 1 or target.stride(1) != 1:
        raise ValueError("mix_triton needs logits, expert logits and out contiguous in the vocab")
    if num_rows == 0:
        return target
    _mix_kernel[(num_rows,)](
        logits,
        logits.stride(0),
        expert_logits,
        expert_logits.stride(0),
        target,
        target.stride(0),
        lam,
        active,
        min(vocab_size, width),
        width,
        IN_PLACE=out is None,
        BLOCK_V=_BLOCK_V,
        num_warps=8,
    )
    return target


def mix_(
    logits: torch.Tensor,
    expert_logits: torch.Tensor,
    lam: torch.Tensor,
    active: torch.Tensor,
    vocab_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits processor's entry point: the Triton kernel on GPU, the reference elsewhere."""
    impl = mix_triton if logits.device.type in ("cuda", "xpu") else mix_reference
    return impl(logits, expert_logits, lam, active, vocab_size, out)
