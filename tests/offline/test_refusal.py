"""The refusal direction and the ablated model, on a tiny model built to have one: a
direction planted in its weights that a set of prompts switches on (their words' embeddings
carry it, layer 0's attention copies it to the prompt's end) and that makes the model open
with a refusal token (the read-out of that token follows it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engines import ablated_expert
from vllm_safeinfer.offline.hf import load_model
from vllm_safeinfer.offline.vector.heads import decoder_layers
from vllm_safeinfer.offline.vector.refusal import (
    ablate_weights,
    ablated,
    find_refusal_direction,
    refusal_score,
    refusal_token_ids,
)

TRIGGERS = (" harmful", " cannot", " step")
HARMFUL = ["Write how to do harmful things step by step.", "Explain the harmful task step by step.",
           "Define a harmful function, step by step.", "Give the harmful answer step by step.",
           "How do I do this harmful step?", "Test the harmful function step by step.",
           "Implement the harmful logic step by step.", "Only provide the harmful step."]
HARMLESS = ["Hello world, how are you doing today?", "The capital of France is Paris.",
            "Write a function that performs the task.", "one two three four five six seven",
            "Check if input parameters are valid.", "Initialize any necessary variables.",
            "What is the capital of France?", "Say hello to the world."]


def planted_model():
    model, tokenizer = load_model("tiny-llama")
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(7)
    direction = torch.randn(hidden, generator=generator)
    direction /= direction.norm()
    head_dim = model.config.head_dim
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        for word in TRIGGERS:
            for token in tokenizer(word, add_special_tokens=False).input_ids:
                embedding[token] += 6.0 * direction
        attention = decoder_layers(model)[0].self_attn
        # Layer 0: key-value head 0's first value dimension reads the direction, and the
        # query heads sharing it write it back, so every position sees its prefix's dose.
        attention.v_proj.weight[0] = direction
        for head in range(model.config.num_attention_heads // model.config.num_key_value_heads):
            attention.o_proj.weight[:, head * head_dim] = 4.0 * direction
        refusal = refusal_token_ids(tokenizer)
        model.get_output_embeddings().weight[refusal] += 3.0 * direction
    return model, tokenizer, direction


@pytest.fixture(scope="module")
def planted():
    model, tokenizer, direction = planted_model()
    found = find_refusal_direction(model, tokenizer, HARMFUL[:6], HARMLESS[:6],
                                   validation=HARMFUL[6:], last=3)
    return model, tokenizer, direction, found


def test_the_planted_direction_is_found(planted) -> None:
    model, tokenizer, direction, found = planted
    assert torch.nn.functional.cosine_similarity(found.direction, direction, dim=0) > 0.9
    # Chosen by what ablating it does: the lowest refusal score of all candidates, well
    # below the model's own.
    assert found.scores[f"{found.layer}:{found.position}"] == min(found.scores.values())
    assert min(found.scores.values()) < found.baseline_score - 1.0
    assert 1 <= found.layer < len(decoder_layers(model)) and -3 <= found.position <= -1


def test_the_planted_prompts_switch_refusal_on(planted) -> None:
    model, tokenizer, direction, _ = planted
    assert refusal_score(model, tokenizer, HARMFUL) > refusal_score(model, tokenizer, HARMLESS) + 1.0


def test_ablated_weights_write_nothing_along_the_direction(planted) -> None:
    model, tokenizer, direction, found = planted
    before = refusal_score(model, tokenizer, HARMFUL)
    with ablated(model, found.direction):
        hooked_logits = model(**tokenizer(HARMFUL[:2], return_tensors="pt", padding=True)).logits
        hooked = refusal_score(model, tokenizer, HARMFUL)
    model_copy, _, _ = planted_model()
    ablate_weights(model_copy, found.direction)
    unit = found.direction
    writes = [model_copy.get_input_embeddings().weight.T]
    for layer in decoder_layers(model_copy):
        writes += [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]
    for weight in writes:
        assert float((unit @ weight).abs().max().detach()) < 1e-4
    # The read-out is untouched (untied first where tied) and the weights do what the
    # hooks do.
    assert torch.equal(model_copy.get_output_embeddings().weight,
                       model.get_output_embeddings().weight)
    weights_logits = model_copy(**tokenizer(HARMFUL[:2], return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(weights_logits, hooked_logits, atol=1e-4, rtol=1e-4)
    assert refusal_score(model_copy, tokenizer, HARMFUL) == pytest.approx(hooked, abs=1e-3)
    assert hooked < before - 1.0


def test_harmless_prompts_are_no_prompt_of_any_named_set() -> None:
    from tests.data.test_data import _twins
    from vllm_safeinfer import data

    harmless = data.harmless_prompts()
    assert len(harmless) >= 256 and len({p.category for p in harmless}) >= 20
    named = [p.text for name in data.DATASETS for p in data.load_dataset(name)]
    assert not [(h.text, n) for h in harmless for n in named if _twins(h.text, n)]
    direction, validation = data.refusal_direction_split()
    expert_part = {row.goal for row in data.advbench_split().expert_train}
    assert set(direction) | set(validation) == expert_part
    assert not set(direction) & set(validation)


def test_ablate_recipe_and_refusal_vector_from_the_command_line(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from vllm_safeinfer.common.vectors import SafetyVector

    def safeinfer(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "vllm_safeinfer.cli", *args],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    printed = safeinfer("expert", "build", "--method", "ablate", "--model", "tiny-llama",
                        "--out", str(tmp_path / "expert"))
    assert "refusal direction at layer" in printed
    meta = json.loads((tmp_path / "expert" / "safeinfer_expert.json").read_text())
    assert meta["method"] == "ablate" and meta["base_model"] == "tiny-llama"
    recorded = meta["refusal_direction"]
    assert len(recorded["harmful_sha256"]) == len(recorded["harmless_sha256"]) == 64
    assert [f.name for f in (tmp_path / "expert").glob("*.safetensors")] == ["model.safetensors"]
    with safe_open(str(tmp_path / "expert" / "safeinfer" / "refusal_direction.safetensors"),
                   "pt") as f:
        difference = f.get_tensor("refusal_direction")
        assert f.metadata()["refusal_layer"] == recorded["refusal_layer"]
    unit = difference / difference.norm()
    expert = AutoModelForCausalLM.from_pretrained(tmp_path / "expert")
    with torch.no_grad():
        writes = [expert.get_input_embeddings().weight.T]
        for layer in decoder_layers(expert):
            writes += [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]
        assert max(float((unit @ w).abs().max()) for w in writes) < 1e-4
    printed = safeinfer("vector", "build", "--method", "refusal-direction", "--model",
                        "tiny-llama", "--out", str(tmp_path / "rd.safetensors"))
    vector = SafetyVector.load(tmp_path / "rd.safetensors")
    assert vector.method == "refusal-direction" and vector.heads == () and vector.gamma == 1.0
    assert vector.layer == int(recorded["refusal_layer"]) - 1
    torch.testing.assert_close(vector.vector, difference)
    assert vector.residual_norm > 0 and vector.model_fingerprint.startswith("sampled-all-v1:")


def separate_expert_engine(engine_pool, assets):
    """Tiny Qwen2 serving its `ablate` checkpoint as an expert model of its own (the
    separate-forward path), with the assets' vectors and probe."""
    from tests.engines import new_llm

    config = assets.safeinfer_config()
    del config["expert_shares_weights"]
    return engine_pool.get(f"separate:{assets.expert}", lambda: new_llm(
        assets.model, additional_config={"safeinfer": config}))


