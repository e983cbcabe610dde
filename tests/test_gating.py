"""Context-adaptive SafeInfer (mode `auto`) inside vLLM: the harm probe's verdict taken in
the engine equals the HF reference's, each request then runs exactly its defence or
`off`, a request let through runs no expert rows after its prompt, and chunked prefill,
preemption and prefix caching reproduce the verdict."""
from __future__ import annotations

import pytest

from tests.engines import safeinfer_engine
from tests.parity import LONG_PROMPTS, PROMPTS, Case, long_prompt, reference_generate, sampling
from tests.test_stress import LONG_TOKENS, preemptions, stress_engine

ARCHS = ["tiny-llama", "tiny-qwen2"]
GATED = [Case("auto"), Case("auto", defence="sgds", lam=0.5),
         Case("auto", defence="sa", vector="b", gamma=-1.5)]


def generate(llm, prompts, params) -> tuple[list[list[int]], list[str], list]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outputs], [o.request_id for o in outputs],
            outputs)


def decisions(llm, request_ids: list[str]) -> list[dict | None]:
    [found] = llm.collective_rpc("safeinfer_gate_decisions", args=(request_ids,))
    return [found.get(rid) for rid in request_ids]


def _expert_rows(worker) -> tuple[int, int]:
    from vllm_safeinfer.engine.worker import find_logits_processor

    planner = find_logits_processor(worker.model_runner).expert.planner
    return planner.rows_run, planner.rows_skipped


def expert_rows(llm) -> tuple[int, int]:
    [counts] = llm.collective_rpc(_expert_rows)
    return counts


@pytest.mark.parametrize("name", ARCHS)
def test_auto_mixed_batch_equals_reference(engine_pool, tiny_assets, references, name):
    assets = tiny_assets(name)
    llm = safeinfer_engine(engine_pool, assets)
    reference = references(name)
    cases = [*GATED, Case("off"), Case("sgds")]
    rows = [(prompt, case) for prompt in PROMPTS for case in cases]
    prompts = [p for p, _ in rows]
    got, ids, _ = generate(llm, prompts, [sampling(c) for _, c in rows])
    assert got == reference_generate(reference, assets, prompts, [c for _, c in rows])
    verdicts = reference.gate_verdicts(PROMPTS, assets.harm_probe())
    flagged = {tuple(p) for p, (f, _) in zip(PROMPTS, verdicts) if f}
    assert 0 < len(flagged) < len(PROMPTS), "the probe must flag some prompts, not all"
    for (prompt, case), rid, decision in zip(rows, ids, decisions(llm, ids)):
        if case.mode != "auto":
            assert decision is None
            continue
        assert decision["flagged"] == (tuple(prompt) in flagged)
        assert decision["defence"] == (case.defence or "safeinfer")
    off = dict(zip(map(tuple, prompts[3::len(cases)]), got[3::len(cases)]))
    for (prompt, case), tokens in zip(rows, got):
        if case.mode == "auto" and tuple(prompt) not in flagged:
            assert tokens == off[tuple(prompt)], "a request let through runs as off"
    assert any(tokens != off[tuple(p)] for (p, c), tokens in zip(rows, got)
               if c.mode == "auto" and tuple(p) in flagged), "no flagged row was defended"


def test_let_through_runs_no_expert_rows(engine_pool, tiny_assets, references):
    assets = tiny_assets("tiny-llama")
    llm = safeinfer_engine(engine_pool, assets)
    verdicts = references("tiny-llama").gate_verdicts(PROMPTS, assets.harm_probe())
    passed = [p for p, (f, _) in zip(PROMPTS, verdicts) if not f]
    flagged = [p for p, (f, _) in zip(PROMPTS, verdicts) if f]
    steps = 10

    def run(prompts, case):
        before = expert_rows(llm)
        tokens, _, _ = generate(llm, prompts, sampling(case, max_tokens=steps, ignore_eos=True))
        after = expert_rows(llm)
        return tokens, (after[0] - before[0], after[1] - before[1])

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


def _split_long_prompts(reference, probe, count: int) -> list[list[int]]:
    """Long prompts, about half flagged, none within rounding of the threshold, flagged
    and let through alternating."""
    verdicts = reference.gate_verdicts(LONG_PROMPTS, probe)
    candidates = LONG_PROMPTS
    margin = 1e-3 * max(abs(s) for _, s in verdicts)
    clear = [(p, f) for p, (f, s) in zip(candidates, verdicts)
             if abs(s - probe.threshold) > margin]
    yes = [p for p, f in clear if f][:count // 2]
    no = [p for p, f in clear if not f][:count - len(yes)]
    assert yes and no, "the tiny probe must split the long prompts"
    return [p for pair in zip(yes, no) for p in pair] + yes[len(no):] + no[len(yes):]


@pytest.mark.parametrize("name", ARCHS)
def test_auto_under_chunked_prefill_preemption_and_prefix_caching(
        engine_pool, tiny_assets, references, name):
    assets = tiny_assets(name)
    llm = stress_engine(engine_pool, assets)
    reference = references(name)
    prompts = _split_long_prompts(reference, assets.harm_probe(), 8)
    cases = [GATED[i % len(GATED)] if i % 4 != 3 else Case("sgds") for i in range(len(prompts))]
    params = [sampling(c, max_tokens=LONG_TOKENS, ignore_eos=True) for c in cases]
    before = preemptions(llm)
    got, ids, _ = generate(llm, prompts, params)
    assert preemptions(llm) > before, "the capped cache must force preemption"
    want = reference_generate(reference, assets, prompts, cases, LONG_TOKENS, ignore_eos=True)
    assert got == want
    first = decisions(llm, ids)
    # Every prompt is longer than the 64-token step budget: its last chunk is a split one.
    assert all(len(p) > 64 for p in prompts)
    # Again, one at a time (the capped cache holds one prompt's blocks, not eight): the
    # prompt's blocks come from the cache, and output and verdict are the same.
    for i in range(2):
        generate(llm, [prompts[i]], params[i])
        again, again_ids, outputs = generate(llm, [prompts[i]], params[i])
        assert again == [want[i]]
        assert outputs[0].num_cached_tokens >= 64, "the prompt must hit the cache"
        [decision] = decisions(llm, again_ids)
        assert decision["flagged"] == first[i]["flagged"]
        assert decision["score"] == pytest.approx(first[i]["score"], rel=1e-4)
    assert {d["flagged"] for d in first[:2]} == {True, False}


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
