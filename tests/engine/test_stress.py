"""One "stress" engine per tiny model: prefix caching on, a small token budget per step
(chunked prefill) and a capped KV cache (preemption and recompute), so that scheduling
never changes what SafeInfer computes: every output still equals the HF reference."""
from __future__ import annotations

import pytest

from tests.engines import LONG_TOKENS, new_llm
from tests.parity import MIXED_CASES, Case, long_prompt, reference_generate, sampling, vllm_generate
from vllm_safeinfer.common.contract import STAMP_ARG, Stamp
from vllm_safeinfer.common.modes import Mode

ARCHS = ["tiny-llama", "tiny-qwen2"]
BLOCKS = 16  # x 32 tokens: room for 3 of the long prompts below, not for their outputs


def stress_engine(engine_pool, assets):
    return engine_pool.get(
        f"stress:{assets.model}",
        lambda: new_llm(
            assets.model,
            additional_config={"safeinfer": assets.safeinfer_config()},
            enable_prefix_caching=True,
            max_num_batched_tokens=64,
            num_gpu_blocks_override=BLOCKS,
            max_model_len=256,
        ),
    )


def _readmissions(worker) -> int:
    """How many times the worker's batch took in a request it had held before (a
    preempted request resumes as a new row), counted from the first call on."""
    from vllm_safeinfer.engine.worker import find_logits_processor

    processor = find_logits_processor(worker.model_runner)
    if not hasattr(processor, "readmissions"):
        update_state, seen = processor.update_state, set()

        def counting(batch_update):
            for _, params, _, _ in () if batch_update is None else batch_update.added:
                request = Stamp.of(params.extra_args).request_id
                processor.readmissions += request in seen
                seen.add(request)
            update_state(batch_update)

        processor.readmissions = 0
        processor.update_state = counting
    return processor.readmissions


def preemptions(llm) -> int:
    """This engine's preemptions since the first call, seen by its worker (vLLM's
    `vllm:num_preemptions` lives in the process's metrics registry, which keeps only the
    last engine created with stats on)."""
    [count] = llm.collective_rpc(_readmissions)
    return count


@pytest.mark.parametrize("name", ARCHS)
def test_chunked_prefill_and_preemption_stay_exact(engine_pool, tiny_assets, references, name):
    assets = tiny_assets(name)
    llm = stress_engine(engine_pool, assets)
    rows = [(long_prompt(i, 130 + 9 * i), MIXED_CASES[i % len(MIXED_CASES)]) for i in range(8)]
    prompts = [p for p, _ in rows]
    before = preemptions(llm)
    got = vllm_generate(llm, prompts, [sampling(c, max_tokens=LONG_TOKENS, ignore_eos=True)
                                       for _, c in rows])
    assert preemptions(llm) > before, "the capped cache must force preemption"
    reference = references(name)
    want = [reference.generate([p], [c.row_settings(assets)], LONG_TOKENS, ignore_eos=True)[0]
            for p, c in rows]
    assert got == want


@pytest.mark.parametrize("name", ARCHS)
def test_prefix_caching_with_mixed_steering(engine_pool, tiny_assets, references, name):
    """Every mode's second run of a prompt reads its first two blocks from the cache
    (tiny Qwen2: the expert's KV of them too, from its own cache, inside the fused
    forward) and still equals the reference."""
    assets = tiny_assets(name)
    llm = stress_engine(engine_pool, assets)
    shared = long_prompt(99, 70)
    cases = [Case("off"), Case("sa"), Case("sa", gamma=-2.0), Case("sgds"), Case("safeinfer")]
    prompts = [shared + [20 + i] for i in range(len(cases))]
    first = vllm_generate(llm, prompts, [sampling(c) for c in cases])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[::-1]],
                           [sampling(c) for c in cases[::-1]], use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [64] * len(cases)
    again = [list(o.outputs[0].token_ids) for o in outputs][::-1]
    want = reference_generate(references(name), assets, prompts, cases)
    assert first == want
    assert again == want
    # A steered conversation's next turn repeats the first turn's steered tokens as its
    # prompt: those blocks must not be reused, and the shared prefix still may be.
    turn1 = vllm_generate(llm, [shared], sampling(Case("sa"), max_tokens=40, ignore_eos=True))[0]
    turn2_prompt = shared + turn1 + [30, 31, 32]
    turn2 = vllm_generate(llm, [turn2_prompt], sampling(Case("sa")))[0]
    want2 = reference_generate(references(name), assets, [turn2_prompt], [Case("sa")])[0]
    assert turn2 == want2


def run_unvalidated(llm, request_id: str, prompt: list[int], extra_args: dict | None,
                    max_tokens: int):
    """An `EngineCoreRequest` built by vLLM's input processor from a plain request, given
    `extra_args` after validation (no frontend check, no SafeInfer stamp) and handed
    straight to the engine, as `LLMEngine.add_request` / `AsyncLLM.add_request` allow."""
    engine = llm.llm_engine
    request = engine.input_processor.process_inputs(
        request_id, {"prompt_token_ids": prompt},
        sampling(None, max_tokens=max_tokens, ignore_eos=True),
        supported_tasks=engine.get_supported_tasks())
    request.sampling_params.extra_args = extra_args
    engine.add_request(request.request_id, request, request.params)
    for _ in range(500):
        for output in engine.step():
            if output.finished:
                return list(output.outputs[0].token_ids)
    raise AssertionError("the unvalidated request did not finish in 500 steps")


