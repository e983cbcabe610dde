"""Context-adaptive SafeInfer (mode `auto`) inside vLLM: the harm probe's verdict taken in
the engine equals the HF reference's, each request then runs exactly its defence or
`off`, a request let through runs no expert rows after its prompt, and chunked prefill,
preemption and prefix caching reproduce the verdict."""
from __future__ import annotations

import pytest
import torch

from tests.engines import long_templated, safeinfer_engine, templated
from tests.parity import (
    LONG_PROMPTS,
    MAX_TOKENS,
    PROMPTS,
    Case,
    long_prompt,
    reference_generate,
    sampling,
)
from tests.engine.test_stress import LONG_TOKENS, preemptions, stress_engine
from vllm_safeinfer.common.contract import GATE_DECISIONS

ARCHS = ["tiny-llama", "tiny-qwen2"]
GATED = [Case("auto"), Case("auto", defence="sgds", lam=0.5),
         Case("auto", defence="sa", vector="b", gamma=-1.5),
         Case("auto", defence="sa", vector="p")]


def generate(llm, prompts, params) -> tuple[list[list[int]], list[str], list]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outputs], [o.request_id for o in outputs],
            outputs)


def decisions(llm, request_ids: list[str]) -> list[dict | None]:
    [found] = llm.collective_rpc(GATE_DECISIONS, args=(request_ids,))
    return [found.get(rid) for rid in request_ids]


def _expert_rows(worker) -> tuple[int, int]:
    from vllm_safeinfer.engine.worker import find_logits_processor

    planner = find_logits_processor(worker.model_runner).expert.planner
    return planner.rows_run, planner.rows_skipped


def expert_rows(llm) -> tuple[int, int]:
    [counts] = llm.collective_rpc(_expert_rows)
    return counts


def reference_verdicts(reference, assets, prompts, cases, max_tokens: int = MAX_TOKENS,
                       **kwargs) -> tuple[list[list[int]], list]:
    found: list = []
    tokens = reference_generate(reference, assets, prompts, cases, max_tokens,
                                verdicts=found, **kwargs)
    return tokens, found


@pytest.mark.parametrize("name", ARCHS)
def test_auto_mixed_batch_equals_reference(engine_pool, tiny_assets, references, name):
    """Gated rows of every defence beside `off` and `sgds` rows, raw and chat-templated
    prompts: the engine's tokens and verdicts (flagged at the prompt, at a generated
    token by the answer monitor, or let through) equal the reference's."""
    assets = tiny_assets(name)
    llm = safeinfer_engine(engine_pool, assets)
    reference = references(name)
    cases = [*GATED, Case("off"), Case("sgds")]
    texts = [*PROMPTS, *(templated(p) for p in PROMPTS[:3])]
    rows = [(prompt, case) for prompt in texts for case in cases]
    prompts = [p for p, _ in rows]
    got, ids, _ = generate(llm, prompts, [sampling(c) for _, c in rows])
    want, verdicts = reference_verdicts(reference, assets, prompts, [c for _, c in rows])
    assert got == want
    where = [v[0] for v, (_, c) in zip(verdicts, rows) if c.mode == "auto"]
    assert "prompt" in where and None in where, "the probe must flag some prompts, not all"
    assert any(w and w.startswith("token") for w in where), "the monitor must flag one"
    for (prompt, case), rid, decision, (flagged_at, score) in zip(
            rows, ids, decisions(llm, ids), verdicts):
        if case.mode != "auto":
            assert decision is None
            continue
        assert decision["flagged_at"] == flagged_at
        assert decision["flagged"] == (flagged_at is not None)
        assert decision["defence"] == (case.defence or "safeinfer")
        assert decision["score"] == pytest.approx(score, rel=1e-4, abs=1e-5)
    off = {tuple(p): tokens for (p, c), tokens in zip(rows, got) if c.mode == "off"}
    changed_after_flag = False
    for (prompt, case), tokens, (flagged_at, _) in zip(rows, got, verdicts):
        if case.mode != "auto" or flagged_at == "prompt":
            continue
        if flagged_at is None:
            assert tokens == off[tuple(prompt)], "a request let through runs as off"
            continue
        token = int(flagged_at.split()[1])
        assert tokens[:token + 1] == off[tuple(prompt)][:token + 1], "defended too early"
        changed_after_flag |= tokens != off[tuple(prompt)]
    assert changed_after_flag, "no row flagged in its answer was steered from there on"
    assert any(tokens != off[tuple(p)] for (p, c), tokens, (w, _) in zip(rows, got, verdicts)
               if c.mode == "auto" and w == "prompt"), "no flagged row was defended"


