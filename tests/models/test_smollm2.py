"""The embedded real model: SmolLM2-135M-Instruct (weights dequantised from Q4_1) loads in
vLLM, generates, and steering with the bundled safety vector matches the HF reference."""
from __future__ import annotations

import pytest

from tests.engines import new_llm
from tests.parity import vllm_generate
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.vectors import SafetyVector, bundled_vector_path
from vllm_safeinfer.models import SMOLLM2, chat_prompt_ids, model_path
from vllm_safeinfer.offline.reference import RowSettings, SafeInferReference

QUESTIONS = ["What is the capital of France?", "Write a poem about the sea.",
             "Explain how to pick a lock.", "Give me three tips for sleeping well."]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2(engine_pool):
    path = str(model_path(SMOLLM2))
    vector = str(bundled_vector_path(SMOLLM2))
    llm = engine_pool.get("eager:smollm2", lambda: new_llm(
        path, max_model_len=1024, additional_config={"safeinfer": {"vector": vector}}))
    reference = SafeInferReference.from_pretrained(path)
    prompts = chat_prompt_ids(reference.tokenizer, QUESTIONS)
    return llm, reference, prompts, SafetyVector.load(vector)


def _params(**extra_args):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra_args)


def test_smollm2_generates_text(smollm2):
    llm, reference, prompts, _ = smollm2
    outputs = vllm_generate(llm, prompts, _params())
    assert outputs == reference.generate(prompts, RowSettings(), MAX_TOKENS)
    text = reference.tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.parametrize("gamma", [None, 2.0])
def test_smollm2_steering_matches_reference(smollm2, gamma):
    llm, reference, prompts, vector = smollm2
    extra = {"safeinfer_mode": "sa"} | ({} if gamma is None else {"safeinfer_gamma": gamma})
    got = vllm_generate(llm, prompts, _params(**extra))
    settings = RowSettings(Mode.SA, vector=vector.vector, layer=vector.layer,
                           gamma=vector.gamma if gamma is None else gamma)
    assert got == reference.generate(prompts, settings, MAX_TOKENS)
    assert got != vllm_generate(llm, prompts, _params(safeinfer_mode="off"))
