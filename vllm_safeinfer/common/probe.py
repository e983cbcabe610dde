"""The harm probe file: a direction in one decoder layer's residual stream and a
threshold, stored as safetensors beside the metadata that says which model it reads.

Context-adaptive SafeInfer (mode `auto`) scores each request once, at its last prompt
token: `score = w . h` (or `w . h / |h|` when `normalize`), with `h` the residual stream
after decoder layer `layer` (Hugging Face's `hidden_states[layer + 1]`). A score above
`threshold` flags the request, which then runs its defence; the others run as `off`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "vllm_safeinfer.harm_probe"
FORMAT_VERSION = "1"
TENSOR = "harm_probe"


def linear_scores(hidden: torch.Tensor, direction: torch.Tensor,
                  normalize: bool) -> torch.Tensor:
    """`[..., H]` states -> `[...]` fp32 `w . h` (divided by `|h|` when `normalize`): the
    one formula the builder chooses thresholds with, the file scores with and the
    engine's probe op computes."""
    h = hidden.float()
    score = h @ direction.float()
    return score / h.norm(dim=-1).clamp_min(1e-12) if normalize else score


@dataclass(frozen=True, eq=False)
class HarmProbe:
    """A linear harm probe on the residual stream after decoder layer `layer`.

    `metrics` holds what the builder measured (flag rates per set, the candidates it
    compared); `source` is the file it was loaded from, for error messages only."""

    direction: torch.Tensor
    layer: int
    threshold: float
    model: str
    hidden_size: int
    num_layers: int
    normalize: bool = False
    method: str = "mean-difference"
    model_fingerprint: str = ""
    training_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        where = self.source or "harm probe"
        if self.direction.dim() != 1 or self.direction.numel() != self.hidden_size:
            raise ValueError(f"{where}: direction of shape {tuple(self.direction.shape)}, "
                             f"expected ({self.hidden_size},)")
        if not bool(torch.isfinite(self.direction).all()) or not math.isfinite(self.threshold):
            raise ValueError(f"{where}: direction and threshold must be finite")
        # The last layer's output is normalised in Hugging Face's hidden_states, not in
        # vLLM's residual stream: a probe there would read two different things.
        if not 0 <= self.layer < self.num_layers - 1:
            raise ValueError(f"{where}: layer {self.layer} outside 0..{self.num_layers - 2} "
                             "(a probe reads the residual stream after a decoder layer "
                             "other than the last)")

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., H]` residual-stream states -> `[...]` fp32 scores."""
        return linear_scores(hidden, self.direction, self.normalize)

    def check_compatible(self, model_config) -> None:
        """Refuse a probe made for a model of another shape."""
        hf = model_config.hf_config
        where = self.source or "harm probe"
        if self.hidden_size != model_config.get_hidden_size():
            raise ValueError(f"{where}: hidden size {self.hidden_size}, the served model has "
                             f"{model_config.get_hidden_size()}")
        if self.num_layers != hf.num_hidden_layers:
            raise ValueError(f"{where}: built for {self.num_layers} decoder layers, the served "
                             f"model has {hf.num_hidden_layers}")

    def content_sha256(self) -> str:
        """Identity of what the probe decides with (direction, layer, threshold, norm)."""
        import hashlib

        digest = hashlib.sha256(self.direction.float().contiguous().numpy().tobytes())
        digest.update(f"{self.layer}|{self.threshold!r}|{self.normalize}".encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "layer": str(self.layer),
                "threshold": repr(self.threshold), "model": self.model,
                "hidden_size": str(self.hidden_size), "num_layers": str(self.num_layers),
                "normalize": str(self.normalize).lower(), "method": self.method,
                "model_fingerprint": self.model_fingerprint,
                "training_sha256": self.training_sha256,
                "metrics": json.dumps(self.metrics, sort_keys=True)}
        save_file({TENSOR: self.direction.float().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> HarmProbe:
        from safetensors import safe_open

        where = str(path)
        try:
            with safe_open(where, framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{where} is not a harm probe file (format "
                                     f"{meta.get('format')!r}, expected {FORMAT!r})")
                if meta.get("format_version") != FORMAT_VERSION:
                    raise ValueError(f"{where}: harm probe format version "
                                     f"{meta.get('format_version')!r}, this version reads "
                                     f"{FORMAT_VERSION!r}")
                direction = handle.get_tensor(TENSOR)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read harm probe {where}: {exc}") from exc
        except Exception as exc:  # safetensors raises its own error types
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"cannot read harm probe {where}: {exc}") from exc
        try:
            return cls(direction=direction.float(), layer=int(meta["layer"]),
                       threshold=float(meta["threshold"]), model=meta["model"],
                       hidden_size=int(meta["hidden_size"]),
                       num_layers=int(meta["num_layers"]),
                       normalize=meta.get("normalize") == "true",
                       method=meta.get("method", ""),
                       model_fingerprint=meta.get("model_fingerprint", ""),
                       training_sha256=meta.get("training_sha256", ""),
                       metrics=json.loads(meta.get("metrics") or "{}"), source=where)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where}: bad harm probe metadata ({exc})") from exc