_BLOCKING = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__",
             "__index__"}


def _watch_blocking_reads(worker, on: bool) -> list[str]:
    """Run the worker's steps (`execute_model`, `sample_tokens`) under a torch function
    mode that records each read of SafeInfer's device tensors that would make the host
    wait for the device on a GPU (a scalar or list read, a copy to the host that is not
    `non_blocking`); `on=False` removes it and returns what it saw. A control read is
    recorded first, so the watch is known to see one."""
    from torch.overrides import TorchFunctionMode

    from vllm_safeinfer.engine.worker import find_logits_processor

    if not on:
        for name in ("execute_model", "sample_tokens"):
            vars(worker).pop(name, None)
        return worker.safeinfer_blocking_reads
    processor = find_logits_processor(worker.model_runner)
    state = processor.state
    watched = {t.untyped_storage().data_ptr() for t in (
        *state._device.values(), state.verdict, state.score, state.flag_position,
        state.window, state.answer, processor.changed_tokens._count)}
    seen = worker.safeinfer_blocking_reads = []

    def device_arg(args) -> bool:
        return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in watched
                   for a in args)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            blocking = name in _BLOCKING and device_arg(args[:1])
            if name == "to":
                blocking = (device_arg(args[:1]) and not kwargs.get("non_blocking", False)
                            and "cpu" in [str(a) for a in (*args[1:], kwargs.get("device"))])
            if name == "copy_":
                blocking = device_arg(args[1:2]) and not (
                    kwargs.get("non_blocking") or args[2:3] == (True,))
            if blocking:
                seen.append(name)
            return func(*args, **kwargs)

    with Watch():
        bool(state.verdict[0])
    for name in ("execute_model", "sample_tokens"):
        step = getattr(worker, name)

        def watched_step(*args, _step=step, **kwargs):
            with Watch():
                return _step(*args, **kwargs)

        setattr(worker, name, watched_step)
    return list(seen)


def test_no_step_waits_for_the_device(engine_pool, tiny_assets):
    """A batch of gated, mixing and steered rows (tiny Qwen2: the expert's rows fused in)
    reads none of SafeInfer's device tensors in a blocking way during its steps, yet
    every gated request's verdict and the mixing metric reach the host."""
    assets = tiny_assets("tiny-qwen2")
    llm = safeinfer_engine(engine_pool, assets)
    assert llm.collective_rpc(_watch_blocking_reads, args=(True,)) == [["__bool__"]]
    try:
        cases = [*GATED, Case("sgds"), Case("safeinfer"), Case("off")]
        rows = [(prompt, case) for prompt in PROMPTS[:3] for case in cases]
        _, ids, _ = generate(llm, [p for p, _ in rows],
                             [sampling(c, max_tokens=12, ignore_eos=True) for _, c in rows])
    finally:
        [seen] = llm.collective_rpc(_watch_blocking_reads, args=(False,))
    assert seen == ["__bool__"], "only the control read may block"
    known = decisions(llm, ids)
    assert all((d is not None) == (c.mode == "auto") for d, (_, c) in zip(known, rows))


def test_let_through_runs_no_expert_rows(engine_pool, tiny_assets, references):
    assets = tiny_assets("tiny-llama")
    llm = safeinfer_engine(engine_pool, assets)
    # The monitor acts only through steering: with defence sgds a row it flags in its
    # answer still runs as off, and the expert skips it.
    verdicts = references("tiny-llama").gate_verdicts(PROMPTS, assets.harm_probe())
    passed = [p for p, (f, _) in zip(PROMPTS, verdicts) if not f]
    flagged = [p for p, (f, _) in zip(PROMPTS, verdicts) if f]
    steps = 10

    def run(prompts, case):
        before = expert_rows(llm)
        tokens, _, _ = generate(llm, prompts, sampling(case, max_tokens=steps, ignore_eos=True))
        after = expert_rows(llm)
        return tokens, (after[0] - before[0], after[1] - before[1])

    # An engine's first forward runs the expert on every row, unplanned (the planner
    # starts recording the attention metadata in that forward): warm it before counting.
    generate(llm, passed[:1], sampling(Case("off"), max_tokens=1))
    gated = Case("auto", defence="sgds", lam=0.5)
    tokens, (ran, skipped) = run(passed, gated)
    # One expert row per request for its prompt, none for its 9 decode steps.
    assert (ran, skipped) == (len(passed), len(passed) * (steps - 1))
    assert tokens == run(passed, Case("off"))[0]
    tokens, (ran, skipped) = run(flagged, gated)
    assert (ran, skipped) == (len(flagged) * steps, 0)
    assert tokens == run(flagged, Case("sgds", lam=0.5))[0]
    _, (ran, skipped) = run(flagged, Case("off"))
    assert (ran, skipped) == (0, len(flagged) * steps), "off never runs the expert"


