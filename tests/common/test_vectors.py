"""Safety vectors: building on two tiny architectures (checked against independent
recomputations), the safetensors file format and its validation, the CLI, and the
bundled SmolLM2-135M-Instruct vector."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_safeinfer.cli import main
from vllm_safeinfer.common.model_identity import (
    SCHEME,
    check_vector_model,
    checkpoint_fingerprint,
    module_fingerprint,
)
from vllm_safeinfer.common.vectors import (
    SafetyVector,
    bundled_vector_path,
    format_heads,
    parse_heads,
)
from vllm_safeinfer.models import SMOLLM2, model_path, tiny_tokenizer
from vllm_safeinfer.offline.hf import load_causal_lm, load_model
from vllm_safeinfer.offline.vector.builder import METHOD_AIE, METHOD_GIVEN, build_safety_vector
from vllm_safeinfer.offline.vector.demonstrations import (
    Demonstration,
    advbench_demonstrations,
    build_prompt_set,
    demos_sha256,
    load_demonstrations,
)
from vllm_safeinfer.offline.vector.heads import answer_token_id, prompt_activations, rank_heads

TINY = ("tiny-llama", "tiny-qwen2")
SMALL = {"prompts": 6, "shots": 3, "rank_prompts": 3, "seed": 0}
# In-memory random decoders for other architectures; head_dim 48 != hidden / heads.
RANDOM_SHAPE = {
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48,
}


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    model, tokenizer = load_model(request.param)
    return SimpleNamespace(name=request.param, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def demos() -> tuple[Demonstration, ...]:
    return advbench_demonstrations()


@pytest.fixture(scope="module")
def built(tiny, demos) -> SafetyVector:
    return build_safety_vector(
        tiny.model, tiny.tokenizer, demos, model_name=tiny.name, top_heads=3, **SMALL
    )


@pytest.fixture(scope="module")
def ranked(tiny, demos):
    prompts = build_prompt_set(demos, **SMALL)
    means = prompt_activations(tiny.model, tiny.tokenizer, [p.clean for p in prompts.mean]).heads
    ranking = rank_heads(tiny.model, tiny.tokenizer, prompts.rank, means, head_batch_size=5)
    return SimpleNamespace(prompts=prompts, means=means, ranking=ranking)


def _random_model(config) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _last_token_o_proj_inputs(model, tokenizer, text: str) -> list[torch.Tensor]:
    """Each layer's o_proj input at the last token, from one unpadded forward pass."""
    seen: list[torch.Tensor] = []
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda module, args: seen.append(args[0][0, -1].clone())
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokenizer(text).input_ids]))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _patched_effect(model, tokenizer, prompts, means, layer: int, head: int) -> float:
    """AIE of one head by full forward passes, without any KV cache."""
    d = means.shape[-1]
    o_proj = model.model.layers[layer].self_attn.o_proj
    vocab = len(tokenizer)

    def patch(module, args):
        x = args[0].clone()
        x[0, -1, head * d : (head + 1) * d] = means[layer, head]
        return (x,)

    total = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt.corrupted).input_ids])
            target = answer_token_id(tokenizer, prompt.corrupted, prompt.answer)
            base = torch.softmax(model(input_ids=ids).logits[0, -1, :vocab], -1)[target]
            handle = o_proj.register_forward_pre_hook(patch)
            try:
                patched = torch.softmax(model(input_ids=ids).logits[0, -1, :vocab], -1)[target]
            finally:
                handle.remove()
            total += float(patched - base)
    return total / len(prompts)


# Building


def test_vector_has_model_hidden_size(tiny, built) -> None:
    config = tiny.model.config
    assert built.vector.shape == (config.hidden_size,)
    assert built.vector.dtype == torch.float32
    assert built.hidden_size == config.hidden_size
    assert built.num_layers == config.num_hidden_layers
    assert built.layer == config.num_hidden_layers // 4
    assert len(built.heads) == 3 and built.method == METHOD_AIE
    assert list(built.head_effects) == sorted(built.head_effects, reverse=True)
    assert built.model == tiny.name


