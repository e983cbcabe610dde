"""Compiled mode (torch.compile, vLLM's default): steering and the expert are installed
before compilation, so the compiled graph computes exactly what eager mode does. Tiny
Qwen2's expert shares its weights: its rows ride in the compiled forward, which then
holds up to twice a step's tokens."""
from __future__ import annotations

from tests.engines import new_llm
from tests.parity import MIXED_CASES, PROMPTS, reference_generate, sampling, vllm_generate
from vllm_safeinfer.offline.reference import SafeInferReference


def test_compiled_mixed_batch_matches_reference(engine_pool, tiny_assets):
    assets = tiny_assets("tiny-qwen2")
    llm = engine_pool.get(
        f"compiled:{assets.model}",
        lambda: new_llm(assets.model, enforce_eager=False,
                        additional_config={"safeinfer": assets.safeinfer_config()}),
    )
    rows = [(PROMPTS[i % len(PROMPTS)], MIXED_CASES[i % len(MIXED_CASES)]) for i in range(10)]
    prompts = [p for p, _ in rows]
    got = vllm_generate(llm, prompts, [sampling(c) for _, c in rows])
    reference = SafeInferReference.from_pretrained(assets.model, assets.expert)
    assert got == reference_generate(reference, assets, prompts, [c for _, c in rows])
