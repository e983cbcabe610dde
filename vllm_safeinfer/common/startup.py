"""Everything SafeInfer can check before the engine starts, run where vLLM creates the
engine's config (the API server, or an offline `LLM`'s process): the features it cannot
serve, each configured vector file (read here once: its identity goes on to every other
process inside the config, `vector_files`), the harm probe against the model and the
steered layers, and the unsafe expert against the served model."""
from __future__ import annotations

import json
from pathlib import Path

from vllm_safeinfer.common.compat import check_supported
from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.expert_files import (
    ABLATE,
    DIRECTION_FILE,
    EXPERT_METADATA,
    expert_model_config,
)
from vllm_safeinfer.common.model_identity import (
    check_vector_model,
    checkpoint_fingerprint,
    local_checkpoint,
)
from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.common.vector_files import identify, read_as
from vllm_safeinfer.common.vector_table import VectorTable
from vllm_safeinfer.common.vectors import SafetyVector


def check_startup(vllm_config, config: SafeInferConfig) -> SafeInferConfig:
    """Check everything; returns `config` with each vector's identity, the sha256 of the
    bytes read here, which the other processes hold their own reads to."""
    model_config = vllm_config.model_config
    check_supported(vllm_config)
    config = identify(config)
    for name, path in sorted(config.vectors.items()):
        data = read_as(path, config.vector_sha256[name])
        check_vector_model(SafetyVector.from_bytes(data, path), model_config,
                           allow_other_model=config.allow_other_model_vectors)
    table = VectorTable(config, model_config)
    if config.probe is not None:
        load_probe(config, model_config, table.layers)
    if config.has_expert:
        check_expert_compatible(config, model_config)
    return config


def load_probe(config: SafeInferConfig, model_config, steered_layers) -> HarmProbe:
    """The configured harm probe, checked against the model and the steered layers (the
    verdict must be in place before any steering add of the same forward)."""
    probe = HarmProbe.load(config.probe)
    probe.check_compatible(model_config)
    check_vector_model(probe, model_config, allow_other_model=config.allow_other_model_vectors)
    if steered_layers and probe.layer > min(steered_layers):
        raise ValueError(f"{config.probe}: the harm probe reads layer {probe.layer}, above the "
                         f"steered layer {min(steered_layers)}; its verdict must come at or "
                         "below every steered layer (rebuild it with --vector)")
    return probe


def check_expert_compatible(config: SafeInferConfig, base_model_config) -> None:
    """Start-up check: the expert must share the served model's vocabulary (the mixing
    compares the two distributions token by token)."""
    from transformers import AutoConfig, AutoTokenizer

    path = config.expert_model
    try:
        expert_hf = AutoConfig.from_pretrained(path, trust_remote_code=base_model_config.trust_remote_code)
        expert_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=base_model_config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"SafeInfer expert_model {path!r} cannot be loaded: {exc}") from exc
    base_tok = AutoTokenizer.from_pretrained(
        base_model_config.tokenizer, trust_remote_code=base_model_config.trust_remote_code,
        revision=base_model_config.tokenizer_revision,
    )
    if expert_tok.get_vocab() != base_tok.get_vocab():
        raise ValueError(
            f"SafeInfer expert_model {path!r} has another vocabulary than the served model "
            f"({len(expert_tok)} vs {len(base_tok)} tokens, or the same size with other "
            "tokens): the expert must use the served model's tokenizer"
        )
    base_width = base_model_config.get_vocab_size()
    expert_width = getattr(expert_hf.get_text_config(), "vocab_size", None)
    if expert_width != base_width:
        raise ValueError(
            f"SafeInfer expert_model {path!r} has {expert_width} output logits, the served "
            f"model {base_width}: their embedding sizes must match"
        )
    if getattr(expert_hf, "architectures", None) is None:
        raise ValueError(f"SafeInfer expert_model {path!r}: config.json names no architecture")
    if config.expert_shares_weights:
        check_shared_expert(path, base_model_config)
    if config.expert_dtype is not None:
        expert_dtype = expert_model_config(config, base_model_config).dtype
        if expert_dtype.itemsize > base_model_config.dtype.itemsize:
            raise ValueError(
                f"SafeInfer expert_dtype {config.expert_dtype!r} is more precise than the "
                f"served model's {base_model_config.dtype}: the expert's attention would read "
                "a KV cache kept in the served model's dtype (vLLM's CPU attention aborts on "
                "it). Use the served model's dtype or a lower one (a bf16 expert beside an "
                "fp32 model works)")


def check_shared_expert(expert: str, model_config) -> None:
    """Start-up check: `expert` is an `ablate` expert with its direction, made from the
    served checkpoint's weights (same fingerprint)."""
    where = f"SafeInfer expert_model {expert!r} with expert_shares_weights"
    try:
        metadata = json.loads((Path(expert) / EXPERT_METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: no readable {EXPERT_METADATA} ({exc}); only an expert "
                         "built by `safeinfer expert build --method ablate` can share the "
                         "served model's weights") from exc
    if metadata.get("method") != ABLATE:
        raise ValueError(f"{where}: it was built by the {metadata.get('method')!r} recipe; "
                         "only an `ablate` expert is the served model's own weights minus a "
                         "direction, so only it can share them")
    if not (Path(expert) / DIRECTION_FILE).is_file():
        raise ValueError(f"{where}: its direction file {DIRECTION_FILE} is missing")
    recorded = metadata.get("base_model_fingerprint")
    folder = local_checkpoint(model_config.model, getattr(model_config, "revision", None))
    served = None if folder is None else checkpoint_fingerprint(folder)
    if recorded is None or served is None:
        why = ("it records no fingerprint of its base: rebuild it" if recorded is None
               else "the served checkpoint has no local safetensors files")
        raise ValueError(f"{where}: cannot check that it was made from the served model "
                         f"({why})")
    if recorded != served:
        raise ValueError(f"{where}: it was made from other weights than the served model's "
                         f"({model_config.model}); sharing would serve another expert than "
                         "the one built")
