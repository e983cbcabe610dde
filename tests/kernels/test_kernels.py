"""The Triton kernels (vllm_safeinfer/kernels/: steer.py, project.py, mix.py) against their
torch references.

On a GPU the kernels run compiled on CUDA tensors. Without one they run under Triton's
interpreter on CPU tensors, which Triton picks per `@triton.jit` function when it is
decorated, its own standard library (`tl.sum`, `tl.max`) included: so TRITON_INTERPRET
must be set before the process first imports triton. The suite's own process never sets
it (vLLM engines started later would inherit it): without a GPU, the kernel comparisons
(tests named `*_kernel_*`) run in a fresh subprocess with TRITON_INTERPRET=1, and fail
rather than skip when the kernels cannot run.
"""
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from vllm_safeinfer.kernels import mix, project, steer  # noqa: E402
from vllm_safeinfer.kernels.mix import mix_, mix_reference, mix_triton  # noqa: E402
from vllm_safeinfer.kernels.project import project_, project_reference, project_triton  # noqa: E402,E501
from vllm_safeinfer.kernels.steer import steer_, steer_reference, steer_triton  # noqa: E402

KERNELS_RUN_HERE = DEVICE == "cuda" or all(
    isinstance(fn, InterpretedFunction)
    for fn in (tl.sum, steer._steer_kernel, project._project_kernel, mix._mix_kernel)
)

# numpy warns on the -inf arithmetic the kernels mask out (the GPU computes it silently).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def runs_elsewhere(test_name: str) -> bool:
    """Deselected here (conftest): kernel comparisons when the kernels cannot run in this
    process, the subprocess runner when they can."""
    if test_name.startswith("test_kernels_in_subprocess"):
        return KERNELS_RUN_HERE
    return "_kernel_" in test_name and not KERNELS_RUN_HERE


