"""GPU-only (deselected by default; `make test PYTEST_ARGS='-m gpu'` on an NVIDIA machine):
CUDA graphs (vLLM's default FULL_AND_PIECEWISE capture) with the fused Triton steering and
mixing kernels compiled for real give the HF reference's tokens."""
from __future__ import annotations

import pytest

from tests.engines import new_llm
from tests.parity import MIXED_CASES, PROMPTS, reference_generate, sampling, vllm_generate

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_cuda_graphs_mixed_batch_matches_reference(engine_pool, tiny_assets, references, name):
    import torch

    assert torch.cuda.is_available(), "the gpu marker needs an NVIDIA GPU"
    assets = tiny_assets(name)
    llm = engine_pool.get(f"cudagraph:{assets.model}", lambda: new_llm(
        assets.model, enforce_eager=False, gpu_memory_utilization=0.3,
        additional_config={"safeinfer": assets.safeinfer_config()}))
    rows = [(PROMPTS[i % len(PROMPTS)], MIXED_CASES[i % len(MIXED_CASES)]) for i in range(14)]
    prompts = [p for p, _ in rows]
    got = vllm_generate(llm, prompts, [sampling(c) for _, c in rows])
    assert got == reference_generate(references(name), assets, prompts, [c for _, c in rows])
