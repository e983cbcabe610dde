"""SafeInfer inside vLLM (eager, V1 runner) on both tiny architectures: token parity with
the HF reference, isolation inside mixed batches, and request validation."""
from __future__ import annotations

import dataclasses
import os

import pytest

from tests.engines import new_llm, safeinfer_engine
from tests.parity import (
    MAX_TOKENS,
    MIXED_CASES,
    PROMPTS,
    Case,
    reference_generate,
    sampling,
    vllm_generate,
)

ARCHS = ["tiny-llama", "tiny-qwen2"]


def _probe_worker(worker):
    from vllm_safeinfer import plugin
    from vllm_safeinfer.engine.worker import find_logits_processor

    processor = find_logits_processor(worker.model_runner)
    return os.getpid(), plugin.is_registered(), processor.state.vectors.layers


def test_register_ran_in_worker(engine_pool, tiny_assets):
    llm = safeinfer_engine(engine_pool, tiny_assets("tiny-llama"))
    [(pid, registered, layers)] = llm.collective_rpc(_probe_worker)
    assert pid != os.getpid()
    assert registered
    assert list(layers) == [1, 2]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("case", [Case("sa"), Case("sa", vector="b", gamma=-1.0), Case("sgds"),
                                  Case("safeinfer", lam=0.95),
                                  Case("sgds", lam=0.999)],  # the ceiling: still exact
                         ids=str)
def test_parity_with_reference(engine_pool, tiny_assets, references, name, case):
    assets = tiny_assets(name)
    llm = safeinfer_engine(engine_pool, assets)
    got = vllm_generate(llm, PROMPTS, sampling(case))
    want = reference_generate(references(name), assets, PROMPTS, [case] * len(PROMPTS))
    assert got == want
    off = vllm_generate(llm, PROMPTS, sampling(Case("off")))
    assert got != off, "the mode must change some output, or the test proves nothing"


@pytest.mark.parametrize("name", ARCHS)
def test_mixed_batch_isolation(engine_pool, tiny_assets, references, name):
    assets = tiny_assets(name)
    llm = safeinfer_engine(engine_pool, assets)
    rows = [(PROMPTS[i % len(PROMPTS)], MIXED_CASES[i % len(MIXED_CASES)]) for i in range(10)]
    prompts = [p for p, _ in rows]
    batch = vllm_generate(llm, prompts, [sampling(c) for _, c in rows])
    alone = [vllm_generate(llm, [p], sampling(c))[0] for p, c in rows]
    want = reference_generate(references(name), assets, prompts, [c for _, c in rows])
    assert batch == alone
    assert batch == want


def test_projection_sets_the_component(engine_pool, tiny_assets, references):
    """A projecting vector (`p`, layers 1 and 2, the first 4 answer positions) served
    alone: the reference's tokens, different from `off`'s, from adding the same
    direction and from projecting at every position."""
    assets = tiny_assets("tiny-llama")
    llm = safeinfer_engine(engine_pool, assets)
    cases = [Case("sa", vector="p"), Case("sa", vector="p", gamma=2.0)]
    for case in cases:
        got = vllm_generate(llm, PROMPTS, sampling(case))
        assert got == reference_generate(references("tiny-llama"), assets, PROMPTS,
                                         [case] * len(PROMPTS))
        assert got != vllm_generate(llm, PROMPTS, sampling(Case("off")))
    served = vllm_generate(llm, PROMPTS, sampling(cases[0]))
    row = cases[0].row_settings(assets)
    for other in (dataclasses.replace(row, projects=False),
                  dataclasses.replace(row, answer_tokens=0)):
        assert served != references("tiny-llama").generate(PROMPTS, other, MAX_TOKENS)


def test_off_equals_vanilla_vllm(engine_pool, tiny_assets, references):
    assets = tiny_assets("tiny-llama")
    vanilla = engine_pool.get(f"vanilla:{assets.model}", lambda: new_llm(assets.model))
    want = vllm_generate(vanilla, PROMPTS, sampling())
    llm = safeinfer_engine(engine_pool, assets)
    assert vllm_generate(llm, PROMPTS, sampling(Case("off"))) == want
    assert vllm_generate(llm, PROMPTS, sampling()) == want  # server default mode: off
    assert reference_generate(references("tiny-llama"), assets, PROMPTS,
                              [Case("off")] * len(PROMPTS)) == want


