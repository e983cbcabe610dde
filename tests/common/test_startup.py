"""Start-up refuses what it cannot serve, with a message that names the problem, before
any engine process starts."""
from __future__ import annotations

import shutil

import pytest

from tests.engines import new_llm
from vllm_safeinfer.models import model_path


def test_expert_with_another_vocabulary_is_refused(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    assets = tiny_assets("tiny-llama")
    # The same weights with one token renamed: same size, other vocabulary.
    expert = tmp_path / "other-vocab-expert"
    tokenizer = AutoTokenizer.from_pretrained(assets.expert)
    tokenizer.add_tokens(["<|other|>"])
    shutil.copytree(assets.expert, expert)
    tokenizer.save_pretrained(expert)
    with pytest.raises(ValueError, match="another vocabulary"):
        new_llm(assets.model, additional_config={"safeinfer": {"expert_model": str(expert)}})


def test_vector_for_another_model_is_refused(tiny_assets):
    llama = tiny_assets("tiny-llama")
    with pytest.raises(ValueError, match=r"tiny-llama-a\.safetensors.*(hidden_size|num_layers)"):
        new_llm(str(model_path("smollm2-135m-instruct")),
                additional_config={"safeinfer": {"vector": llama.vectors["a"]}})


def test_layer_outside_the_model_is_refused(tiny_assets):
    assets = tiny_assets("tiny-llama")
    with pytest.raises(ValueError, match=r"layers \[9\] are outside"):
        new_llm(assets.model, additional_config={"safeinfer": {"vector": assets.vectors["a"],
                                                               "layer": 9}})


@pytest.mark.parametrize("config,message", [
    ({"mode": "sgds"}, "needs an expert model"),
    ({"mode": "sa"}, "needs a safety vector"),
    ({"gamma": "high"}, "safeinfer.gamma must be a number"),
    ({"colour": "red"}, "unknown safeinfer config key"),
    ({"vector": "/nonexistent.safetensors"}, "does not exist"),
])
def test_bad_server_config_is_refused(tiny_assets, config, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        new_llm(tiny_assets("tiny-llama").model, additional_config={"safeinfer": config})


def test_prompt_embeddings_are_refused(tiny_assets):
    assets = tiny_assets("tiny-llama")
    with pytest.raises(ValueError, match=r"SafeInfer cannot serve prompt embeddings \(--enable-prompt-embeds"):
        new_llm(assets.model, enable_prompt_embeds=True,
                additional_config={"safeinfer": {"vector": assets.vectors["a"]}})


def test_vector_for_a_look_alike_model_is_refused(tiny_assets, tmp_path):
    """Same shape, other weights (one head's o_proj changed): the recorded fingerprint
    catches it before the engine starts, unless the operator allows it."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file, save_file

    from vllm_safeinfer.common.model_identity import check_vector_model, checkpoint_fingerprint
    from vllm_safeinfer.common.vectors import SafetyVector

    assets = tiny_assets("tiny-llama")
    original = model_path("tiny-llama")
    vector = SafetyVector(
        vector=torch.ones(assets.hidden_size), layer=1, model="tiny-llama",
        hidden_size=assets.hidden_size, num_layers=4, heads=((1, 0),),
        model_fingerprint=checkpoint_fingerprint(original))
    vector.save(tmp_path / "sv.safetensors")
    vector = SafetyVector.load(tmp_path / "sv.safetensors")
    look_alike = tmp_path / "look-alike"
    shutil.copytree(original, look_alike)
    [weights_file] = look_alike.glob("*.safetensors")
    weights = load_file(weights_file)
    weights["model.layers.1.self_attn.o_proj.weight"][0, 0] += 1e-3
    save_file(weights, weights_file, metadata={"format": "pt"})
    check_vector_model(vector, SimpleNamespace(model=str(original)), allow_other_model=False)
    check_vector_model(vector, SimpleNamespace(model=str(look_alike)), allow_other_model=True)
    with pytest.raises(ValueError, match=r"sv\.safetensors was built for 'tiny-llama', whose "
                       r"weights differ .*allow_other_model_vectors: true"):
        new_llm(str(look_alike),
                additional_config={"safeinfer": {"vector": str(tmp_path / "sv.safetensors")}})