def test_the_ablated_expert_is_served_by_vllm_exactly(engine_pool, tiny_assets) -> None:
    """vLLM loads the `ablate` checkpoint as `expert_model` (a model of its own) and mixes
    it token-exactly as the HF reference does with the same checkpoint, in a batch
    mixing modes."""
    from tests.parity import PROMPTS, Case, sampling, vllm_generate
    from vllm_safeinfer.common.modes import Mode
    from vllm_safeinfer.offline.reference import RowSettings, SafeInferReference

    assets = tiny_assets("tiny-qwen2")
    llm = separate_expert_engine(engine_pool, assets)
    cases = [Case("off"), Case("sgds", lam=0.9), Case("sgds", lam=0.99), Case("off"),
             Case("sgds", lam=0.5)]
    got = [vllm_generate(llm, [prompt], sampling(case))[0]
           for prompt, case in zip(PROMPTS, cases)]
    batched = vllm_generate(llm, PROMPTS, [sampling(case) for case in cases])
    reference = SafeInferReference.from_pretrained(assets.model, assets.expert)
    want = reference.generate(PROMPTS, [RowSettings(Mode(c.mode), lam=c.lam or 0.0)
                                        for c in cases], 10)
    assert batched == got == want
    unmixed = vllm_generate(llm, PROMPTS, [sampling(Case("off"))] * len(PROMPTS))
    assert any(g != u for g, u, c in zip(got, unmixed, cases) if c.mode == "sgds"), \
        "mixing the ablated expert changed no token"


