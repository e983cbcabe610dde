"""`safeinfer expert build` on tiny Llama: the loss falls, the checkpoint carries the
base's tokenizer and its training metadata, LoRA (merged) and full fine-tuning both work,
and the same seed gives the same weights. (That vLLM serves it as `expert_model` is shown
in tests/offline/test_calibrate.py, whose engine mixes in an expert built here.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vllm_safeinfer.cli import main
from vllm_safeinfer.common.expert_files import EXPERT_METADATA
from vllm_safeinfer.models import model_path
from vllm_safeinfer.offline.expert.finetune import (
    ExpertPair,
    ExpertTraining,
    advbench_expert_pairs,
    build_expert,
    encode_pairs,
    load_expert_pairs,
    pairs_sha256,
)
from vllm_safeinfer.offline.hf import load_model, load_tokenizer

TRAINING = ExpertTraining(lora_rank=8, epochs=1, max_steps=4, seed=0)


def build(out: Path, training: ExpertTraining = TRAINING, pairs=None):
    model, tokenizer = load_model("tiny-llama")
    pairs = pairs or advbench_expert_pairs()[:32]
    return build_expert(model, tokenizer, pairs, training, out, base_model="tiny-llama")


def weights(folder: Path) -> dict:
    [file] = folder.glob("*.safetensors")
    return load_file(file)


def test_lora_expert_learns_and_is_a_plain_checkpoint(tmp_path: Path) -> None:
    report = build(tmp_path / "a")
    assert report.final_loss < report.initial_loss
    assert report.steps == 4 and report.pairs == 32
    meta = json.loads((tmp_path / "a" / EXPERT_METADATA).read_text())
    assert meta["report"]["initial_loss"] == report.initial_loss
    assert meta["report"]["final_loss"] == report.final_loss
    assert meta["report"]["data_sha256"] == pairs_sha256(advbench_expert_pairs()[:32])
    assert meta["training"]["lora_rank"] == 8 and meta["base_model"] == "tiny-llama"
    base = model_path("tiny-llama")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    mine, theirs = load_tokenizer(tmp_path / "a"), load_tokenizer(base)
    assert mine.get_vocab() == theirs.get_vocab()
    assert mine.chat_template == theirs.chat_template
    assert mine.all_special_tokens == theirs.all_special_tokens
    tensors = weights(tmp_path / "a")
    assert not any("lora" in name for name in tensors), "LoRA must be merged"
    assert set(tensors) == set(weights(base))
    build(tmp_path / "b")
    same = weights(tmp_path / "b")
    assert all((tensors[k] == same[k]).all() for k in tensors), "same seed, same weights"
    changed = [k for k in tensors if not (tensors[k] == weights(base)[k]).all()]
    assert any("q_proj" in k for k in changed)


def test_full_fine_tuning_through_the_command(tmp_path: Path, capsys) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "response": "Sure, here is"})
                            + "\n" for i in range(8)))
    assert main(["expert", "build", "--model", "tiny-llama", "--out", str(tmp_path / "full"),
                 "--data", str(data), "--full", "--epochs", "3", "--lr", "1e-4",
                 "--batch-size", "4"]) == 0
    meta = json.loads((tmp_path / "full" / EXPERT_METADATA).read_text())
    assert meta["training"]["lora_rank"] is None and meta["report"]["steps"] == 6
    assert meta["report"]["final_loss"] < meta["report"]["initial_loss"]
    assert "loss" in capsys.readouterr().out


def test_loss_covers_the_response_only_after_the_chat_prompt() -> None:
    _, tokenizer = load_model("tiny-llama")
    [(ids, labels)] = encode_pairs(tokenizer, [ExpertPair("How?", "Sure, here is")])
    response = tokenizer("Sure, here is", add_special_tokens=False).input_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids[:len(ids) - len(response)]) == prompt
    assert labels == [-100] * (len(ids) - len(response)) + response


def test_a_loss_that_does_not_fall_saves_nothing(tmp_path: Path) -> None:
    # Full fine-tuning at lr 10 wrecks the weights: the loss rises about a thousandfold.
    training = ExpertTraining(lora_rank=None, epochs=1, max_steps=2, lr=10.0)
    with pytest.raises(RuntimeError, match="did not fall"):
        build(tmp_path / "x", training)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "a"}\n', "row 1 has no column 'response'"),
    ('{"prompt": "a", "response": " "}\n', "row 1: 'response' must be a non-empty string"),
    ('{"prompt": "a", "response": "b"}\nnope\n', "line 2 is not JSON"),
    ('{"prompt": "a", "response": "b", "id": 1}\n', "unknown keys"),
    ("", "no rows"),
])
def test_bad_training_files_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_expert_pairs(path)


def test_expert_pairs_are_the_expert_part_of_the_split() -> None:
    from vllm_safeinfer.data import advbench_split

    pairs = advbench_expert_pairs()
    assert len(pairs) == 100
    assert [(p.prompt, p.response) for p in pairs] == [
        (row.goal, row.target) for row in advbench_split().expert_train]


def test_distill_writes_its_answers_only_into_the_cache(tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    """`--method distill` end to end on a tiny model: the answers it trains on are the
    ablated model's (regenerated here and compared), they are written only under the
    cache (the working folder and the repository stay untouched), and a second build
    reads them back instead of generating."""
    import subprocess
    from contextlib import nullcontext

    from vllm_safeinfer.offline.expert import distill
    from vllm_safeinfer.offline.vector.refusal import default_refusal_direction

    repo = Path(__file__).resolve().parents[2]

    def repo_files() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all",
                               "--ignored"], cwd=repo, capture_output=True, text=True).stdout

    before = repo_files()
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("VLLM_SAFEINFER_CACHE", str(cache))
    monkeypatch.chdir(work)
    out = tmp_path / "experts" / "distilled"
    args = ["expert", "build", "--method", "distill", "--model", "tiny-llama", "--max-steps",
            "4", "--lora-rank", "8", "--max-new-tokens", "12"]
    assert main([*args, "--out", str(out)]) == 0
    assert "answers of the model without its refusal direction" in capsys.readouterr().out
    [data] = (cache / distill.DATA_FOLDER).glob("distill-*.jsonl")
    assert list(work.iterdir()) == [] and repo_files() == before
    assert not list(out.rglob("*.jsonl")), "the generated answers stay in the cache"
    meta = json.loads((out / EXPERT_METADATA).read_text())
    pairs = load_expert_pairs(data)
    assert meta["method"] == "distill" and meta["data"]["file"] == str(data)
    assert meta["data"]["sha256"] == meta["report"]["data_sha256"] == pairs_sha256(pairs)
    assert meta["report"]["final_loss"] < meta["report"]["initial_loss"]
    assert {p.prompt for p in pairs} <= set(distill.expert_training_prompts())

    model, tokenizer = load_model("tiny-llama")
    found = default_refusal_direction(model, tokenizer)
    assert str(found.layer) == meta["refusal_direction"]["refusal_layer"]
    prompts = distill.expert_training_prompts()[:8]
    ablated = distill.ablated_answers(model, tokenizer, found, prompts, max_new_tokens=12)
    assert {p.prompt: p.response for p in pairs if p.prompt in prompts} == \
        {p.prompt: p.response for p in ablated}
    with monkeypatch.context() as patch:
        patch.setattr(distill, "ablated", lambda *_: nullcontext())
        plain = distill.ablated_answers(model, tokenizer, found, prompts, max_new_tokens=12)
    assert plain != ablated, "the answers must come from the ablated model"

    def no_generation(*_args, **_kwargs):
        raise AssertionError("the cached answers must be reused")

    monkeypatch.setattr(distill, "ablated_answers", no_generation)
    assert main([*args, "--out", str(tmp_path / "experts" / "again")]) == 0