def _stress_prompts(reference, assets, count: int) -> list[list[int]]:
    """Long prompts, raw and templated behind a shared system prompt, none within rounding of either
    threshold, flagged at the prompt and by the monitor in the answer (under a steering
    defence; over 24 tokens the tiny monitor flags every answer it watches), the first
    two templated."""
    probe = assets.harm_probe()
    system = long_templated()[0][:70]
    candidates = [*LONG_PROMPTS, *long_templated()]
    scores = reference.gate_verdicts(candidates, probe)
    margin = 1e-3 * max(abs(s) for _, s in scores)
    clear = [p for p, (_, s) in zip(candidates, scores) if abs(s - probe.threshold) > margin]
    _, where = reference_verdicts(reference, assets, clear, [Case("auto")] * len(clear),
                                  LONG_TOKENS, ignore_eos=True)
    kinds: dict[str, list[list[int]]] = {}
    for prompt, (at, _) in zip(clear, where):
        kinds.setdefault((at or "let through").split()[0], []).append(prompt)
    assert {"prompt", "token"} <= set(kinds), f"the tiny probe gives {set(kinds)}"
    head = [next(p for p in kinds[k] if p[:len(system)] == system)
            for k in ("prompt", "token")]
    rest = [p for group in zip(*kinds.values()) for p in group if p not in head]
    return (head + rest)[:count]


@pytest.mark.parametrize("name", ARCHS)
def test_auto_under_chunked_prefill_preemption_and_prefix_caching(
        engine_pool, tiny_assets, references, name):
    """Verdicts and the monitor's switch point survive chunked prefill (a read window
    over several chunks), preemption (recomputed prompt and answer) and a prefix-cache hit
    on the shared system prompt."""
    assets = tiny_assets(name)
    llm = stress_engine(engine_pool, assets)
    reference = references(name)
    prompts = _stress_prompts(reference, assets, 8)
    cases = [GATED[i % len(GATED)] if i % 4 != 3 else Case("sgds") for i in range(len(prompts))]
    cases[:2] = [Case("auto"), Case("auto")]
    params = [sampling(c, max_tokens=LONG_TOKENS, ignore_eos=True) for c in cases]
    before = preemptions(llm)
    got, ids, _ = generate(llm, prompts, params)
    assert preemptions(llm) > before, "the capped cache must force preemption"
    want, verdicts = reference_verdicts(reference, assets, prompts, cases, LONG_TOKENS,
                                        ignore_eos=True)
    assert got == want
    first = decisions(llm, ids)
    assert [d["flagged_at"] for d, c in zip(first, cases) if c.mode == "auto"] == [
        v[0] for v, c in zip(verdicts, cases) if c.mode == "auto"]
    # Every prompt is longer than the 64-token step budget: its last chunk is a split one.
    assert all(len(p) > 64 for p in prompts)
    # Again, one at a time (the capped cache holds one prompt's blocks, not eight): the
    # system prompt's blocks come from the cache, and output and verdict are the same.
    for i in range(2):
        generate(llm, [prompts[i]], params[i])
        again, again_ids, outputs = generate(llm, [prompts[i]], params[i])
        assert again == [want[i]]
        assert outputs[0].num_cached_tokens == 64, "the system prompt must hit the cache"
        [decision] = decisions(llm, again_ids)
        assert decision["flagged_at"] == first[i]["flagged_at"]
        assert decision["score"] == pytest.approx(first[i]["score"], rel=1e-4, abs=1e-5)
    assert [d["flagged_at"].split()[0] for d in first[:2]] == ["prompt", "token"]


def test_partly_run_expert_never_feeds_a_mixing_request(engine_pool, tiny_assets, references):
    """Decode blocks of requests the expert skipped (off, let through) hold no expert KV; a
    mixing request whose prompt repeats them must recompute them, not read them."""
    assets = tiny_assets("tiny-llama")
    llm = stress_engine(engine_pool, assets)
    reference = references("tiny-llama")
    shared = long_prompt(77, 70)
    for first in (Case("off"), Case("auto", defence="sgds")):
        turn1, _, _ = generate(llm, [shared], sampling(first, max_tokens=40, ignore_eos=True))
        follow_up = shared + turn1[0] + [30, 31, 32]
        got, _, _ = generate(llm, [follow_up], sampling(Case("sgds")))
        assert got == reference_generate(reference, assets, [follow_up], [Case("sgds")])