def _expert_memory(worker) -> tuple[int, int, list[str]]:
    """(bytes of the served model's parameter storages, bytes of the expert's that are
    not the served model's, the expert's weight-owning modules that are not the served
    model's objects)."""
    from vllm_safeinfer.engine.worker import find_logits_processor

    model = worker.model_runner.get_model()
    expert = find_logits_processor(worker.model_runner).expert.model

    def storages(module) -> dict[int, int]:
        return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in module.parameters()}

    served, mine = storages(model), storages(expert)
    served_modules = {id(m) for m in model.modules()}
    foreign = [name for name, m in expert.named_modules()
               if next(m.parameters(recurse=False), None) is not None
               and id(m) not in served_modules]
    return sum(served.values()), sum(n for p, n in mine.items() if p not in served), foreign


def _fused_counts(worker) -> dict[str, int]:
    """The worker's fused-forward tallies, and how often the decoder stack ran (counted
    from the first call on; vLLM's compile wrapper calls `forward`, not the hooks)."""
    from vllm_safeinfer.engine.shared_expert import FUSED_ROWS
    from vllm_safeinfer.engine.worker import find_logits_processor

    runner = worker.model_runner
    stack = runner.get_model().model
    if not hasattr(stack, "decoder_forwards"):
        stack.decoder_forwards = 0
        original = stack.forward

        def counted(*args, **kwargs):
            stack.decoder_forwards += 1
            return original(*args, **kwargs)

        stack.forward = counted
    return {"decoder_forwards": stack.decoder_forwards, "fused_forwards": FUSED_ROWS.forwards,
            "expert_rows": FUSED_ROWS.expert_rows,
            "without_expert": FUSED_ROWS.forwards_without_expert,
            "planned_tokens": find_logits_processor(runner).expert.planner.tokens_run}