def test_same_seed_same_vector(tiny, demos, built) -> None:
    again = build_safety_vector(
        tiny.model, tiny.tokenizer, demos, model_name=tiny.name, top_heads=3, **SMALL
    )
    assert again == built
    other = build_safety_vector(
        tiny.model, tiny.tokenizer, demos, model_name=tiny.name, heads=built.heads,
        **{**SMALL, "seed": 1},
    )
    assert not torch.equal(other.vector, built.vector)


def _direct_vector(model, tokenizer, texts, heads) -> torch.Tensor:
    """SV from per-prompt hooks and o_proj weight slices, one unpadded prompt at a time."""
    per_prompt = [torch.stack(_last_token_o_proj_inputs(model, tokenizer, t)) for t in texts]
    mean = torch.stack(per_prompt).mean(dim=0)  # [layers, heads * head_dim]
    d = mean.shape[-1] // model.config.num_attention_heads
    expected = torch.zeros(model.config.hidden_size)
    for layer, head in heads:
        o_proj = model.model.layers[layer].self_attn.o_proj
        cols = slice(head * d, (head + 1) * d)
        expected += o_proj.weight[:, cols] @ mean[layer, cols]
        if o_proj.bias is not None:
            expected += o_proj.bias
    return expected.detach()


def test_explicit_heads_equal_direct_recomputation(tiny, demos) -> None:
    heads = ((0, 1), (2, 3), (3, 0))
    vector = build_safety_vector(
        tiny.model, tiny.tokenizer, demos, heads=heads, prompts=6, shots=3, seed=0
    )
    assert vector.heads == heads and vector.method == METHOD_GIVEN
    assert vector.head_effects == () and vector.rank_prompts == 0
    prompts = build_prompt_set(demos, prompts=6, shots=3, rank_prompts=0, seed=0).mean
    expected = _direct_vector(tiny.model, tiny.tokenizer, [p.clean for p in prompts], heads)
    torch.testing.assert_close(vector.vector, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "llama-biased"])
def test_other_architectures(arch: str, demos) -> None:
    """Mistral and Gemma-style decoders, with head_dim != hidden / heads and an o_proj
    bias, build vectors and rank heads that agree with the independent computations."""
    tokenizer = tiny_tokenizer()
    config = {
        "mistral": lambda: transformers.MistralConfig(**RANDOM_SHAPE, sliding_window=4096),
        "gemma3": lambda: transformers.Gemma3TextConfig(**RANDOM_SHAPE, sliding_window=4096),
        "llama-biased": lambda: transformers.LlamaConfig(**RANDOM_SHAPE, attention_bias=True),
    }[arch]()
    model = _random_model(config)
    heads = ((0, 3), (2, 1))
    vector = build_safety_vector(model, tokenizer, demos, heads=heads, prompts=3, shots=2)
    prompts = build_prompt_set(demos, prompts=3, shots=2, rank_prompts=2)
    expected = _direct_vector(model, tokenizer, [p.clean for p in prompts.mean], heads)
    torch.testing.assert_close(vector.vector, expected, atol=1e-5, rtol=0)
    means = prompt_activations(model, tokenizer, [p.clean for p in prompts.mean]).heads
    ranking = rank_heads(model, tokenizer, prompts.rank, means)
    effects = [
        _patched_effect(model, tokenizer, prompts.rank, means, e.layer, e.head)
        for e in (ranking[0], ranking[-1])
    ]
    assert effects == pytest.approx([ranking[0].effect, ranking[-1].effect], rel=1e-3, abs=1e-9)


