"""The safety vector file: one fp32 residual-stream vector plus the metadata that says
which model and layer it belongs to and how it steers, stored as safetensors (no pickle,
so loading a file from elsewhere cannot run code).

Two steering kinds (`steering`), each at one or several decoder layers (`layers`, by
default the layer the vector was built at):
- `add`: `h += gamma * SV` (the paper's safety amplification);
- `project`: `h += (gamma * |SV| - h.u) u` with `u = SV / |SV|`: the residual's component
  along the vector is set to a target value instead of being pushed past it, which keeps
  the text coherent where a strong add loops (directional patching).
Either may steer only the first `answer_tokens` positions from where steering starts
(the last prompt token, or where the harm probe flagged): alignment lives in an answer's
first tokens, and a model that has begun a refusal finishes it on its own, where one
held in the refusal state at every token restarts it in a loop. Files that add at their
own layer at every position are written as format version 1, the others as 2, so an
older reader refuses a file it would apply wrongly.

A vector silently added to the wrong model or layer would corrupt generations without
any error, so `load` checks the file against its own metadata and `check_compatible`
checks it against the model that is about to use it. A file is read once, as bytes
(`read_vector_file`): the checked bytes and their sha256 are what a running server hands
to its engine processes, and the sha256 is the vector's identity in the prefix cache.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from vllm_safeinfer.common.config import check_gamma

FORMAT = "vllm_safeinfer.safety_vector"
FORMAT_VERSION = "1"
# Version 2 adds `steering`, `layers` and `answer_tokens`; version 1 files add at `layer`
# at every position.
FORMAT_VERSIONS = ("1", "2")
ADD, PROJECT = "add", "project"
STEERING_KINDS = (ADD, PROJECT)
TENSOR = "safety_vector"
DEFAULT_GAMMA = 0.5
# A vector file holds hidden_size fp32 values and a few hundred bytes of metadata.
MAX_FILE_BYTES = 64 << 20

Head = tuple[int, int]

_INT_KEYS = ("layer", "hidden_size", "num_layers", "seed", "prompts", "shots", "rank_prompts")
_STR_KEYS = ("model", "method", "demos_sha256", "version")
_REQUIRED_KEYS = (
    "format", "format_version", "gamma", "heads", "head_effects", *_INT_KEYS, *_STR_KEYS
)


def parse_heads(text: str) -> tuple[Head, ...]:
    """Parse `L:H,L:H,...` (0-based layer and head indices) into (layer, head) pairs."""
    heads = []
    for item in text.split(","):
        layer, sep, head = item.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
            raise ValueError(f"bad head {item!r} in {text!r}: expected LAYER:HEAD, e.g. 8:3")
        heads.append((int(layer), int(head)))
    if len(set(heads)) != len(heads):
        raise ValueError(f"head list {text!r} names a head twice")
    return tuple(heads)


def parse_layers(text: str) -> tuple[int, ...]:
    """Parse `L,L,...` or `A-B` ranges (0-based decoder layers) into sorted layers."""
    layers: set[int] = set()
    for item in text.split(","):
        first, sep, last = item.strip().partition("-")
        if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
            raise ValueError(f"bad layer {item!r} in {text!r}: expected L or A-B, e.g. 14-18")
        start, end = int(first), int(last) if sep else int(first)
        if end < start:
            raise ValueError(f"layer range {item!r} in {text!r} runs backwards")
        layers.update(range(start, end + 1))
    return tuple(sorted(layers))


def format_heads(heads: tuple[Head, ...]) -> str:
    """The `L:H,L:H,...` form that `parse_heads` reads."""
    return ",".join(f"{layer}:{head}" for layer, head in heads)


@dataclass(frozen=True, eq=False)
class SafetyVector:
    """SafeInfer's safety vector SV, applied with strength `gamma` to the output hidden
    state of decoder layers `layers` (0-based; default: `layer`, where it was built and
    where `residual_norm` was measured) by `steering` (`add` or `project`), plus how it
    was built.

    `source` is the file it was loaded from, kept only to name it in error messages.
    """

    vector: torch.Tensor
    layer: int
    model: str
    hidden_size: int
    num_layers: int
    heads: tuple[Head, ...]
    head_effects: tuple[float, ...] = ()
    gamma: float = DEFAULT_GAMMA
    method: str = "aie"
    seed: int = 0
    demos_sha256: str = ""
    version: str = ""
    prompts: int = 0
    shots: int = 0
    rank_prompts: int = 0
    residual_norm: float | None = None
    model_fingerprint: str = ""
    steering: str = ADD
    layers: tuple[int, ...] = ()
    answer_tokens: int = 0  # positions steered from where steering starts; 0: all
    source: str | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            object.__setattr__(self, "layers", (self.layer,))
        _validate(self, where=self.source or "safety vector")

    @property
    def projects(self) -> bool:
        return self.steering == PROJECT

    def __eq__(self, other: object) -> bool:
        """Equal when vector and metadata are identical (the loaded-from path aside)."""
        if not isinstance(other, SafetyVector):
            return NotImplemented
        return torch.equal(self.vector, other.vector) and self._metadata() == other._metadata()

    def relative_dose(self, gamma: float | None = None) -> float | None:
        """`gamma * |SV| / |h|`: the steering's size against the residual stream it is
        applied to (mean norm at the vector's layer), comparable across models: what is
        added, or the target component when it projects. None for files written before
        the norm was recorded."""
        if self.residual_norm is None:
            return None
        gamma = self.gamma if gamma is None else gamma
        return gamma * float(self.vector.norm()) / self.residual_norm

    def describe(self) -> str:
        """Every field of the file, one per line, with the vector's norm and dose."""
        dose = self.relative_dose()
        lines = [f"{key}: {value}" for key, value in self._metadata().items()]
        lines += [
            f"vector_norm: {float(self.vector.norm()):.6g}",
            "relative_dose (at gamma): "
            + ("unknown (no residual_norm in this file)" if dose is None else f"{dose:.4g}"),
        ]
        return "\n".join(lines)

    def _metadata(self) -> dict[str, str]:
        plain = self.steering == ADD and self.layers == (self.layer,) and not self.answer_tokens
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION if plain else "2"}
        if not plain:
            meta["steering"] = self.steering
            meta["layers"] = ",".join(map(str, self.layers))
            meta["answer_tokens"] = str(self.answer_tokens)
        meta.update({key: str(getattr(self, key)) for key in (*_INT_KEYS, *_STR_KEYS)})
        meta["gamma"] = repr(self.gamma)
        meta["heads"] = format_heads(self.heads)
        meta["head_effects"] = ",".join(repr(effect) for effect in self.head_effects)
        if self.residual_norm is not None:
            meta["residual_norm"] = repr(self.residual_norm)
        if self.model_fingerprint:
            meta["model_fingerprint"] = self.model_fingerprint
        return meta

    def save(self, path: str | Path) -> None:
        """Write the vector as safetensors: tensor `safety_vector` plus string metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({TENSOR: self.vector.contiguous()}, str(path), metadata=self._metadata())

    @classmethod
    def load(cls, path: str | Path) -> SafetyVector:
        """Read and validate a file written by `save`."""
        return cls.from_bytes(read_vector_file(path), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SafetyVector:
        """Validate the contents of a file written by `save` (`where` names it in
        errors)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_tensors

        try:
            meta = _safetensors_metadata(data)
            tensors = load_tensors(data)
        except (SafetensorError, ValueError) as err:
            raise ValueError(f"{where} is not a readable safetensors file: {err}") from err
        if list(tensors) != [TENSOR]:
            raise ValueError(
                f"{where}: expected exactly one tensor named {TENSOR!r}, found {list(tensors)}"
            )
        return cls(vector=tensors[TENSOR], source=where, **_parse_metadata(meta, where))

    def check_compatible(self, model_config: Any) -> None:
        """Raise ValueError naming every field where this vector does not fit the model.

        `model_config` is an HF PretrainedConfig, vLLM's ModelConfig (`get_hidden_size()`,
        `hf_config`), or anything with `hidden_size` and `num_hidden_layers`.
        """
        hidden, layers = _model_shape(model_config)
        problems = [
            f"{name} is {mine} in the vector but {theirs} in the model"
            for name, mine, theirs in (
                ("hidden_size", self.hidden_size, hidden),
                ("num_layers", self.num_layers, layers),
            )
            if mine != theirs
        ]
        if problems:
            raise ValueError(
                f"{self.source or 'safety vector'} (built for {self.model}) does not fit this "
                f"model: {'; '.join(problems)}"
            )