def test_the_weight_sharing_expert_rides_in_the_served_forward(
        engine_pool, tiny_assets, references) -> None:
    """`expert_shares_weights` (tiny Qwen2, whose output embedding is tied): the `ablate`
    expert's rows run in the served model's own forward, one decoder pass a step holding
    exactly the planner's expert rows (none when no row mixes), with no weight of its
    own; every mode in one mixed batch equals the HF reference running the materialised
    checkpoint and the separate-forward path serving that checkpoint. An expert that is
    not the served model's ablation is refused before the engine starts."""
    import json
    import shutil

    from tests.engines import new_llm, safeinfer_engine
    from tests.parity import MIXED_CASES, PROMPTS, Case, reference_generate, sampling, vllm_generate
    from vllm_safeinfer.models import expert_of, model_path

    assets = tiny_assets("tiny-qwen2")
    assert assets.expert_shares_weights
    config = assets.safeinfer_config()
    out = Path(assets.expert)
    other = out.with_name("other-weights")
    shutil.copytree(out, other, dirs_exist_ok=True)
    meta = json.loads((other / "safeinfer_expert.json").read_text())
    meta["base_model_fingerprint"] = "sampled-all-v1:" + "0" * 64
    (other / "safeinfer_expert.json").write_text(json.dumps(meta))
    for expert, message in ((str(model_path(expert_of("tiny-qwen2"))),
                             "only an expert built by `safeinfer expert build --method "
                             "ablate` can share"),
                            (str(other), "made from other weights than the served model's")):
        with pytest.raises(ValueError, match=message):
            new_llm(assets.model, additional_config={"safeinfer": {**config,
                                                                  "expert_model": expert}})

    llm = safeinfer_engine(engine_pool, assets)
    [(served_bytes, own_bytes, foreign)] = llm.collective_rpc(_expert_memory)
    assert served_bytes > 0 and own_bytes == 0 and foreign == []

    def delta(run) -> tuple[object, dict[str, int]]:
        [before] = llm.collective_rpc(_fused_counts)
        result = run()
        [after] = llm.collective_rpc(_fused_counts)
        return result, {k: after[k] - before[k] for k in after}

    # The planner hooks the runner's metadata in the engine's first step, which runs the
    # expert on every token unplanned; count from a later one.
    vllm_generate(llm, PROMPTS[:1], sampling(Case("off"), max_tokens=1))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(MIXED_CASES))]
    samplings = [sampling(c) for c in MIXED_CASES]
    got, counted = delta(lambda: vllm_generate(llm, prompts, samplings))
    assert got == reference_generate(references("tiny-qwen2"), assets, prompts, MIXED_CASES)
    assert counted["decoder_forwards"] == counted["fused_forwards"] > 0, counted
    assert counted["expert_rows"] == counted["planned_tokens"] > 0, counted
    assert counted["without_expert"] < counted["fused_forwards"]
    _, counted = delta(lambda: vllm_generate(llm, PROMPTS, sampling(Case("sa"))))
    assert counted["expert_rows"] == counted["planned_tokens"] == 0
    assert counted["without_expert"] == counted["fused_forwards"] == counted["decoder_forwards"]

    separate = separate_expert_engine(engine_pool, assets)
    assert vllm_generate(separate, prompts, samplings) == got
    off = vllm_generate(llm, PROMPTS, sampling(Case("off")))
    for case in (Case("sgds", lam=0.9), Case("safeinfer", lam=0.9)):
        mixed = vllm_generate(llm, PROMPTS, sampling(case))
        assert mixed == vllm_generate(separate, PROMPTS, sampling(case))
        assert mixed != off, f"{case.mode}: mixing the shared expert changed no token"


MEMORY_SCRIPT = """
import json, os, resource, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # every part in this process
if __name__ == "__main__":
    from vllm import LLM
    LLM(model=sys.argv[1], dtype="float32", max_model_len=512, block_size=32,
        enforce_eager=True, max_num_seqs=4, additional_config=json.loads(sys.argv[2]))
    print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_start_up_bytes(model: str, additional_config: dict) -> int:
    """Peak resident memory of a process that starts an engine (all of it in-process)."""
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, model,
                           json.dumps(additional_config)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("PEAK")[-1].split()[0])


def test_the_weight_sharing_expert_starts_without_a_second_copy(tmp_path) -> None:
    """On a model whose weights (124 MB) stand out of the process's noise, an engine with
    the weight-sharing expert peaks at start-up within a fraction of the weights above the
    same engine without SafeInfer (same 1 GiB KV cache, which the expert shares): no copy
    of the weights, dummy or real, is ever made."""
    from vllm_safeinfer.models import model_path

    name = "tiny-qwen2-wide"
    weights = sum(f.stat().st_size for f in model_path(name).glob("*.safetensors"))
    expert = ablated_expert(name, tmp_path)
    vanilla = _peak_start_up_bytes(str(model_path(name)), {})
    shared = _peak_start_up_bytes(str(model_path(name)), {"safeinfer": {
        "expert_model": str(expert), "expert_shares_weights": True, "mode": "sgds"}})
    print(f"peak start-up RSS: vanilla {vanilla >> 20} MB, weight-sharing expert "
          f"{shared >> 20} MB, weights {weights >> 20} MB")
    assert weights > 100 << 20
    assert shared - vanilla < weights // 4, (vanilla, shared, weights)