def test_zero_strength_equals_off(engine_pool, tiny_assets):
    llm = safeinfer_engine(engine_pool, tiny_assets("tiny-llama"))
    off = vllm_generate(llm, PROMPTS, sampling(Case("off")))
    assert vllm_generate(llm, PROMPTS, sampling(Case("sa", gamma=0.0))) == off
    assert vllm_generate(llm, PROMPTS, sampling(Case("sgds", lam=0.0))) == off


BAD_OPTIONS = [
    ({"safeinfer_mode": "strong"}, "safeinfer_mode"),
    ({"safeinfer_mode": "sa", "safeinfer_gamma": True}, "safeinfer_gamma"),
    ({"safeinfer_mode": "sa", "safeinfer_gamma": "1"}, "safeinfer_gamma"),
    ({"safeinfer_mode": "sa", "safeinfer_gamma": float("nan")}, "safeinfer_gamma"),
    ({"safeinfer_mode": "sa", "safeinfer_gamma": 101}, "safeinfer_gamma"),
    ({"safeinfer_mode": "sa", "safeinfer_vector": "nope"}, "safeinfer_vector"),
    ({"safeinfer_mode": "sa", "safeinfer_vector": "/etc/passwd"}, "safeinfer_vector"),
    ({"safeinfer_mode": "sgds", "safeinfer_gamma": 1.0}, "safeinfer_gamma"),
    ({"safeinfer_mode": "sa", "safeinfer_lam": 0.5}, "safeinfer_lam"),
    ({"safeinfer_mode": "sgds", "safeinfer_lam": 1.0}, "safeinfer_lam"),
    # float32 rounds 1 - lam to 0 here: past the 0.999 ceiling, refused.
    ({"safeinfer_mode": "sgds", "safeinfer_lam": 0.99999999}, "safeinfer_lam"),
    ({"safeinfer_mode": "sgds", "safeinfer_lam": 0.9991}, "safeinfer_lam"),
    ({"safeinfer_mode": "sgds", "safeinfer_lam": -0.1}, "safeinfer_lam"),
    ({"safeinfer_strength": 1}, "safeinfer_strength"),
]


@pytest.mark.parametrize("extra_args,key", BAD_OPTIONS, ids=[k for _, k in BAD_OPTIONS])
def test_bad_options_rejected_and_engine_keeps_serving(engine_pool, tiny_assets, extra_args, key):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = safeinfer_engine(engine_pool, tiny_assets("tiny-llama"))
    bad = SamplingParams(max_tokens=4, temperature=0.0, extra_args=extra_args)
    with pytest.raises(VLLMValidationError, match=key):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], bad, use_tqdm=False)
    good = vllm_generate(llm, PROMPTS[:2], sampling(Case("sa"), max_tokens=4))
    assert all(len(tokens) > 0 for tokens in good)


def test_beam_search_is_refused(engine_pool, tiny_assets):
    from vllm.sampling_params import BeamSearchParams

    llm = safeinfer_engine(engine_pool, tiny_assets("tiny-llama"))
    with pytest.raises(ValueError, match="beam search is not supported with SafeInfer"):
        llm.beam_search([{"prompt_token_ids": PROMPTS[0]}], BeamSearchParams(beam_width=2, max_tokens=4))