def test_ranking_refuses_prompts_beyond_a_sliding_window(demos) -> None:
    model = _random_model(transformers.MistralConfig(**RANDOM_SHAPE, sliding_window=64))
    tokenizer = tiny_tokenizer()
    prompts = build_prompt_set(demos, prompts=1, shots=2, rank_prompts=1)
    means = prompt_activations(model, tokenizer, [p.clean for p in prompts.mean]).heads
    with pytest.raises(ValueError, match="exceeds the model's sliding window of 64 tokens"):
        rank_heads(model, tokenizer, prompts.rank, means)


def test_batched_activations_equal_unbatched(tiny, demos) -> None:
    texts = [p.clean for p in build_prompt_set(demos, prompts=5, shots=3, rank_prompts=0).mean]
    batched = prompt_activations(tiny.model, tiny.tokenizer, texts, batch_size=5)
    single = prompt_activations(tiny.model, tiny.tokenizer, texts, batch_size=1)
    torch.testing.assert_close(batched.heads, single.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.residual_norms, single.residual_norms, atol=1e-4, rtol=0)


def test_builder_fingerprint_equals_the_checkpoints(tiny, built) -> None:
    """In memory and from the files (tiny-qwen2 ties its output embedding, which its file
    does not store; tiny-llama stores both)."""
    assert built.model_fingerprint == checkpoint_fingerprint(model_path(tiny.name))
    scheme, _, digest = built.model_fingerprint.partition(":")
    assert (scheme, len(digest)) == (SCHEME, 64)


@torch.no_grad()
def test_residual_norm_is_the_steered_layer_output_norm(tiny, demos, built) -> None:
    """Recomputed with HF's own hidden states, one unpadded prompt at a time: the mean
    norm of layer L's output over every token but each prompt's first."""
    texts = [p.clean for p in build_prompt_set(demos, **SMALL).mean]
    norms = []
    for text in texts:
        ids = torch.tensor([tiny.tokenizer(text).input_ids])
        hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
        norms.append(hidden[built.layer + 1][0, 1:].norm(dim=-1))
    expected = torch.cat(norms).mean().item()
    assert built.residual_norm == pytest.approx(expected, rel=1e-5)
    assert built.relative_dose(2.0) == pytest.approx(
        2.0 * built.vector.norm().item() / expected, rel=1e-5)


def test_default_demonstrations_format(demos) -> None:
    assert len(demos) == 200
    assert all(d.input.startswith("Task: Write a function that performs the task ") for d in demos)
    assert {d.output for d in demos} == {"I do not answer this question because it is harmful"}
    assert all(d.compliant.startswith("Sure, here") for d in demos)
    prompt = build_prompt_set(demos, prompts=1, shots=2, rank_prompts=0).mean[0]
    blocks = prompt.clean.split("\n\n")
    assert len(blocks) == 3 and blocks[-1].startswith("Q: Task: ") and blocks[-1].endswith("\nA:")
    assert blocks[0].endswith("\nA: I do not answer this question because it is harmful")
    assert "\nA: Sure, here" in prompt.corrupted
    assert prompt.corrupted.split("\n\n")[-1] == blocks[-1]


# Ranking


def test_ranking_lists_every_head_once_sorted(tiny, ranked) -> None:
    config = tiny.model.config
    pairs = [(e.layer, e.head) for e in ranked.ranking]
    assert sorted(pairs) == [
        (layer, head)
        for layer in range(config.num_hidden_layers)
        for head in range(config.num_attention_heads)
    ]
    effects = [e.effect for e in ranked.ranking]
    assert effects == sorted(effects, reverse=True)


def test_ranking_is_deterministic(tiny, demos, ranked) -> None:
    prompts = build_prompt_set(demos, **SMALL)
    means = prompt_activations(tiny.model, tiny.tokenizer, [p.clean for p in prompts.mean]).heads
    again = rank_heads(tiny.model, tiny.tokenizer, prompts.rank, means, head_batch_size=5)
    assert again == ranked.ranking