def read_vector_file(path: str | Path) -> bytes:
    """A vector file's bytes, refused past `MAX_FILE_BYTES` (nothing bigger is a vector)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safety vector file {path} does not exist")
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a safety vector")
    return data


def content_sha256(data: bytes) -> str:
    """The identity of a vector file's contents."""
    return hashlib.sha256(data).hexdigest()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8-byte length, then JSON)."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header length past the end of the file")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("malformed __metadata__")
    return meta


def bundled_vector_path(model: str) -> Path:
    """Path of the safety vector shipped with the package for a named model."""
    folder = Path(str(files("vllm_safeinfer").joinpath("bundled")))
    path = folder / f"{model}.safetensors"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.safetensors"))
        raise ValueError(f"no bundled safety vector for {model!r}; bundled: {', '.join(known)}")
    return path


def _validate(sv: SafetyVector, where: str) -> None:
    vector = sv.vector
    if not isinstance(vector, torch.Tensor):
        raise ValueError(f"{where}: vector must be a torch.Tensor, got {type(vector).__name__}")
    if vector.dim() != 1:
        raise ValueError(f"{where}: vector must be 1-D, got shape {tuple(vector.shape)}")
    if vector.dtype != torch.float32:
        raise ValueError(f"{where}: vector must be float32, got {vector.dtype}")
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{where}: vector has NaN or infinite values")
    if vector.numel() != sv.hidden_size:
        raise ValueError(
            f"{where}: vector has {vector.numel()} values but hidden_size is {sv.hidden_size}"
        )
    if sv.num_layers < 1 or not 0 <= sv.layer < sv.num_layers:
        raise ValueError(f"{where}: layer {sv.layer} is outside 0..{sv.num_layers - 1}")
    outside = [layer for layer in sv.layers if not 0 <= layer < sv.num_layers]
    if outside or list(sv.layers) != sorted(set(sv.layers)):
        raise ValueError(f"{where}: steered layers {list(sv.layers)} must be distinct, "
                         f"ascending and within 0..{sv.num_layers - 1}")
    if sv.steering not in STEERING_KINDS:
        raise ValueError(f"{where}: steering must be one of {', '.join(STEERING_KINDS)}, "
                         f"got {sv.steering!r}")
    if isinstance(sv.answer_tokens, bool) or not isinstance(sv.answer_tokens, int) or \
            sv.answer_tokens < 0:
        raise ValueError(f"{where}: answer_tokens must be an int >= 0 (0: every position), "
                         f"got {sv.answer_tokens!r}")
    if sv.steering == PROJECT and not float(vector.norm()) > 0:
        raise ValueError(f"{where}: a zero vector has no direction to project on")
    bad = [head for head in sv.heads if not 0 <= head[0] < sv.num_layers or head[1] < 0]
    if bad:
        raise ValueError(f"{where}: heads {format_heads(tuple(bad))} are outside the layers")
    if sv.head_effects and len(sv.head_effects) != len(sv.heads):
        raise ValueError(
            f"{where}: {len(sv.head_effects)} head effects for {len(sv.heads)} heads"
        )
    if not all(math.isfinite(value) for value in sv.head_effects):
        raise ValueError(f"{where}: head effects must be finite")
    check_gamma(f"{where}: gamma", sv.gamma)
    norm = sv.residual_norm
    if norm is not None and not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"{where}: residual_norm must be a finite positive number, got {norm}")


