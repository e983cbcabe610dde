"""Which model a safety vector belongs to, beyond its shape.

Two fine-tunes of one base share every dimension, so `check_compatible` cannot tell them
apart, yet a vector built on one steers the other wrongly. The builder records a
fingerprint of the model's weights; at start-up the same fingerprint is computed from the
served checkpoint's files and compared.

Scheme `sampled-all-v1`: SHA-256 over every weight tensor, in name order, of its name,
shape, and a fixed grid of its float32 values: the tensor viewed as rows (its first
dimension) by everything else, up to 64 evenly spaced rows and, in each, evenly spaced
columns, 4096 values at most. Sampling, not hashing everything, keeps start-up cheap: a
row is a contiguous slice of the file, so 64 short reads per tensor replace reading the
whole checkpoint. It is enough because a fine-tune changes a tensor densely (a merged LoRA
update B @ A, or full training, moves essentially every element of each matrix it
touches), so some sampled value changes; an edit confined to a few unsampled rows is what
it can miss (a whole-tensor sum would see those too, but needs every byte read at each
start-up). Values are hashed as float32, so a checkpoint stored in bf16 or fp16
fingerprints the same as its fp32 upcast, which is what the builder loads.

"Every weight tensor" means the tensors the checkpoint stores, counted once: in memory,
the model's parameters (an alias, such as a tied output embedding, is listed once under
its first name, the input embedding); in the files, every stored tensor except
`lm_head.weight` when the config ties word embeddings (it is then the input embedding,
and vLLM's loaders skip it too), reading only the files an index names when there is one.

The recorded value is `sampled-all-v1:<hex>`. One of another scheme (earlier versions
recorded a bare hex hash of the steered layers' o_proj only) cannot be compared, so it is
refused like a mismatch, never accepted as a match.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SCHEME = "sampled-all-v1"
SAMPLE_ROWS = 64
SAMPLE_VALUES = 4096
TIED_OUTPUT = "lm_head.weight"


def sample_grid(shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """The rows and columns sampled from a tensor of `shape`, viewed as (first dimension,
    everything else); a 1-D tensor is one row."""
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    n_rows = min(rows, SAMPLE_ROWS)
    n_cols = min(cols, SAMPLE_VALUES // max(n_rows, 1))
    return _evenly(rows, n_rows), _evenly(cols, n_cols)


def fingerprint(tensors: Iterable[tuple[str, tuple[int, ...], torch.Tensor]]) -> str:
    """`SCHEME:hex`: SHA-256 of (name, shape, sample) triples, in name order; `sample` is
    the tensor's `sample_grid` values."""
    digest = hashlib.sha256()
    for name, shape, sample in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}\0{','.join(map(str, shape))}\0".encode())
        digest.update(sample.detach().to("cpu", torch.float32).contiguous().numpy()
                      .astype("<f4").tobytes())
    return f"{SCHEME}:{digest.hexdigest()}"


def module_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of an HF model's parameters, as loaded in memory."""
    return fingerprint(
        (name, tuple(param.shape), _sample(param.detach(), tuple(param.shape)))
        for name, param in model.named_parameters()
    )


def checkpoint_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint of a checkpoint folder's safetensors files, reading only the
    sampled rows; None when it has none (another checkpoint format)."""
    from safetensors import safe_open

    folder = Path(folder)
    samples = []
    for file, names in _weight_files(folder).items():
        with safe_open(str(file), framework="pt") as handle:
            samples += [(name, *_stored_sample(handle, name)) for name in names or handle.keys()]
    if not samples:
        return None
    if _ties_word_embeddings(folder):
        samples = [item for item in samples if item[0] != TIED_OUTPUT]
    return fingerprint(samples)


def fingerprint_scheme(value: str) -> str:
    """The scheme a recorded fingerprint was computed with; "" for the bare SHA-256 of
    the first scheme (the steered layers' o_proj only)."""
    scheme, sep, _ = value.rpartition(":")
    return scheme if sep else ""


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
    """Refuse a vector whose recorded fingerprint differs from the served checkpoint's, or
    was computed with another scheme (so cannot be compared), unless `allow_other_model`.

    Vectors without a fingerprint, and checkpoints whose tensors cannot be read here,
    cannot be checked: logged, then accepted."""
    where = vector.source or "safety vector"
    if not vector.model_fingerprint:
        logger.warning("SafeInfer: %s records no model fingerprint; cannot check that it was "
                       "built for this model", where)
        return
    scheme = fingerprint_scheme(vector.model_fingerprint)
    if scheme != SCHEME:
        recorded = repr(scheme) if scheme else "the unnamed o_proj-only scheme of earlier versions"
        _refuse(f"{where} records a model fingerprint of an unknown scheme ({recorded}; this "
                f"version computes {SCHEME!r}), so it cannot be checked against the served "
                f"model ({model_config.model}): rebuild the vector", allow_other_model)
        return
    folder = local_checkpoint(model_config.model, getattr(model_config, "revision", None))
    served = None if folder is None else checkpoint_fingerprint(folder)
    if served is None:
        logger.warning("SafeInfer: cannot read the served checkpoint's safetensors files; %s "
                       "was not checked against it", where)
        return
    if served != vector.model_fingerprint:
        _refuse(f"{where} was built for {vector.model!r}, whose weights differ from the "
                f"served model's ({model_config.model}): a vector steers only the model it "
                "was computed on", allow_other_model)


def _refuse(message: str, allow_other_model: bool) -> None:
    if not allow_other_model:
        raise ValueError(message + "; set `allow_other_model_vectors: true` in the "
                         "safeinfer config to serve it anyway")
    logger.warning("SafeInfer: %s (allowed by allow_other_model_vectors)", message)


def _evenly(size: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(size), starting at 0."""
    return [i * size // count for i in range(count)]


def _sample(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The `sample_grid` values of a tensor held whole."""
    rows, cols = sample_grid(shape)
    if not rows or not cols:
        return torch.zeros(0)
    held = tensor.reshape(shape)[rows] if len(shape) >= 2 else tensor
    return held.reshape(len(rows), -1)[:, cols]


def _stored_sample(handle, name: str) -> tuple[tuple[int, ...], torch.Tensor]:
    """(shape, `sample_grid` values) of a stored tensor, reading only the sampled rows of
    one of 2 or more dimensions (smaller ones are read whole: norms and biases)."""
    sliced = handle.get_slice(name)
    shape = tuple(sliced.get_shape())
    if len(shape) < 2:
        return shape, _sample(handle.get_tensor(name), shape)
    rows, cols = sample_grid(shape)
    if not rows or not cols:
        return shape, torch.zeros(0)
    held = torch.cat([sliced[row:row + 1] for row in rows])
    return shape, held.reshape(len(rows), -1)[:, cols]


def _weight_files(folder: Path) -> dict[Path, list[str]]:
    """The safetensors files holding the weights and the names each holds (empty: all of
    them); an index file's map wins, as in vLLM, over other copies in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files: dict[Path, list[str]] = {}
        for name, file in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(folder / file, []).append(name)
        return files
    return {file: [] for file in sorted(folder.glob("*.safetensors"))}


def _ties_word_embeddings(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("tie_word_embeddings"))
