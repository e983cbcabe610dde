"""`safeinfer expert build` on tiny Llama: the loss falls, the checkpoint carries the
base's tokenizer and its training metadata, LoRA (merged) and full fine-tuning both work,
and the same seed gives the same weights. (That vLLM serves it as `expert_model` is shown
in tests/test_calibrate.py, whose engine mixes in an expert built here.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vllm_safeinfer.cli import main
from vllm_safeinfer.models import model_path
from vllm_safeinfer.offline.expert import (
    METADATA, ExpertPair, ExpertTraining, advbench_expert_pairs, build_expert, encode_pairs,
    load_expert_pairs, pairs_sha256)
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
    meta = json.loads((tmp_path / "a" / METADATA).read_text())
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
    meta = json.loads((tmp_path / "full" / METADATA).read_text())
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