def test_top_head_beats_last_head_independently(tiny, ranked) -> None:
    top, last = ranked.ranking[0], ranked.ranking[-1]
    prompts, means = ranked.prompts.rank, ranked.means
    effects = [
        _patched_effect(tiny.model, tiny.tokenizer, prompts, means, e.layer, e.head)
        for e in (top, last)
    ]
    assert effects[0] > effects[1]
    assert effects == pytest.approx([top.effect, last.effect], rel=1e-3, abs=1e-9)


# Demonstrations from a file


def test_user_demonstrations_get_another_rows_answer(tmp_path: Path) -> None:
    path = tmp_path / "demos.jsonl"
    rows = [{"input": "a", "output": "no"}, {"input": "b", "output": "no"},
            {"input": "c", "output": "sure", "compliant": "fine"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    demos = load_demonstrations(path)
    assert [d.compliant for d in demos] == ["sure", "sure", "fine"]


@pytest.mark.parametrize(
    ("line", "message"),
    [("not json", "line 2 is not JSON"), ('{"input": "a"}', "row 2 has no column 'output'"),
     ('{"input": "a", "output": ""}', "row 2: 'output' must be a non-empty string"),
     ('{"input": "a", "output": "b", "compliant": 3}', "row 2: 'compliant' must be"),
     ('{"input": "a", "output": "b", "x": 1}', r"row 2 has unknown keys \['x'\]")],
)
def test_bad_user_demonstrations_are_rejected(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "demos.jsonl"
    path.write_text(f'{{"input": "q", "output": "r"}}\n{line}\n')
    with pytest.raises(ValueError, match=message):
        load_demonstrations(path)


def test_identical_outputs_cannot_rank(tiny, tmp_path: Path) -> None:
    path = tmp_path / "demos.jsonl"
    rows = (json.dumps({"input": f"q{i}", "output": "no"}) for i in range(4))
    path.write_text("\n".join(rows) + "\n")
    demos = load_demonstrations(path)
    with pytest.raises(ValueError, match="compliant"):
        build_safety_vector(tiny.model, tiny.tokenizer, demos, **SMALL)


# CLI


def test_cli_builds_a_valid_vector(tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sv.safetensors"
    code = main(["vector", "build", "--model", str(model_path(tiny.name)), "--out", str(out),
                 "--prompts", "4", "--shots", "2", "--rank-prompts", "2", "--top-heads", "2"])
    assert code == 0
    vector = SafetyVector.load(out)
    vector.check_compatible(tiny.model.config)
    assert len(vector.heads) == 2 and vector.prompts == 4 and vector.rank_prompts == 2
    assert "saved" in capsys.readouterr().out


def test_cli_user_demos_and_given_heads(tiny, tmp_path: Path) -> None:
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(
        json.dumps({"input": f"question {i}", "output": "I refuse."}) + "\n" for i in range(5)
    ))
    out = tmp_path / "sv.safetensors"
    assert main(["vector", "build", "--model", tiny.name, "--out", str(out), "--demos", str(demos),
                 "--heads", "0:1,3:2", "--layer", "2", "--prompts", "3", "--shots", "2"]) == 0
    vector = SafetyVector.load(out)
    assert vector.heads == ((0, 1), (3, 2)) and vector.layer == 2
    assert vector.demos_sha256 == demos_sha256(load_demonstrations(demos))


def test_cli_rejects_bad_heads(tiny, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["vector", "build", "--model", tiny.name, "--out", str(tmp_path / "x.safetensors"),
              "--heads", "0:99"])
    assert exit_info.value.code == 2
    assert "outside the model" in capsys.readouterr().err


# File format


@pytest.fixture
def vector() -> SafetyVector:
    return SafetyVector(
        vector=torch.randn(16, generator=torch.Generator().manual_seed(0)),
        layer=1, model="some/model", hidden_size=16, num_layers=4,
        heads=((2, 1), (0, 3)), head_effects=(0.25, 0.125), gamma=0.5, seed=3,
        demos_sha256="ab" * 32, version="0.1.0", prompts=100, shots=10, rank_prompts=16,
    )


def _rewrite(src: Path, dst: Path, tensor: torch.Tensor, **meta: str) -> Path:
    with safe_open(str(src), framework="pt") as handle:
        metadata = {**handle.metadata(), **meta}
    save_file({"safety_vector": tensor}, str(dst), metadata=metadata)
    return dst


def test_save_load_round_trips_exactly(vector: SafetyVector, tmp_path: Path) -> None:
    path = tmp_path / "sv.safetensors"
    vector.save(path)
    loaded = SafetyVector.load(path)
    assert loaded == vector
    assert torch.equal(loaded.vector, vector.vector)
    assert loaded.heads == vector.heads and loaded.head_effects == vector.head_effects
    assert loaded.gamma == 0.5
    assert loaded.source == str(path)


def test_residual_norm_round_trips_and_is_validated(vector: SafetyVector, tmp_path: Path) -> None:
    """Files written before the norm was recorded (no `residual_norm` key, as `vector`
    saves) still load, with an unknown dose; a recorded norm must be finite and positive."""
    vector.save(tmp_path / "old.safetensors")
    with safe_open(str(tmp_path / "old.safetensors"), framework="pt") as handle:
        assert "residual_norm" not in handle.metadata()
    old = SafetyVector.load(tmp_path / "old.safetensors")
    assert old.residual_norm is None and old.relative_dose() is None
    assert "unknown (no residual_norm" in old.describe()
    path = _rewrite(tmp_path / "old.safetensors", tmp_path / "new.safetensors", vector.vector,
                    residual_norm="8.0")
    new = SafetyVector.load(path)
    assert new.residual_norm == 8.0
    assert new.relative_dose() == pytest.approx(0.5 * vector.vector.norm().item() / 8.0)
    new.save(tmp_path / "again.safetensors")
    assert SafetyVector.load(tmp_path / "again.safetensors") == new
    for bad, message in (("0", "finite positive"), ("-1", "finite positive"),
                         ("nan", "finite positive"), ("inf", "finite positive"),
                         ("big", "is not a number")):
        path = _rewrite(tmp_path / "old.safetensors", tmp_path / "bad.safetensors",
                        vector.vector, residual_norm=bad)
        with pytest.raises(ValueError, match=f"residual_norm.*{message}"):
            SafetyVector.load(path)


def test_steering_kind_and_layers_round_trip_as_version_2(vector: SafetyVector,
                                                          tmp_path: Path) -> None:
    """A vector that adds at its own layer stays a version 1 file; one that projects, or
    steers other layers, is version 2 with both recorded; a version 2 file without them,
    or with bad ones, is refused."""
    vector.save(tmp_path / "add.safetensors")
    with safe_open(str(tmp_path / "add.safetensors"), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1" and "steering" not in handle.metadata()
    plain = SafetyVector.load(tmp_path / "add.safetensors")
    assert (plain.steering, plain.layers, plain.projects) == ("add", (1,), False)
    projecting = dataclasses.replace(vector, steering="project", layers=(1, 2, 3),
                                     answer_tokens=8)
    projecting.save(tmp_path / "project.safetensors")
    with safe_open(str(tmp_path / "project.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["format_version"], meta["steering"], meta["layers"], meta["answer_tokens"]) == (
        "2", "project", "1,2,3", "8")
    loaded = SafetyVector.load(tmp_path / "project.safetensors")
    assert loaded == projecting and loaded.projects and loaded.layers == (1, 2, 3)
    assert loaded.answer_tokens == 8 and loaded != plain
    windowed = dataclasses.replace(vector, answer_tokens=2)
    windowed.save(tmp_path / "windowed.safetensors")
    assert SafetyVector.load(tmp_path / "windowed.safetensors").answer_tokens == 2
    for changes, message in (({"steering": None}, "must record steering and layers"),
                             ({"steering": "clamp"}, "steering must be one of add, project"),
                             ({"layers": ""}, "metadata layers: bad layer"),
                             ({"layers": "1-9"}, "within 0..3"),
                             ({"layers": "x"}, "metadata layers: bad layer"),
                             ({"answer_tokens": "-1"}, "answer_tokens must be an int >= 0"),
                             ({"answer_tokens": "many"}, "answer_tokens='many' is not an"),
                             ({"format_version": "3"}, "version '3' is not")):
        rewritten = {**meta, **changes}
        bad = tmp_path / "bad.safetensors"
        save_file({"safety_vector": vector.vector},
                  str(bad), metadata={k: v for k, v in rewritten.items() if v is not None})
        with pytest.raises(ValueError, match=message):
            SafetyVector.load(bad)
    with pytest.raises(ValueError, match="must be distinct, ascending"):
        dataclasses.replace(vector, layers=(2, 1))
    with pytest.raises(ValueError, match="no direction to project on"):
        dataclasses.replace(vector, vector=torch.zeros(16), steering="project")


def test_cli_converts_a_vector(vector: SafetyVector, tmp_path: Path, capsys) -> None:
    vector.save(tmp_path / "add.safetensors")
    out = tmp_path / "project.safetensors"
    assert main(["vector", "convert", str(tmp_path / "add.safetensors"), "--out", str(out),
                 "--steering", "project", "--layers", "1-2,3", "--gamma", "2.5",
                 "--answer-tokens", "6"]) == 0
    converted = SafetyVector.load(out)
    assert (converted.steering, converted.layers, converted.gamma, converted.answer_tokens) == (
        "project", (1, 2, 3), 2.5, 6)
    assert torch.equal(converted.vector, vector.vector) and converted.heads == vector.heads
    assert "project at layers [1, 2, 3]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["vector", "convert", str(tmp_path / "add.safetensors"), "--out",
              str(tmp_path / "bad.safetensors"), "--steering", "project", "--layers", "2-1"])
    assert exited.value.code == 2 and "runs backwards" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_load_rejects_nan(vector: SafetyVector, tmp_path: Path) -> None:
    vector.save(tmp_path / "ok.safetensors")
    bad = vector.vector.clone()
    bad[3] = float("nan")
    path = _rewrite(tmp_path / "ok.safetensors", tmp_path / "nan.safetensors", bad)
    with pytest.raises(ValueError, match=r"nan\.safetensors: vector has NaN"):
        SafetyVector.load(path)


def test_load_rejects_2d(vector: SafetyVector, tmp_path: Path) -> None:
    vector.save(tmp_path / "ok.safetensors")
    square = vector.vector.view(4, 4)
    path = _rewrite(tmp_path / "ok.safetensors", tmp_path / "2d.safetensors", square)
    with pytest.raises(ValueError, match=r"must be 1-D, got shape \(4, 4\)"):
        SafetyVector.load(path)


def test_load_rejects_hidden_size_mismatch(vector: SafetyVector, tmp_path: Path) -> None:
    vector.save(tmp_path / "ok.safetensors")
    path = _rewrite(tmp_path / "ok.safetensors", tmp_path / "h.safetensors", vector.vector,
                    hidden_size="32")
    with pytest.raises(ValueError, match="vector has 16 values but hidden_size is 32"):
        SafetyVector.load(path)


def test_load_rejects_layer_outside_model(vector: SafetyVector, tmp_path: Path) -> None:
    vector.save(tmp_path / "ok.safetensors")
    path = _rewrite(
        tmp_path / "ok.safetensors", tmp_path / "l.safetensors", vector.vector, layer="4"
    )
    with pytest.raises(ValueError, match="layer 4 is outside 0..3"):
        SafetyVector.load(path)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SafetyVector.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="exactly one tensor named 'safety_vector'"):
        SafetyVector.load(other)
    with pytest.raises(FileNotFoundError):
        SafetyVector.load(tmp_path / "missing.safetensors")


def test_check_compatible(vector: SafetyVector, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    vector.save(tmp_path / "sv.safetensors")
    loaded = SafetyVector.load(tmp_path / "sv.safetensors")
    loaded.check_compatible(SimpleNamespace(hidden_size=16, num_hidden_layers=4))
    loaded.check_compatible(LlamaConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=4))
    mismatch = r"sv\.safetensors .*hidden_size is 16 in the vector but 64"
    with pytest.raises(ValueError, match=mismatch):
        loaded.check_compatible(LlamaConfig(hidden_size=64, num_hidden_layers=4))
    vllm_like = SimpleNamespace(
        get_hidden_size=lambda: 16, hf_config=SimpleNamespace(num_hidden_layers=5)
    )
    with pytest.raises(ValueError, match="num_layers is 4 in the vector but 5 in the model"):
        loaded.check_compatible(vllm_like)


def test_parse_heads() -> None:
    assert parse_heads("14:1, 11:2") == ((14, 1), (11, 2))
    for text, message in (("14", "expected LAYER:HEAD"), ("1:x", "expected LAYER:HEAD"),
                          ("1:2,1:2", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_heads(text)


# Model fingerprint


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a one-file checkpoint whose weights `edit` changed in place."""
    shutil.copytree(src, dst)
    [file] = dst.glob("*.safetensors")
    weights = load_file(file)
    edit(weights)
    save_file(weights, file, metadata={"format": "pt"})
    return dst


def _low_rank_update(weights: dict[str, torch.Tensor], *names: str) -> None:
    """A merged rank-1 LoRA of small size: what a fine-tune does to a matrix."""
    generator = torch.Generator().manual_seed(0)
    for name in names:
        rows, cols = weights[name].shape
        left = torch.randn(rows, 1, generator=generator)
        weights[name] += 1e-3 * left @ torch.randn(1, cols, generator=generator)


@pytest.mark.parametrize("edited", [
    ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"),
    ("model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"),
], ids=["q-v-lora-of-the-steered-layer", "mlp-of-an-unsteered-layer"])
def test_vector_for_a_fine_tune_is_refused(edited: tuple[str, ...], tmp_path: Path,
                                           caplog) -> None:
    """Same shape, weights changed where the vector's heads are not (its o_proj and its
    layer's MLP untouched): the fingerprint covers every tensor, so it still differs."""
    original = model_path("tiny-llama")
    vector = SafetyVector(
        vector=torch.ones(256), layer=1, model="tiny-llama", hidden_size=256, num_layers=4,
        heads=((1, 0),), model_fingerprint=checkpoint_fingerprint(original))
    fine_tune = _edited_copy(original, tmp_path / "fine-tune",
                             lambda weights: _low_rank_update(weights, *edited))
    check_vector_model(vector, SimpleNamespace(model=str(original)), allow_other_model=False)
    with pytest.raises(ValueError, match=r"built for 'tiny-llama', whose weights differ .*"
                       r"allow_other_model_vectors: true"):
        check_vector_model(vector, SimpleNamespace(model=str(fine_tune)), allow_other_model=False)
    check_vector_model(vector, SimpleNamespace(model=str(fine_tune)), allow_other_model=True)
    assert "allowed by allow_other_model_vectors" in caplog.text


@pytest.mark.parametrize("recorded, named", [
    ("ab" * 32, "the unnamed o_proj-only scheme of earlier versions"),
    ("sampled-all-v9:" + "ab" * 32, "'sampled-all-v9'"),
])
def test_fingerprint_of_another_scheme_is_refused(recorded: str, named: str, caplog) -> None:
    """A fingerprint this version cannot recompute is not taken as a match."""
    vector = SafetyVector(
        vector=torch.ones(256), layer=1, model="tiny-llama", hidden_size=256, num_layers=4,
        heads=((1, 0),), model_fingerprint=recorded)
    served = SimpleNamespace(model=str(model_path("tiny-llama")))
    with pytest.raises(ValueError, match=rf"unknown scheme \({named}; this version computes "
                       rf"'{SCHEME}'\).*rebuild the vector; set `allow_other_model_vectors"):
        check_vector_model(vector, served, allow_other_model=False)
    check_vector_model(vector, served, allow_other_model=True)
    assert "unknown scheme" in caplog.text


def test_fingerprint_is_the_same_for_bf16_and_its_fp32_upcast(tmp_path: Path) -> None:
    """Files in bf16, the same values upcast to fp32, and the bf16 files loaded in fp32 by
    the builder all fingerprint alike; rounding to bf16 changes the fingerprint."""
    original = model_path("tiny-qwen2")

    def cast(dtype: torch.dtype):
        def edit(weights: dict[str, torch.Tensor]) -> None:
            for name, tensor in weights.items():
                weights[name] = tensor.to(torch.bfloat16).to(dtype)
        return edit

    bf16 = _edited_copy(original, tmp_path / "bf16", cast(torch.bfloat16))
    upcast = _edited_copy(original, tmp_path / "upcast", cast(torch.float32))
    assert checkpoint_fingerprint(bf16) == checkpoint_fingerprint(upcast)
    assert checkpoint_fingerprint(bf16) == module_fingerprint(load_causal_lm(str(bf16)))
    assert checkpoint_fingerprint(bf16) != checkpoint_fingerprint(original)


def test_fingerprint_reads_what_the_loaders_read(tmp_path: Path) -> None:
    """A tied output embedding stored anyway is skipped, as vLLM's loaders skip it; a
    sharded checkpoint reads its index's files only, not other copies in the folder."""
    original = model_path("tiny-qwen2")
    expected = checkpoint_fingerprint(original)

    def store_tied(weights: dict[str, torch.Tensor]) -> None:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()

    tied = _edited_copy(original, tmp_path / "tied", store_tied)
    assert checkpoint_fingerprint(tied) == expected
    sharded = tmp_path / "sharded"
    load_causal_lm(str(original)).save_pretrained(sharded, max_shard_size="4MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(sharded / "other.safetensors"))
    assert checkpoint_fingerprint(sharded) == expected


# Bundled vector


def test_bundled_smollm2_vector_matches_the_model() -> None:
    from transformers import AutoConfig

    vector = SafetyVector.load(bundled_vector_path(SMOLLM2))
    vector.check_compatible(AutoConfig.from_pretrained(model_path(SMOLLM2)))
    assert vector.model == SMOLLM2
    assert (vector.hidden_size, vector.num_layers, vector.layer) == (576, 30, 7)
    assert len(vector.heads) == 10 and all(0 <= h < 9 for _, h in vector.heads)
    assert (vector.method, vector.seed, vector.prompts, vector.shots, vector.rank_prompts) == (
        METHOD_AIE, 0, 100, 10, 16
    )
    assert vector.demos_sha256 == demos_sha256(advbench_demonstrations())
    assert list(vector.head_effects) == sorted(vector.head_effects, reverse=True)
    assert vector.residual_norm is not None and vector.residual_norm > 0
    # The fingerprint recorded at build time equals the one read from this machine's
    # checkpoint (built from the GGUF here): the conversion is deterministic.
    assert vector.model_fingerprint == checkpoint_fingerprint(model_path(SMOLLM2))
    assert vector.relative_dose() == pytest.approx(
        vector.gamma * vector.vector.norm().item() / vector.residual_norm)


def test_cli_inspect_prints_metadata_and_dose(capsys) -> None:
    assert main(["vector", "inspect", SMOLLM2]) == 0
    out = capsys.readouterr().out
    vector = SafetyVector.load(bundled_vector_path(SMOLLM2))
    assert f"file: {bundled_vector_path(SMOLLM2)}" in out
    assert f"heads: {format_heads(vector.heads)}" in out
    assert f"residual_norm: {vector.residual_norm!r}" in out
    assert f"relative_dose (at gamma): {vector.relative_dose():.4g}" in out