def test_kernels_in_subprocess() -> None:
    """Without a GPU (or interpreter mode set up front): the `*_kernel_*` tests."""
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "_kernel_"]
        + [__file__],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x|."""
    precision = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    _, exponent = torch.frexp(x.float().abs().clamp(min=torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - precision)


# ---------------------------------------------------------------------------- steering

ALL = 2**40  # a window with no end
# (query tokens, first position, prompt length, scale, vector id, window) per live batch
# row; the window is how many positions from the last prompt token are steered.
STEER_ROWS = [
    (6, 0, 6, 1.5, 0, ALL),  # whole prompt in one step: only its last token is steered
    (1, 9, 7, -2.0, 1, ALL),  # decode
    (4, 10, 30, 3.0, 2, ALL),  # middle chunk of a chunked prefill: untouched
    (4, 26, 30, 0.5, 1, 1),  # last chunk: only its last token, the window's one
    (1, 12, 12, 0.0, 0, ALL),  # decode with scale 0: untouched
    (1, 5, 3, 0.75, 2, 4),  # decode inside its window
    (3, 0, 3, 0.0, 1, ALL),  # prefill with scale 0
    (1, 11, 7, 2.5, 0, 3),  # decode past its window: untouched
]
STEER_NUM_ROWS = 10  # rows past the live ones are CUDA-graph padding
STEER_PAD_TOKENS = 3
STEER_NUM_SLOTS = 16
STEER_NUM_VECTORS = 3


def _steer_inputs(
    hidden_size: int,
    dtype: torch.dtype,
    vector_dtype: torch.dtype,
    index_dtype: torch.dtype,
    slot_dtype: torch.dtype | None,
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """Kernel arguments for STEER_ROWS, and which tokens SafeInfer steers (from the spec)."""
    gen = torch.Generator().manual_seed(hidden_size)
    lens = torch.tensor([row[0] for row in STEER_ROWS])
    live = int(lens.sum())
    num_tokens = live + STEER_PAD_TOKENS
    qsl = torch.full((STEER_NUM_ROWS + 1,), live, dtype=torch.int32)
    qsl[0] = 0
    qsl[1 : len(STEER_ROWS) + 1] = lens.cumsum(0)

    num_slots = STEER_NUM_SLOTS if slot_dtype is not None else STEER_NUM_ROWS
    slot_of_row = torch.randperm(num_slots, generator=gen)[:STEER_NUM_ROWS]
    # Unused slots look steerable, so only the row mapping keeps padding untouched.
    scale = torch.ones(num_slots)
    vector_id = torch.zeros(num_slots, dtype=index_dtype)
    prompt_len = torch.zeros(num_slots, dtype=index_dtype)
    steer_tokens = torch.full((num_slots,), ALL, dtype=torch.int64)
    positions = torch.randint(0, 40, (num_tokens,), generator=gen)
    steered = torch.zeros(num_tokens, dtype=torch.bool)
    for row, (n, first, plen, coef, vid, window) in enumerate(STEER_ROWS):
        slot = slot_of_row[row] if slot_dtype is not None else row
        scale[slot], vector_id[slot], prompt_len[slot] = coef, vid, plen
        steer_tokens[slot] = window
        start = int(qsl[row])
        positions[start : start + n] = torch.arange(first, first + n)
        at = positions[start : start + n]
        steered[start : start + n] = (at >= plen - 1) & (at < plen - 1 + window) & (coef != 0)
    args = {
        "hidden": torch.randn(num_tokens, hidden_size, generator=gen).to(dtype),
        "positions": positions,
        "query_start_loc": qsl,
        "scale": scale,
        "vector_id": vector_id,
        "prompt_len": prompt_len,
        "steer_tokens": steer_tokens,
        "vectors": torch.randn(STEER_NUM_VECTORS, hidden_size, generator=gen).to(vector_dtype),
        "slot_mapping": None if slot_dtype is None else slot_of_row.to(slot_dtype),
    }
    return {k: None if v is None else v.to(DEVICE) for k, v in args.items()}, steered.to(DEVICE)


def _run_steer(
    impl: Callable[..., None], args: dict[str, torch.Tensor | None]
) -> torch.Tensor:
    hidden = args["hidden"].clone()
    impl(**{**args, "hidden": hidden})
    return hidden


def _assert_steer_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: equal up to 1e-6 relative (FMA on GPU); half types: within one ulp."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
        return
    err = (actual.float() - expected.float()).abs()
    assert (err <= _ulp(expected, actual.dtype)).all(), f"max error {err.max().item()}"


@pytest.mark.parametrize("hidden_size", [96, 256, 576, 4160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "variant",
    [
        # (vectors in fp32?, vector_id/prompt_len dtype, slot_mapping dtype or None)
        (True, torch.int32, None),
        (False, torch.int32, torch.int32),
        (True, torch.int64, torch.int64),
    ],
    ids=["rows", "slots-int32", "slots-int64"],
)
def test_steer_kernel_matches_reference(
    hidden_size: int,
    dtype: torch.dtype,
    variant: tuple[bool, torch.dtype, torch.dtype | None],
) -> None:
    fp32_vectors, index_dtype, slot_dtype = variant
    vector_dtype = torch.float32 if fp32_vectors else dtype
    args, steered = _steer_inputs(hidden_size, dtype, vector_dtype, index_dtype, slot_dtype)
    expected = _run_steer(steer_reference, args)
    actual = _run_steer(steer_triton, args)
    _assert_steer_close(actual, expected)
    for out in (actual, expected):
        # Exactly SafeInfer's tokens move; prompt tokens before the last, scale-0 rows
        # and CUDA-graph padding keep their bits.
        assert torch.equal((out != args["hidden"]).any(-1), steered)
        assert torch.equal(out[~steered], args["hidden"][~steered])


@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 7, 8, 9, 16, 33])
def test_steer_kernel_binary_search(num_rows: int) -> None:
    """Every token finds its row, whatever R, empty rows and padding rows included."""
    gen = torch.Generator().manual_seed(num_rows)
    lens = torch.randint(0, 4, (num_rows,), generator=gen)
    lens[num_rows // 2 :] = 0  # trailing padding rows repeat the total
    lens[0] = 1
    live = int(lens.sum())
    num_tokens = live + 2
    qsl = torch.zeros(num_rows + 1, dtype=torch.int32)
    qsl[1:] = lens.cumsum(0)
    args = {
        "hidden": torch.randn(num_tokens, 64, generator=gen),
        "positions": torch.full((num_tokens,), 100),  # every live token steered
        "query_start_loc": qsl,
        "scale": torch.arange(1, num_rows + 1, dtype=torch.float32),  # row r adds (r+1) * e_r
        "vector_id": torch.arange(num_rows),
        "prompt_len": torch.ones(num_rows, dtype=torch.int32),
        "steer_tokens": torch.full((num_rows,), ALL),
        "vectors": torch.eye(num_rows, 64),
        "slot_mapping": None,
    }
    args = {k: None if v is None else v.to(DEVICE) for k, v in args.items()}
    expected = _run_steer(steer_reference, args)
    torch.testing.assert_close(_run_steer(steer_triton, args), expected, rtol=1e-6, atol=1e-6)
    rows = torch.repeat_interleave(torch.arange(num_rows), lens).to(DEVICE)
    delta = expected - args["hidden"]
    torch.testing.assert_close(delta[:live, :num_rows].argmax(-1), rows)
    assert torch.equal(delta[live:], torch.zeros_like(delta[live:]))


def _op_args() -> dict[str, torch.Tensor | None]:
    """CPU arguments for the custom op (the CPU serving path)."""
    args, _ = _steer_inputs(64, torch.float32, torch.float32, torch.int64, torch.int32)
    return {k: None if v is None else v.cpu() for k, v in args.items()}


def _runs_reference_on_cpu(monkeypatch: pytest.MonkeyPatch, module, name: str,
                           args: dict[str, torch.Tensor | None]) -> list:
    """Call the custom op `name + '_'` of `module` on CPU `args`: it must run the torch
    reference once, with the reference's result; returns a spy of later calls."""
    reference = getattr(module, f"{name}_reference")
    calls = []

    def spy(*a: torch.Tensor | None) -> None:
        calls.append(a)
        reference(*a)

    monkeypatch.setattr(module, f"{name}_reference", spy)
    hidden = args["hidden"].clone()
    getattr(torch.ops.safeinfer, f"{name}_")(hidden, *list(args.values())[1:])
    assert len(calls) == 1
    assert torch.equal(hidden, _run_steer(reference, args))
    return calls


