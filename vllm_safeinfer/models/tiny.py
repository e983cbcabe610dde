"""Models made here from nothing, for tests and benchmarks that must not download:

- tiny random decoders (Llama and Qwen2, head_dim 64, a byte-level BPE tokenizer trained
  here, a chat template), each with a smaller "expert" twin sharing the tokenizer;
- shape-only checkpoints (`llama2-7b-shape`): a config and the tiny tokenizer, no
  weights, for benchmarks that load with vLLM's `--load-format dummy` (random weights),
  so a GPU measures a realistic size without any download.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    # Weights big enough (124 MB fp32) that a second copy shows in resident memory.
    "tiny-qwen2-wide": TinySpec("qwen2", 512, 8, 8, 2, 2048, seed=4),
}
# Llama-2-7B's dimensions (6.7B parameters); served with `load_format="dummy"` only.
SHAPE_MODELS: dict[str, dict[str, int]] = {
    "llama2-7b-shape": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, max_position_embeddings=4096),
}


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


def build_tiny(name: str, out: Path) -> None:
    """A tiny random decoder of `TINY_MODELS` with its tokenizer, saved into `out`."""
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


def build_shape(name: str, out: Path) -> None:
    """config.json and the tiny tokenizer (its ids all lie inside the vocabulary)."""
    from transformers import LlamaConfig

    tokenizer = tiny_tokenizer()
    LlamaConfig(**SHAPE_MODELS[name], bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(out)
    tokenizer.save_pretrained(out)
