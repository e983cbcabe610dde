"""One path for a request's options: the frontend resolves them once (validation and
metrics), the engine core once (its stamp), the worker never (it builds each row from the
stamp), in every mode and after a vector is published through the real calls."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.engines import new_llm
from tests.parity import PROMPTS, Case, sampling
from tests.server.test_publish import write_vector
from vllm_safeinfer.common import request_options
from vllm_safeinfer.common.contract import PUBLISH_VECTOR, STAGE_VECTOR
from vllm_safeinfer.common.vectors import content_sha256

CASES = [Case("off"), Case("sa"), Case("sa", vector="b", gamma=-1.0), Case("sgds", lam=0.5),
         Case("safeinfer", vector="p", lam=0.9), Case("auto"),
         Case("auto", defence="sgds", lam=0.5)]


def _count_resolutions() -> None:
    """Wrap `resolve_request` so that each call records the function that asked for it
    (the first caller outside `request_options`, as `module:function`)."""
    original = request_options.resolve_request
    callers: list[str] = []

    def counted(extra_args, config):
        frame = sys._getframe(1)
        while frame.f_globals.get("__name__") == request_options.__name__:
            frame = frame.f_back
        callers.append(f"{frame.f_globals['__name__']}:{frame.f_code.co_name}")
        return original(extra_args, config)

    counted.callers, counted.original = callers, original
    request_options.resolve_request = counted


def _take_count() -> list[str]:
    counted = request_options.resolve_request
    request_options.resolve_request = counted.original
    return counted.callers


def _pid(_worker) -> int:
    return os.getpid()


def _record_rows(worker) -> None:
    """Record, for every row the worker sets, the stamp it was given and the row as set."""
    from vllm_safeinfer.engine.worker import find_logits_processor

    state = find_logits_processor(worker.model_runner).state
    original = state.set_row
    state.recorded = []

    def set_row(row, stamp, prompt_len):
        original(row, stamp, prompt_len)
        h = state._host
        state.recorded.append((stamp, {name: h[name][..., row].clone() for name in h}))

    state.set_row = set_row


def _rows(worker):
    """The recorded rows, each with what its stamp says it must hold (from the vector
    row of the stamp's identity), and the identities this worker's table holds."""
    from vllm_safeinfer.engine.batch_state import NEVER
    from vllm_safeinfer.engine.worker import find_logits_processor

    state = find_logits_processor(worker.model_runner).state
    del state.set_row
    out = []
    for stamp, row in state.recorded:
        want = {"scale": torch.zeros_like(row["scale"]), "target": torch.zeros_like(row["target"]),
                "vector_id": 0, "steer_tokens": 0, "lam": 0.0, "mixes": False,
                "gated": stamp is not None and stamp.gated}
        if stamp is not None and stamp.runs.steers:
            entry = state.vectors.row(stamp.vector_sha256)
            gamma = entry.gamma if stamp.gamma is None else stamp.gamma
            for layer in entry.layers:
                slot = state.layer_slot[layer]
                if entry.projects:
                    want["target"][slot] = gamma * entry.norm
                else:
                    want["scale"][slot] = gamma
            want["vector_id"] = entry.index
            want["steer_tokens"] = entry.answer_tokens or NEVER
        if stamp is not None and stamp.runs.mixes:
            want["mixes"], want["lam"] = True, torch.tensor(stamp.lam).item()
        got = {name: row[name] if name in ("scale", "target") else row[name].item()
               for name in want}
        out.append((stamp, got, want))
    del state.recorded
    return out


def _check_rows(llm, cases) -> set[tuple]:
    """Every row the worker set holds what its stamp says; the stamps seen."""
    [rows] = llm.collective_rpc(_rows)
    assert len(rows) == len(cases)
    seen = set()
    for stamp, got, want in rows:
        assert stamp is not None
        for name in want:
            if isinstance(want[name], torch.Tensor):
                assert torch.allclose(got[name], want[name]), (stamp, name)
            else:
                assert got[name] == pytest.approx(want[name]), (stamp, name)
        seen.add((stamp.mode.value, stamp.runs.value, stamp.vector_sha256, stamp.gamma,
                  stamp.lam))
    return seen


@pytest.fixture(scope="module")
def inproc_engine(engine_pool, tiny_assets, tmp_path_factory):
    """Tiny Llama with SafeInfer and a vector_dir, every part in this process (frontend,
    engine core, worker): each resolution is counted with the function that asked."""
    assets = tiny_assets("tiny-llama")
    folder = str(tmp_path_factory.mktemp("published"))
    patch = pytest.MonkeyPatch()
    patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        llm = engine_pool.get("inproc:tiny-llama", lambda: new_llm(
            assets.model, additional_config={
                "safeinfer": assets.safeinfer_config(vector_dir=folder)}))
    finally:
        patch.undo()
    return llm, assets


def test_options_resolve_once_per_role_and_rows_are_the_stamps(inproc_engine, tmp_path):
    llm, assets = inproc_engine
    sha = {name: content_sha256(open(path, "rb").read()) for name, path in assets.vectors.items()}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(CASES))]
    params = [sampling(case) for case in CASES]
    [worker_pid] = llm.collective_rpc(_pid)
    assert worker_pid == os.getpid()
    _count_resolutions()
    llm.collective_rpc(_record_rows)
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        callers = _take_count()
    # One resolution per request in the frontend (validation, whose result the metrics
    # reuse) and one in the engine core (its stamp); none in the worker.
    assert sorted(callers) == sorted(
        ["vllm_safeinfer.engine.logits_processor:validate_params",
         "vllm_safeinfer.engine.prefix_cache:stamp"] * len(CASES))
    seen = _check_rows(llm, CASES)
    assert seen == {
        ("off", "off", None, None, None), ("sa", "sa", sha["a"], None, None),
        ("sa", "sa", sha["b"], -1.0, None), ("sgds", "sgds", None, None, 0.5),
        ("safeinfer", "safeinfer", sha["p"], None, 0.9), ("auto", "safeinfer", sha["a"], None,
                                                            0.99),
        ("auto", "sgds", None, None, 0.5)}

    # A vector published through the real calls (what POST /v1/safeinfer/vectors sends):
    # the workers stage the bytes, the engine core switches the name; the frontend's
    # config learns it as the HTTP endpoint's does.
    path = tmp_path / "fresh.safetensors"
    write_vector(assets, path, seed=7)
    data = path.read_bytes()
    fresh = content_sha256(data)
    llm.collective_rpc(STAGE_VECTOR, args=("fresh", str(path), data, fresh))
    engine_core = llm.llm_engine.engine_core.engine_core  # in this process: call it as is
    getattr(engine_core, PUBLISH_VECTOR)("fresh", str(path), fresh)
    processor = llm.llm_engine.input_processor
    before = processor._safeinfer_config
    processor._safeinfer_config = before.with_vector("fresh", str(path), fresh)
    try:
        llm.collective_rpc(_record_rows)
        published = [Case("sa", vector="fresh", gamma=2.0), Case("sa", vector="fresh")]
        llm.generate(prompts[:2], [sampling(case) for case in published], use_tqdm=False)
        seen = _check_rows(llm, published)
    finally:
        processor._safeinfer_config = before
    assert seen == {("sa", "sa", fresh, 2.0, None), ("sa", "sa", fresh, None, None)}