def test_unvalidated_requests_get_the_engines_own_identity(engine_pool, tiny_assets, references):
    """The engine core computes the steering's prefix-cache identity from the request's
    own options: an unstamped steered request does not leave steered blocks for an
    unsteered one to reuse, a forged stamp is replaced, and options that do not resolve
    run with the server's defaults instead of killing the engine."""
    assets = tiny_assets("tiny-llama")
    llm = stress_engine(engine_pool, assets)
    reference = references("tiny-llama")
    shared = long_prompt(123, 70)
    steered = run_unvalidated(llm, "raw-sa", shared,
                              {"safeinfer_mode": "sa", STAMP_ARG: None}, 40)
    assert steered == reference.generate([shared], [Case("sa").row_settings(assets)], 40,
                                         ignore_eos=True)[0]
    follow_up = shared + steered + [30, 31, 32]
    [output] = llm.generate([{"prompt_token_ids": follow_up}], sampling(Case("off")),
                            use_tqdm=False)
    # Blocks of 32: [0, 64) hold plain KV and are shared; the block holding the first
    # steered position (69) and every later one are not.
    assert output.num_cached_tokens == 64
    assert list(output.outputs[0].token_ids) == reference_generate(
        reference, assets, [follow_up], [Case("off")])[0]
    # A stamp the client wrote: steering with contents the server never loaded, under a
    # made-up cache key. The engine core replaces it (else the worker would refuse it).
    fake = Stamp("raw-forged", Mode.SA, Mode.SA, vector_sha256="0" * 64, gamma=50.0,
                 kv_key="0" * 16)
    forged = run_unvalidated(llm, "raw-forged", shared + [40],
                             {"safeinfer_mode": "off", STAMP_ARG: fake.to_args()}, 8)
    broken = run_unvalidated(llm, "raw-bad", shared + [41],
                             {"safeinfer_mode": "strong", "safeinfer_lam": "x"}, 8)
    off = vllm_generate(llm, [shared + [40], shared + [41]],
                        sampling(Case("off"), max_tokens=8, ignore_eos=True))
    assert [forged, broken] == off  # the server's default mode here is off
    assert llm.llm_engine.has_unfinished_requests() is False


def test_abort_leaves_other_requests_exact(engine_pool, tiny_assets, references):
    assets = tiny_assets("tiny-llama")
    llm = stress_engine(engine_pool, assets)
    engine = llm.llm_engine
    rows = [(long_prompt(50 + i, 90 + 20 * i), MIXED_CASES[(i + 1) % len(MIXED_CASES)])
            for i in range(5)]
    for i, (prompt, case) in enumerate(rows):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": prompt},
                           sampling(case, max_tokens=LONG_TOKENS, ignore_eos=True))
    finished: dict[str, list[int]] = {}
    for step in range(1000):
        if step == 6:
            engine.abort_request(["abort-1", "abort-3"])
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    kept = [0, 2, 4]
    assert sorted(finished) == [f"abort-{i}" for i in kept] or all(
        len(finished.get(f"abort-{i}", ())) < LONG_TOKENS for i in (1, 3))
    reference = references("tiny-llama")
    for i in kept:
        prompt, case = rows[i]
        want = reference.generate([prompt], [case.row_settings(assets)], LONG_TOKENS,
                                  ignore_eos=True)[0]
        assert finished[f"abort-{i}"] == want


def test_n_greater_than_one_and_seeded_sampling(engine_pool, tiny_assets, references):
    from vllm import SamplingParams

    assets = tiny_assets("tiny-llama")
    llm = stress_engine(engine_pool, assets)
    prompt = long_prompt(7, 40)
    case = Case("safeinfer", lam=0.9)
    # n > 1 needs sampling; top_k=1 makes every sample the mixed distribution's argmax.
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=1, n=3,
                            extra_args=case.extra_args())
    outputs = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs
    want = reference_generate(references("tiny-llama"), assets, [prompt], [case])[0]
    assert [list(o.token_ids) for o in outputs] == [want] * 3

    def seeded(seed, extra_prompts=0):
        sp = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, extra_args=case.extra_args())
        filler = [SamplingParams(max_tokens=16, temperature=1.0, extra_args={"safeinfer_mode": "sa"})]
        prompts = [prompt] + [long_prompt(i, 30) for i in range(extra_prompts)]
        params = [sp] + filler * extra_prompts
        return vllm_generate(llm, prompts, params)[0]

    alone = seeded(11)
    assert seeded(11) == alone
    assert seeded(11, extra_prompts=3) == alone
    assert seeded(12) != alone
