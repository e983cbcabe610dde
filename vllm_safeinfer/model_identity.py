"""Which model a safety vector belongs to, beyond its shape.

Two fine-tunes of one base share every dimension, so `check_compatible` cannot tell them
apart, yet a vector built on one steers the other wrongly. The builder records a
fingerprint of the weights the vector was computed from (the attention output
projections of the layers holding its heads); at start-up the same fingerprint is
computed from the served checkpoint's files and compared. Values are hashed as float32,
so a checkpoint stored in bf16 or fp16 fingerprints the same as its fp32 upcast, which
is what the builder loads.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def o_proj_names(layers: Iterable[int]) -> tuple[str, ...]:
    """Checkpoint names of the attention output projections of `layers` (HF's names for
    Llama-style decoders)."""
    return tuple(f"model.layers.{layer}.self_attn.o_proj.weight" for layer in sorted(set(layers)))


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors' float32 values, in the given order."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def module_fingerprint(model: torch.nn.Module, names: Sequence[str]) -> str:
    """The fingerprint of `names` among an HF model's parameters."""
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"the model has no parameters {missing}")
    return fingerprint((name, params[name]) for name in names)


def checkpoint_fingerprint(folder: str | Path, names: Sequence[str]) -> str | None:
    """The fingerprint of `names` read from a folder's safetensors files; None when the
    folder does not hold them all (another checkpoint format, another naming)."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in set(names) & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    if set(found) != set(names):
        return None
    return fingerprint((name, found[name]) for name in names)


def local_checkpoint(model: str, revision: str | None = None) -> Path | None:
    """The served model's checkpoint folder: the path itself, or the local Hugging Face
    cache's copy of a hub id (never a download)."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: no local copy to read
        return None


def check_vector_model(vector, model_config, *, allow_other_model: bool) -> None:
    """Refuse a vector whose recorded fingerprint differs from the served checkpoint's.

    Vectors without a fingerprint (older files), and checkpoints whose tensors cannot be
    read here, cannot be checked: logged, then accepted."""
    where = vector.source or "safety vector"
    if not vector.model_fingerprint:
        logger.warning("SafeInfer: %s records no model fingerprint; cannot check that it was "
                       "built for this model", where)
        return
    folder = local_checkpoint(model_config.model, getattr(model_config, "revision", None))
    names = o_proj_names(layer for layer, _ in vector.heads)
    served = None if folder is None else checkpoint_fingerprint(folder, names)
    if served is None:
        logger.warning("SafeInfer: cannot read %s from the served checkpoint; %s was not "
                       "checked against it", ", ".join(names), where)
        return
    if served != vector.model_fingerprint:
        message = (f"{where} was built for {vector.model!r}, whose weights differ from the "
                   f"served model's ({model_config.model}): a vector steers only the model it "
                   "was computed on")
        if not allow_other_model:
            raise ValueError(message + "; set `allow_other_model_vectors: true` in the "
                             "safeinfer config to serve it anyway")
        logger.warning("SafeInfer: %s (allowed by allow_other_model_vectors)", message)
