"""The one config loader: the `safeinfer` dict of vLLM's `additional_config`.

`--additional-config '{"safeinfer": {...}}'`, `LLM(additional_config=...)`, the
`safeinfer serve` flags and `--safeinfer-config FILE.json` all end up here. The dict
reaches every vLLM process and is part of vLLM's compile-cache key, so nothing else
(env vars, globals) configures the plugin.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_safeinfer.common.modes import Mode

CONFIG_KEY = "safeinfer"
DEFAULT_VECTOR_NAME = "default"
DEFAULT_LAM = 0.99
# Mixing divides by 1 - lam in float32: past 0.999 the division amplifies rounding error
# a thousandfold and more, and at lam = 1 - 6e-8 float32 rounds 1 - lam to zero. The
# ceiling keeps every accepted lam a finite, well-conditioned mix.
LAM_MAX = 0.999
GAMMA_LIMIT = 100.0


def check_number(key: str, value: object, lo: float, hi: float, *, hi_open: bool = False) -> float:
    """A finite int/float (never a bool) within [lo, hi] (or [lo, hi) with hi_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{key} must be finite, got an integer too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")
    too_high = value >= hi if hi_open else value > hi
    if value < lo or too_high:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{key} must be in [{lo:g}, {hi:g}{bracket}, got {value!r}")
    return value


def check_lam(key: str, value: object) -> float:
    return check_number(key, value, 0.0, LAM_MAX)


def check_gamma(key: str, value: object) -> float:
    return check_number(key, value, -GAMMA_LIMIT, GAMMA_LIMIT)


@dataclass(frozen=True)
class SafeInferConfig:
    """Server-wide SafeInfer settings (validated, immutable)."""

    vectors: Mapping[str, str] = field(default_factory=dict)
    default_vector: str | None = None
    layer: int | None = None
    gamma: float | None = None
    mode: Mode = Mode.OFF
    enforce: bool = False
    expert_model: str | None = None
    expert_dtype: str | None = None
    expert_shares_weights: bool = False
    lam: float = DEFAULT_LAM
    allow_other_model_vectors: bool = False
    vector_dir: str | None = None
    probe: str | None = None
    probe_threshold: float | None = None
    defence: Mode | None = None

    @property
    def has_expert(self) -> bool:
        return self.expert_model is not None

    @property
    def default_defence(self) -> Mode | None:
        """What a request in mode `auto` runs when flagged, unless it names its own: the
        configured `defence`, else the strongest this server can run."""
        if self.defence is not None:
            return self.defence
        steers = self.default_vector is not None
        if steers and self.has_expert:
            return Mode.SAFEINFER
        return Mode.SA if steers else Mode.SGDS if self.has_expert else None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SafeInferConfig:
        """Parse and validate the `safeinfer` dict; errors name the offending key."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{CONFIG_KEY} config must be a JSON object, got {raw!r}")
        known = {"vector", "vectors", "default_vector", "layer", "gamma", "mode", "enforce",
                 "expert_model", "expert_dtype", "expert_shares_weights", "lam",
                 "allow_other_model_vectors", "vector_dir", "probe", "probe_threshold",
                 "defence"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"unknown {CONFIG_KEY} config key(s) {unknown}; known: {sorted(known)}"
            )
        vectors: dict[str, str] = {}
        if raw.get("vector") is not None:
            vectors[DEFAULT_VECTOR_NAME] = _path(f"{CONFIG_KEY}.vector", raw["vector"])
        named = raw.get("vectors") or {}
        if not isinstance(named, Mapping):
            raise ValueError(f"{CONFIG_KEY}.vectors must map names to files, got {named!r}")
        for name, path in named.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{CONFIG_KEY}.vectors: bad vector name {name!r}")
            if name in vectors:
                raise ValueError(
                    f"{CONFIG_KEY}.vectors names {name!r}, which `vector` already defines"
                )
            vectors[name] = _path(f"{CONFIG_KEY}.vectors.{name}", path)
        default_vector = raw.get("default_vector")
        if default_vector is None and len(vectors) == 1:
            default_vector = next(iter(vectors))
        if default_vector is None and DEFAULT_VECTOR_NAME in vectors:
            default_vector = DEFAULT_VECTOR_NAME
        if default_vector is not None and default_vector not in vectors:
            raise ValueError(
                f"{CONFIG_KEY}.default_vector {default_vector!r} is not among the "
                f"vectors {sorted(vectors)}"
            )
        layer = raw.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or layer < 0):
            raise ValueError(f"{CONFIG_KEY}.layer must be a non-negative int, got {layer!r}")
        gamma = raw.get("gamma")
        if gamma is not None:
            gamma = check_gamma(f"{CONFIG_KEY}.gamma", gamma)
        enforce, allow_other, shares = (raw.get(key, False) for key in (
            "enforce", "allow_other_model_vectors", "expert_shares_weights"))
        for key, value in (("enforce", enforce), ("allow_other_model_vectors", allow_other),
                           ("expert_shares_weights", shares)):
            if not isinstance(value, bool):
                raise ValueError(f"{CONFIG_KEY}.{key} must be true or false, got {value!r}")
        expert_model = raw.get("expert_model")
        if expert_model is not None:
            expert_model = _path(f"{CONFIG_KEY}.expert_model", expert_model)
        expert_dtype = raw.get("expert_dtype")
        if expert_dtype is not None and not isinstance(expert_dtype, str):
            raise ValueError(f"{CONFIG_KEY}.expert_dtype must be a string, got {expert_dtype!r}")
        if shares and (expert_model is None or expert_dtype is not None):
            raise ValueError(f"{CONFIG_KEY}.expert_shares_weights needs an expert_model (an "
                             "`ablate` expert) and no expert_dtype: the expert runs on the "
                             "served model's own weights, in their dtype")
        probe_threshold = raw.get("probe_threshold")
        if probe_threshold is not None:
            probe_threshold = check_number(f"{CONFIG_KEY}.probe_threshold", probe_threshold,
                                           -math.inf, math.inf)
        defence = raw.get("defence")
        if defence is not None:
            try:
                defence = Mode.parse(defence)
            except ValueError as exc:
                raise ValueError(f"{CONFIG_KEY}.defence: {exc}") from None
            if not defence.defends:
                raise ValueError(f"{CONFIG_KEY}.defence must be sa, sgds or safeinfer (what "
                                 f"`auto` runs on a flagged request), got {defence.value!r}")
        config = cls(
            vectors=vectors,
            default_vector=default_vector,
            layer=layer,
            gamma=gamma,
            mode=Mode.parse(raw.get("mode", Mode.OFF.value)),
            enforce=enforce,
            expert_model=expert_model,
            expert_dtype=expert_dtype,
            expert_shares_weights=shares,
            lam=check_lam(f"{CONFIG_KEY}.lam", raw.get("lam", DEFAULT_LAM)),
            allow_other_model_vectors=allow_other,
            vector_dir=(None if raw.get("vector_dir") is None
                        else _path(f"{CONFIG_KEY}.vector_dir", raw["vector_dir"])),
            probe=(None if raw.get("probe") is None
                   else _path(f"{CONFIG_KEY}.probe", raw["probe"])),
            probe_threshold=probe_threshold,
            defence=defence,
        )
        if defence is not None:
            config.check_mode_supported(defence, f"{CONFIG_KEY}.defence", vector=None)
        config.check_mode_supported(config.mode, f"{CONFIG_KEY}.mode", vector=None)
        return config

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None
                               ) -> SafeInferConfig | None:
        """The config, or None when SafeInfer is not configured."""
        raw = (additional_config or {}).get(CONFIG_KEY)
        return None if raw is None else cls.from_dict(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> SafeInferConfig:
        """`--safeinfer-config FILE.json`: the same keys as the `safeinfer` dict."""
        return cls.from_dict(load_json_file(path))

    def check_mode_supported(self, mode: Mode, key: str, vector: str | None) -> None:
        """A mode needs a vector (the named one or the default) to steer and an expert
        to mix; `auto` needs a harm probe and a defence it can run."""
        if mode is Mode.AUTO:
            if self.probe is None:
                raise ValueError(f"{key} 'auto' needs a harm probe, and none is configured "
                                 f"({CONFIG_KEY}.probe: a `safeinfer probe build` file)")
            if self.default_defence is None:
                raise ValueError(f"{key} 'auto' needs a defence to run on flagged requests: "
                                 f"configure a vector or an expert_model")
            return
        if mode.steers and vector is None and self.default_vector is None:
            raise ValueError(
                f"{key} {mode.value!r} needs a safety vector, and no default is configured "
                f"({CONFIG_KEY}.vector, or {CONFIG_KEY}.vectors with default_vector)"
            )
        if mode.mixes and not self.has_expert:
            raise ValueError(
                f"{key} {mode.value!r} needs an expert model, and none is configured "
                f"({CONFIG_KEY}.expert_model)"
            )

    def with_vector(self, name: str, path: str) -> SafeInferConfig:
        """This config with vector `name` (added or replaced) read from `path`."""
        return replace(self, vectors={**self.vectors, name: path})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, accepted back by `from_dict`."""
        out = asdict(self)
        out["vectors"] = dict(self.vectors)
        out["mode"] = self.mode.value
        if self.defence is not None:
            out["defence"] = self.defence.value
        return {k: v for k, v in out.items() if v is not None}


def load_json_file(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read SafeInfer config {path}: {exc}") from exc


def _path(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a file path, got {value!r}")
    return value