def _parse_metadata(meta: dict[str, str], where: str) -> dict[str, Any]:
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{where}: metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT or meta["format_version"] not in FORMAT_VERSIONS:
        raise ValueError(
            f"{where}: format {meta['format']!r} version {meta['format_version']!r} is not "
            f"{FORMAT!r} version {' or '.join(FORMAT_VERSIONS)}"
        )
    fields: dict[str, Any] = {key: meta[key] for key in _STR_KEYS}
    if meta["format_version"] != FORMAT_VERSION:
        if "steering" not in meta or "layers" not in meta:
            raise ValueError(f"{where}: a version 2 file must record steering and layers")
        fields["steering"] = meta["steering"]
        try:
            fields["layers"] = parse_layers(meta["layers"])
        except ValueError as err:
            raise ValueError(f"{where}: metadata layers: {err}") from None
        try:
            fields["answer_tokens"] = int(meta.get("answer_tokens", "0"))
        except ValueError:
            raise ValueError(f"{where}: metadata answer_tokens={meta['answer_tokens']!r} is "
                             "not an integer") from None
    for key in _INT_KEYS:
        try:
            fields[key] = int(meta[key])
        except ValueError:
            raise ValueError(f"{where}: metadata {key}={meta[key]!r} is not an integer") from None
    try:
        fields["gamma"] = float(meta["gamma"])
    except ValueError:
        raise ValueError(f"{where}: metadata gamma={meta['gamma']!r} is not a number") from None
    try:
        fields["heads"] = parse_heads(meta["heads"]) if meta["heads"] else ()
    except ValueError as err:
        raise ValueError(f"{where}: metadata heads: {err}") from None
    try:
        fields["head_effects"] = tuple(
            float(value) for value in meta["head_effects"].split(",") if value
        )
    except ValueError:
        raise ValueError(f"{where}: metadata head_effects is not a list of numbers") from None
    if "model_fingerprint" in meta:
        fields["model_fingerprint"] = meta["model_fingerprint"]
    if "residual_norm" in meta:
        try:
            fields["residual_norm"] = float(meta["residual_norm"])
        except ValueError:
            raise ValueError(
                f"{where}: metadata residual_norm={meta['residual_norm']!r} is not a number"
            ) from None
    return fields


def _model_shape(config: Any) -> tuple[int, int]:
    """(hidden size, number of decoder layers) of an HF or vLLM model config."""
    hf = getattr(config, "hf_config", config)
    if hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    get_hidden = getattr(config, "get_hidden_size", None)
    hidden = get_hidden() if callable(get_hidden) else getattr(hf, "hidden_size", None)
    layers = getattr(hf, "num_hidden_layers", None)
    if hidden is None or layers is None:
        raise ValueError(
            f"cannot read hidden_size and num_hidden_layers from {type(config).__name__}"
        )
    return int(hidden), int(layers)