def test_steer_op_on_cpu_runs_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    _runs_reference_on_cpu(monkeypatch, steer, "steer", _op_args())


def test_steer_op_registration() -> None:
    """Schema, fake impl and functionalization agree with the real impl."""
    args = _op_args()
    torch.library.opcheck(torch.ops.safeinfer.steer_.default, tuple(args.values()))


def test_steer_op_under_torch_compile() -> None:
    args = _op_args()
    rest = tuple(args.values())[1:]

    def step(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        h = x * 2.0
        steer_(h, *rest)  # on an intermediate
        steer_(x, *rest)  # on a graph input
        return h + 1.0

    x_eager, x_compiled = args["hidden"].clone(), args["hidden"].clone()
    expected = step(x_eager, *rest)
    actual = torch.compile(step, backend="inductor", fullgraph=True)(x_compiled, *rest)
    assert torch.equal(actual, expected)
    assert torch.equal(x_compiled, x_eager)
    assert not torch.equal(x_eager, args["hidden"])


# ---------------------------------------------------------------------------- projection


def _project_inputs(hidden_size: int, dtype: torch.dtype, index_dtype: torch.dtype,
                    slot_dtype: torch.dtype | None, with_residual: bool
                    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """STEER_ROWS as projections: each row's scale becomes its target component, the
    vectors unit directions; vLLM's residual half of the stream beside `hidden`."""
    args, steered = _steer_inputs(hidden_size, dtype, torch.float32, index_dtype, slot_dtype)
    vectors = args.pop("vectors")
    gen = torch.Generator().manual_seed(hidden_size + 1)
    residual = torch.randn(args["hidden"].shape, generator=gen).to(dtype).to(DEVICE)
    return {"hidden": args.pop("hidden"), "residual": residual if with_residual else None,
            "positions": args.pop("positions"), "query_start_loc": args.pop("query_start_loc"),
            "target": args.pop("scale") * 4.0, "vector_id": args.pop("vector_id"),
            "prompt_len": args.pop("prompt_len"), "steer_tokens": args.pop("steer_tokens"),
            "units": vectors / vectors.norm(dim=-1, keepdim=True),
            "slot_mapping": args.pop("slot_mapping")}, steered


@pytest.mark.parametrize("hidden_size", [96, 576, 4160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "variant",
    [
        # (vector_id/prompt_len dtype, slot_mapping dtype or None, residual given)
        (torch.int32, None, True),
        (torch.int64, torch.int64, False),
        (torch.int32, torch.int32, True),
    ],
    ids=["rows-residual", "slots-int64", "slots-int32-residual"],
)
def test_project_kernel_matches_reference(
    hidden_size: int, dtype: torch.dtype,
    variant: tuple[torch.dtype, torch.dtype | None, bool],
) -> None:
    index_dtype, slot_dtype, with_residual = variant
    args, steered = _project_inputs(hidden_size, dtype, index_dtype, slot_dtype, with_residual)
    expected = _run_steer(project_reference, args)
    actual = _run_steer(project_triton, args)
    if dtype == torch.float32:  # the dot's summation order differs
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        err = (actual.float() - expected.float()).abs()
        assert (err <= _ulp(expected, dtype)).all(), f"max error {err.max().item()}"
    for out in (actual, expected):
        assert torch.equal((out != args["hidden"]).any(-1), steered)
        assert torch.equal(out[~steered], args["hidden"][~steered])
    if dtype == torch.float32:
        # The stream's component along each steered token's direction is its target.
        tokens, rows = steer.token_rows(args["query_start_loc"], args["hidden"].shape[0])
        slots = rows if args["slot_mapping"] is None else args["slot_mapping"][rows].long()
        stream = actual + (0 if args["residual"] is None else args["residual"])
        along = (stream * args["units"][args["vector_id"][slots]]).sum(-1)
        torch.testing.assert_close(along[steered], args["target"][slots][steered],
                                   rtol=1e-4, atol=1e-4)


def _project_op_args() -> dict[str, torch.Tensor | None]:
    args, _ = _project_inputs(64, torch.float32, torch.int64, torch.int32, True)
    return {k: None if v is None else v.cpu() for k, v in args.items()}


def test_project_op_on_cpu_runs_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _project_op_args()
    calls = _runs_reference_on_cpu(monkeypatch, project, "project", args)
    # No row projects: the op leaves hidden alone without the [T, H] pass.
    untouched = args["hidden"].clone()
    torch.ops.safeinfer.project_(untouched, *list({**args, "target": args["target"] * 0}
                                                  .values())[1:])
    assert len(calls) == 1 and torch.equal(untouched, args["hidden"])


def test_project_op_registration_and_compile() -> None:
    args = _project_op_args()
    torch.library.opcheck(torch.ops.safeinfer.project_.default, tuple(args.values()))
    rest = tuple(args.values())[1:]

    def step(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        h = x * 2.0
        project_(h, *rest)
        return h + 1.0

    expected = step(args["hidden"].clone(), *rest)
    actual = torch.compile(step, backend="inductor", fullgraph=True)(args["hidden"].clone(), *rest)
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------- mixing

# torch's CPU log_softmax over ~152k columns is itself ~3e-5 off (float64 says so; the
# kernel's online version is ~2e-6 off), and dividing by 1 - lam scales an error of the
# log-softmaxes by up to 1 / (1 - lam).
MIX_LP_ATOL = 1e-4
MIX_RTOL = 1e-5
MIX_LAMS = [0.0, 0.99, 0.999]


def _mix_inputs(
    num_rows: int, width: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and expert logits with -inf holes, whole -inf blocks included."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, width, generator=gen) * 4
    expert = torch.randn(num_rows, width, generator=gen) * 4
    logits[torch.rand(num_rows, width, generator=gen) < 0.01] = float("-inf")
    expert[torch.rand(num_rows, width, generator=gen) < 0.01] = float("-inf")
    logits[0, :5000] = float("-inf")  # the online max starts at -inf for a whole block
    expert[-1, 8192:16384] = float("-inf")
    return logits.to(dtype).to(DEVICE), expert.to(dtype).to(DEVICE)


def _assert_mix_close(actual: torch.Tensor, expected: torch.Tensor, lam: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert not actual.isnan().any()
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    atol = MIX_LP_ATOL / (1.0 - lam.float()).unsqueeze(-1)
    if actual.dtype != torch.float32:
        atol = atol + 2 * _ulp(expected, actual.dtype)  # rounding of nearby fp32 values
    bound = atol + MIX_RTOL * expected.float().abs()
    finite = torch.isfinite(expected)
    err = (actual.float() - expected.float()).abs()
    assert (err[finite] <= bound[finite]).all(), f"max error {err[finite].max().item()}"
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(
    "vocab_size, width",
    [(32000, 32000), (32000, 32064), (49152, 49152), (151646, 151936)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mix_kernel_matches_reference(
    vocab_size: int, width: int, dtype: torch.dtype
) -> None:
    logits, expert = _mix_inputs(len(MIX_LAMS), width, dtype)
    lam = torch.tensor(MIX_LAMS, device=DEVICE)
    active = torch.ones(len(MIX_LAMS), dtype=torch.bool, device=DEVICE)
    expected = mix_reference(logits.clone(), expert, lam, active, vocab_size)
    actual = mix_triton(logits.clone(), expert, lam, active, vocab_size)
    _assert_mix_close(actual, expected, lam)
    assert torch.isneginf(actual[:, vocab_size:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("active_dtype", [torch.bool, torch.int32], ids=str)
@pytest.mark.parametrize("into_out", [False, True], ids=["in-place", "out"])
def test_mix_kernel_inactive_rows(
    dtype: torch.dtype, active_dtype: torch.dtype, into_out: bool
) -> None:
    """Inactive rows keep (in place) or copy (out) their logits; lam = 1 there is harmless."""
    logits, expert = _mix_inputs(4, 32064, dtype, seed=1)
    lam = torch.tensor([0.99, 1.0, 0.999, 1.0], device=DEVICE)
    active = torch.tensor([1, 0, 1, 0], dtype=active_dtype, device=DEVICE)
    on = active.bool()
    results = []
    for impl in (mix_reference, mix_triton):
        source = logits.clone()
        out = torch.empty_like(logits) if into_out else None
        result = impl(source, expert, lam, active, 32000, out)
        assert result is (out if into_out else source)
        assert torch.equal(result[~on], logits[~on])
        if into_out:
            assert torch.equal(source, logits)
        results.append(result)
    expected, actual = results
    _assert_mix_close(actual[on], expected[on], lam[on])


def test_mix_dispatch() -> None:
    """`mix_` runs the kernel on GPU tensors and the reference elsewhere."""
    logits, expert = _mix_inputs(2, 8192, torch.float32)
    lam = torch.tensor([0.5, 0.9], device=DEVICE)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    impl = mix_triton if DEVICE == "cuda" else mix_reference
    expected = impl(logits.clone(), expert, lam, active, 8000)
    assert torch.equal(mix_(logits.clone(), expert, lam, active, 8000), expected)