def test_mixing_composes_with_masks_and_biases(engine_pool, tiny_assets):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = safeinfer_engine(engine_pool, tiny_assets("tiny-llama"))
    mix = {"safeinfer_mode": "safeinfer", "safeinfer_lam": 0.99}
    allowed = list(range(40, 60))
    params = [
        SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=allowed, extra_args=mix),
        SamplingParams(max_tokens=8, temperature=0.0, logit_bias={77: 100.0}, extra_args=mix),
        SamplingParams(max_tokens=8, temperature=0.0, extra_args=mix,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        SamplingParams(max_tokens=8, temperature=0.0, extra_args=mix, prompt_logprobs=1,
                       logprobs=1),
        SamplingParams(max_tokens=8, temperature=0.0, extra_args=mix),
    ]
    outputs = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 5, params, use_tqdm=False)
    assert set(outputs[0].outputs[0].token_ids) <= set(allowed)
    assert list(outputs[1].outputs[0].token_ids) == [77] * 8
    assert outputs[2].outputs[0].text in ("yes", "no")
    # Prompt logprobs (the served model's, computed after sampling) change nothing.
    assert outputs[3].prompt_logprobs is not None
    assert outputs[3].outputs[0].token_ids == outputs[4].outputs[0].token_ids


def _dtypes(worker):
    from vllm_safeinfer.engine.worker import find_logits_processor

    runner = worker.model_runner
    return (str(next(runner.get_model().parameters()).dtype),
            str(find_logits_processor(runner).expert.dtype))


def test_expert_in_a_lower_precision(engine_pool, tiny_assets):
    """`expert_dtype`: a bf16 expert beside an fp32 model runs in bf16; greedy tokens equal
    the HF reference with the same two dtypes, and the mix acted. The reverse (an expert
    more precise than the served model) is refused before the engine starts."""
    import torch

    from vllm_safeinfer.offline.hf import load_causal_lm, load_model
    from vllm_safeinfer.offline.reference import SafeInferReference

    assets = tiny_assets("tiny-llama")
    with pytest.raises(ValueError, match="expert_dtype 'float32' is more precise than the served"):
        new_llm(assets.model, dtype="bfloat16",
                additional_config={"safeinfer": assets.safeinfer_config(expert_dtype="float32")})
    served, expert = "float32", "bfloat16"
    llm = engine_pool.get(f"{served}-model-{expert}-expert:{assets.model}", lambda: new_llm(
        assets.model, dtype=served,
        additional_config={"safeinfer": assets.safeinfer_config(expert_dtype=expert)}))
    assert llm.collective_rpc(_dtypes) == [(f"torch.{served}", f"torch.{expert}")]
    model, tokenizer = load_model(assets.model, dtype=getattr(torch, served))
    reference = SafeInferReference(model, tokenizer,
                                   load_causal_lm(assets.expert, dtype=getattr(torch, expert)))
    for case in (Case("sgds"), Case("safeinfer", lam=0.9)):
        got = vllm_generate(llm, PROMPTS, sampling(case))
        assert got == reference_generate(reference, assets, PROMPTS, [case] * len(PROMPTS))
        assert got != vllm_generate(llm, PROMPTS, sampling(Case("off")))


def test_tensor_parallel_2_is_exact(engine_pool, tiny_assets, references, monkeypatch):
    """TP 2 on this CPU (one core per rank): steering on each rank's replicated hidden
    state, the expert's rows in the served model's sharded forward (tiny Qwen2 shares its
    weights with its `ablate` expert); every mode and a mixed batch equal the
    single-device HF reference."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assets = tiny_assets("tiny-qwen2")
    llm = engine_pool.get(f"tp2:{assets.model}", lambda: new_llm(
        assets.model, tensor_parallel_size=2,
        additional_config={"safeinfer": assets.safeinfer_config()}))
    reference = references("tiny-qwen2")
    for case in (Case("sa"), Case("sgds"), Case("safeinfer", vector="b", lam=0.9)):
        got = vllm_generate(llm, PROMPTS, sampling(case))
        assert got == reference_generate(reference, assets, PROMPTS, [case] * len(PROMPTS))
        assert got != vllm_generate(llm, PROMPTS, sampling(Case("off")))
    rows = [(PROMPTS[i % len(PROMPTS)], MIXED_CASES[i % len(MIXED_CASES)]) for i in range(10)]
    batch = vllm_generate(llm, [p for p, _ in rows], [sampling(c) for _, c in rows])
    assert batch == reference_generate(reference, assets, [p for p, _ in rows],
                                       [c for _, c in rows])
