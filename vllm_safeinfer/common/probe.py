"""The harm probe file: linear directions in one or several decoder layers' residual
stream, where in the prompt to read them, a threshold, and the answer monitor's threshold,
stored as safetensors beside the metadata that says which model it reads.

Context-adaptive SafeInfer (mode `auto`) scores each token the probe reads as
`s = sum_k w_k . h_k` over its layers (each term divided by `|h_k|` when `normalize`),
with `h_k` the residual stream after decoder layer `layers[k]` (Hugging Face's
`hidden_states[layer + 1]`). Where it reads (`position`):

- `last-prompt`: the prompt's last token (the end of the chat template);
- `last-content`: the last token of the user's content, the template's fixed suffix
  (`content_suffix`, recorded when the probe is built) stripped;
- `content-mean`: the mean of `s` over the last user turn's content, from after the
  template's user header (`user_header`) to before its suffix.

Harm is written in the user's words, refusal at the template's end, and jailbreaks
suppress the second, not the first: reading the content is what generalises. A prompt
without the template's markers (a raw prompt) is read whole. The prompt's score above
`threshold` flags the request. When `monitor_threshold` is set, a request let through is
watched as it answers: once it has generated `monitor_min_tokens` tokens, the running mean
of `s` over its generated tokens above `monitor_threshold` flags it at that token.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "vllm_safeinfer.harm_probe"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
TENSOR = "harm_probe"

LAST_PROMPT = "last-prompt"
LAST_CONTENT = "last-content"
CONTENT_MEAN = "content-mean"
POSITIONS = (LAST_PROMPT, LAST_CONTENT, CONTENT_MEAN)


def linear_scores(hidden: torch.Tensor, direction: torch.Tensor,
                  normalize: bool) -> torch.Tensor:
    """`[..., H]` states -> `[...]` fp32 `w . h` (divided by `|h|` when `normalize`): the
    one formula the builder fits with, the file scores with and the engine's probe op
    computes, one layer at a time."""
    h = hidden.float()
    score = h @ direction.float()
    return score / h.norm(dim=-1).clamp_min(1e-12) if normalize else score


def content_window(prompt_ids: Sequence[int], user_header: Sequence[int],
                   content_suffix: Sequence[int]) -> tuple[int, int]:
    """`[start, end)` of the last user turn's content in a templated prompt: after the
    last `user_header`, before a trailing `content_suffix`; the whole prompt where the
    markers are absent. Never empty for a non-empty prompt."""
    ids = list(prompt_ids)
    end = len(ids)
    suffix = list(content_suffix)
    if suffix and len(ids) > len(suffix) and ids[-len(suffix):] == suffix:
        end -= len(suffix)
    start = 0
    header = list(user_header)
    if header:
        for at in range(end - len(header) - 1, -1, -1):
            if ids[at:at + len(header)] == header:
                start = at + len(header)
                break
    return start, end


@dataclass(frozen=True, eq=False)
class HarmProbe:
    """A linear harm probe: `directions[k]` reads the residual stream after decoder layer
    `layers[k]` (layers ascending), at `position`.

    `metrics` holds what the builder measured (flag rates per set, the variants it
    compared); `source` is the file it was loaded from, for error messages only."""

    directions: torch.Tensor
    layers: tuple[int, ...]
    threshold: float
    model: str
    hidden_size: int
    num_layers: int
    normalize: bool = False
    method: str = "mean-difference"
    position: str = LAST_PROMPT
    user_header: tuple[int, ...] = ()
    content_suffix: tuple[int, ...] = ()
    monitor_threshold: float | None = None
    monitor_min_tokens: int = 4
    model_fingerprint: str = ""
    training_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        where = self.source or "harm probe"
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "user_header", tuple(int(x) for x in self.user_header))
        object.__setattr__(self, "content_suffix", tuple(int(x) for x in self.content_suffix))
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"{where}: layers {self.layers} must be distinct and ascending")
        if tuple(self.directions.shape) != (len(self.layers), self.hidden_size):
            raise ValueError(f"{where}: directions of shape {tuple(self.directions.shape)}, "
                             f"expected ({len(self.layers)}, {self.hidden_size})")
        if not bool(torch.isfinite(self.directions).all()) or not math.isfinite(self.threshold):
            raise ValueError(f"{where}: directions and threshold must be finite")
        if self.position not in POSITIONS:
            raise ValueError(f"{where}: position {self.position!r}; known: "
                             f"{', '.join(POSITIONS)}")
        if self.monitor_threshold is not None and not math.isfinite(self.monitor_threshold):
            raise ValueError(f"{where}: the monitor's threshold must be finite")
        if self.monitor_min_tokens < 1:
            raise ValueError(f"{where}: monitor_min_tokens must be at least 1")
        # The last layer's output is normalised in Hugging Face's hidden_states, not in
        # vLLM's residual stream: a probe there would read two different things.
        if not 0 <= self.layers[0] or self.layers[-1] >= self.num_layers - 1:
            raise ValueError(f"{where}: layers {list(self.layers)} outside "
                             f"0..{self.num_layers - 2} (a probe reads the residual stream "
                             "after a decoder layer other than the last)")

    @property
    def layer(self) -> int:
        """The deepest layer read: the verdict is in place once it has run."""
        return self.layers[-1]

    def token_scores(self, states: torch.Tensor) -> torch.Tensor:
        """`[..., len(layers), H]` residual-stream states at `layers` -> `[...]` fp32
        per-token scores `s`."""
        return sum(linear_scores(states[..., k, :], self.directions[k], self.normalize)
                   for k in range(len(self.layers)))

    def read_window(self, prompt_ids: Sequence[int]) -> tuple[int, int]:
        """`[start, end)`: the prompt positions whose mean score decides the verdict."""
        length = len(prompt_ids)
        if length == 0:
            raise ValueError("empty prompt")
        if self.position == LAST_PROMPT:
            return length - 1, length
        start, end = content_window(prompt_ids, self.user_header, self.content_suffix)
        return (end - 1, end) if self.position == LAST_CONTENT else (start, end)

    def prompt_score(self, prompt_ids: Sequence[int], token_scores: torch.Tensor) -> float:
        """The verdict's score from the prompt's per-token scores (`[len(prompt_ids)]`)."""
        start, end = self.read_window(prompt_ids)
        return float(token_scores[start:end].double().mean())

    @property
    def monitors(self) -> bool:
        return self.monitor_threshold is not None

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
        """Identity of what the probe decides with (directions, layers, where it reads,
        thresholds)."""
        digest = hashlib.sha256(self.directions.float().contiguous().numpy().tobytes())
        digest.update(json.dumps(self._decision_fields(), sort_keys=True).encode())
        return digest.hexdigest()

    def _decision_fields(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "threshold": repr(self.threshold),
                "normalize": self.normalize, "position": self.position,
                "user_header": list(self.user_header),
                "content_suffix": list(self.content_suffix),
                "monitor_threshold": repr(self.monitor_threshold),
                "monitor_min_tokens": self.monitor_min_tokens}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model,
                "hidden_size": str(self.hidden_size), "num_layers": str(self.num_layers),
                "method": self.method, "model_fingerprint": self.model_fingerprint,
                "training_sha256": self.training_sha256,
                "metrics": json.dumps(self.metrics, sort_keys=True),
                **{key: json.dumps(value) for key, value in self._decision_fields().items()}}
        save_file({TENSOR: self.directions.float().contiguous()}, str(path), metadata=meta)

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
                if meta.get("format_version") not in READABLE_VERSIONS:
                    raise ValueError(f"{where}: harm probe format version "
                                     f"{meta.get('format_version')!r}, this version reads "
                                     f"{', '.join(READABLE_VERSIONS)}")
                tensor = handle.get_tensor(TENSOR)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read harm probe {where}: {exc}") from exc
        except Exception as exc:  # safetensors raises its own error types
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"cannot read harm probe {where}: {exc}") from exc
        try:
            common = dict(model=meta["model"], hidden_size=int(meta["hidden_size"]),
                          num_layers=int(meta["num_layers"]), method=meta.get("method", ""),
                          model_fingerprint=meta.get("model_fingerprint", ""),
                          training_sha256=meta.get("training_sha256", ""),
                          metrics=json.loads(meta.get("metrics") or "{}"), source=where)
            if meta["format_version"] == "1":  # one layer, read at the last prompt token
                return cls(directions=tensor.float()[None], layers=(int(meta["layer"]),),
                           threshold=float(meta["threshold"]),
                           normalize=meta.get("normalize") == "true", **common)
            fields = {key: json.loads(meta[key]) for key in
                      ("layers", "threshold", "normalize", "position", "user_header",
                       "content_suffix", "monitor_threshold", "monitor_min_tokens")}
            monitor = fields["monitor_threshold"]
            return cls(directions=tensor.float(), layers=tuple(fields["layers"]),
                       threshold=float(fields["threshold"]),
                       normalize=bool(fields["normalize"]), position=fields["position"],
                       user_header=tuple(fields["user_header"]),
                       content_suffix=tuple(fields["content_suffix"]),
                       monitor_threshold=None if monitor == "None" else float(monitor),
                       monitor_min_tokens=int(fields["monitor_min_tokens"]), **common)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{where}: bad harm probe metadata ({exc})") from exc
