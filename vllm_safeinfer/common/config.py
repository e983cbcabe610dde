"""The one config loader: the `safeinfer` dict of vLLM's `additional_config`.

`--additional-config '{"safeinfer": {...}}'`, `LLM(additional_config=...)`, the
`safeinfer serve` flags and `--safeinfer-config FILE.json` all end up here. The dict
reaches every vLLM process and is part of vLLM's compile-cache key, so nothing else
(env vars, globals) configures the plugin.

Each user key is declared once, on its field (`user_key(help, Flag(...))`; the `vector`
alias, which has no field, as `VECTOR_ALIAS`): from that declaration come the accepted keys
(`USER_KEYS`), the `--safeinfer-*` flags (`server/config_flags.py`) and the tables of
docs/configuration.md (`config_table()`, `flags_table()`; tests/test_docs.py holds the page
to them). A field the plugin sets itself is declared `internal()`: no key, flag or docs row.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vllm_safeinfer.common.modes import Mode

CONFIG_KEY = "safeinfer"
# Beside it in `additional_config`, written by the plugin where the engine's config is
# created: each vector's identity (the sha256 of the bytes read there), which every other
# process holds its own read to (`vector_files`).
IDENTITIES_KEY = "safeinfer_vector_sha256"
DEFAULT_VECTOR_NAME = "default"
DEFAULT_LAM = 0.99
# Mixing divides by 1 - lam in float32: past 0.999 the division amplifies rounding error
# a thousandfold and more, and at lam = 1 - 6e-8 float32 rounds 1 - lam to zero. The
# ceiling keeps every accepted lam a finite, well-conditioned mix.
LAM_MAX = 0.999
GAMMA_LIMIT = 100.0


class SafeInferConfigError(ValueError):
    """A `safeinfer` dict (or config file) that `SafeInferConfig.from_dict` refuses; the
    message names the offending key. A ValueError, so `except ValueError` still catches it."""


@dataclass(frozen=True)
class Flag:
    """A key's `--safeinfer-*` flag (`--safeinfer-` and the key with dashes, dest the key):
    what argparse is given (`server/config_flags.py` adds the argument)."""

    shown: str = ""
    """The value's placeholder in the docs (`--safeinfer-layer N`); default: the metavar."""
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    """argparse's metavar (without one, argparse shows the key in capitals)."""
    nargs: str | None = None
    switch: bool = False
    """A bare flag that sets the key `true` (argparse's `store_const`)."""
    help: str = ""
    """The flag's own help, where the key's does not fit the flag (the docs show it in
    the flags table's value column)."""

    @property
    def placeholder(self) -> str:
        if self.shown or self.metavar is None:
            return self.shown
        return f"{self.metavar} ..." if self.nargs == "+" else self.metavar


@dataclass(frozen=True)
class ConfigKey:
    """A user key of the `safeinfer` dict: its help (markdown: its row of the docs' table,
    and its flag's help) and its flag (None: only in the dict or config file)."""

    name: str
    help: str
    flag: Flag | None = None


_KEY = "safeinfer_key"  # a field's metadata: (help, flag) of a user key, None if internal


def user_key(help: str, flag: Flag | None = None, **field_kwargs: Any) -> Any:
    """A `SafeInferConfig` field users set: the key of its name, with its help and flag
    (`field_kwargs`: the field's default or default_factory)."""
    return field(metadata={_KEY: (help, flag)}, **field_kwargs)


def internal(**field_kwargs: Any) -> Any:
    """A `SafeInferConfig` field the plugin sets, never a user: not a key (`from_dict`
    refuses it as unknown, `to_dict` leaves it out), no flag, no docs row."""
    return field(metadata={_KEY: None}, **field_kwargs)


MODES = tuple(mode.value for mode in Mode)
DEFENCES = tuple(mode.value for mode in Mode if mode.defends)

VECTOR_ALIAS = ConfigKey("vector", "a safety-vector file; its name is `default`",
                         Flag("FILE"))
"""The `vector` key: no field of its own, `from_dict` reads it into `vectors["default"]`."""


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
    """Server-wide SafeInfer settings (validated, immutable). Each field is a user key
    (`user_key`: its help and flag, in the docs' order) or `internal()`."""

    vectors: Mapping[str, str] = user_key(
        "`{name: file}`, more vectors (requests choose by name, never by path)",
        Flag(metavar="NAME=FILE", nargs="+",
             help="named vector files (added to those of `--safeinfer-config`)"),
        default_factory=dict)
    default_vector: str | None = user_key(
        "vector of requests that name none (implied when there is one vector)",
        Flag("NAME"), default=None)
    layer: int | None = user_key(
        "decoder layer to steer, overriding the files'; without it each vector keeps its own "
        "layer and every such layer is steered", Flag("N", type=int), default=None)
    gamma: float | None = user_key(
        "default strength; precedence: request, then this, then the vector file's",
        Flag("G", type=float), default=None)
    mode: Mode = user_key(
        "default mode: `off` (default), `sa`, `sgds`, `safeinfer`, `auto`",
        Flag("MODE", choices=MODES), default=Mode.OFF)
    probe: str | None = user_key(
        "a harm-probe file (`safeinfer probe build`): mode `auto` needs it. Its layer must be "
        "at or below every steered layer", Flag("FILE"), default=None)
    probe_threshold: float | None = user_key(
        "the probe's threshold, overriding the file's (what `safeinfer calibrate` writes)",
        Flag("T", type=float), default=None)
    defence: Mode | None = user_key(
        "what mode `auto` runs on a flagged request: `sa`, `sgds` or `safeinfer` (default: "
        "the strongest the server can run)", Flag("MODE", choices=DEFENCES), default=None)
    enforce: bool = user_key(
        "`true`: a request that sets any `safeinfer_*` option is refused (HTTP 400)",
        Flag(switch=True), default=False)
    expert_model: str | None = user_key(
        "the unsafe expert: an HF checkpoint with the served model's tokenizer and embedding "
        "size", Flag("DIR"), default=None)
    expert_dtype: str | None = user_key(
        "the expert's dtype (default: the served model's). A lower precision than the served "
        "model's is served (a bf16 expert beside an fp32 model: tested, exact against the HF "
        "reference in the same dtypes); a higher one is refused at start-up, since the "
        "expert's attention reads a KV cache kept in the served model's dtype",
        Flag("DTYPE"), default=None)
    expert_shares_weights: bool = user_key(
        "`true`: `expert_model` is an `ablate` expert and runs on the served model's own "
        "weights, its rows inside the served model's forward (its memory: its KV cache "
        "alone; a step reads the weights once; on a GPU the engine runs without CUDA "
        "graphs); refused at start-up unless the expert was made from the served "
        "checkpoint's weights (see [the `ablate` expert on the served model's own weights]"
        "(expert-and-calibration.md#the-ablate-expert-on-the-served-models-own-weights))",
        Flag(switch=True), default=False)
    lam: float = user_key(
        f"default lam of safety-guided decoding ({DEFAULT_LAM:g}; at most {LAM_MAX:g}, as "
        "for requests)", Flag("L", type=float), default=DEFAULT_LAM)
    allow_other_model_vectors: bool = user_key(
        "`true`: serve a vector whose recorded model fingerprint differs from the served "
        "checkpoint's (refused by default)", Flag(switch=True), default=False)
    vector_dir: str | None = user_key(
        "a folder from which an operator may publish vectors while the server runs (`POST "
        "/v1/safeinfer/vectors`: [publishing](serving.md#publishing-vectors-without-a-"
        "restart)); publishing also needs an admin key (`--safeinfer-admin-key`, below)",
        default=None)
    vector_sha256: Mapping[str, str] = internal(default_factory=dict)
    """Each vector's identity, the sha256 of the bytes the API server read at start-up
    (`IDENTITIES_KEY`); empty where no start-up check ran (offline tools)."""

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
        """Parse and validate the `safeinfer` dict; a SafeInferConfigError names the
        offending key."""
        try:
            return cls._parse(raw)
        except SafeInferConfigError:
            raise
        except ValueError as exc:  # the checks shared with requests (numbers, modes)
            raise SafeInferConfigError(str(exc)) from exc

    @classmethod
    def _parse(cls, raw: Mapping[str, Any]) -> SafeInferConfig:
        if not isinstance(raw, Mapping):
            raise SafeInferConfigError(
                f"{CONFIG_KEY} config must be a JSON object, got {raw!r}")
        unknown = sorted(set(raw) - USER_KEYS)
        if unknown:
            raise SafeInferConfigError(
                f"unknown {CONFIG_KEY} config key(s) {unknown}; known: {sorted(USER_KEYS)}"
            )
        vectors: dict[str, str] = {}
        if raw.get("vector") is not None:
            vectors[DEFAULT_VECTOR_NAME] = _path(f"{CONFIG_KEY}.vector", raw["vector"])
        named = raw.get("vectors") or {}
        if not isinstance(named, Mapping):
            raise SafeInferConfigError(
                f"{CONFIG_KEY}.vectors must map names to files, got {named!r}")
        for name, path in named.items():
            if not isinstance(name, str) or not name:
                raise SafeInferConfigError(f"{CONFIG_KEY}.vectors: bad vector name {name!r}")
            if name in vectors:
                raise SafeInferConfigError(
                    f"{CONFIG_KEY}.vectors names {name!r}, which `vector` already defines"
                )
            vectors[name] = _path(f"{CONFIG_KEY}.vectors.{name}", path)
        default_vector = raw.get("default_vector")
        if default_vector is None and len(vectors) == 1:
            default_vector = next(iter(vectors))
        if default_vector is None and DEFAULT_VECTOR_NAME in vectors:
            default_vector = DEFAULT_VECTOR_NAME
        if default_vector is not None and default_vector not in vectors:
            raise SafeInferConfigError(
                f"{CONFIG_KEY}.default_vector {default_vector!r} is not among the "
                f"vectors {sorted(vectors)}"
            )
        layer = raw.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or layer < 0):
            raise SafeInferConfigError(
                f"{CONFIG_KEY}.layer must be a non-negative int, got {layer!r}")
        gamma = raw.get("gamma")
        if gamma is not None:
            gamma = check_gamma(f"{CONFIG_KEY}.gamma", gamma)
        enforce, allow_other, shares = (raw.get(key, False) for key in (
            "enforce", "allow_other_model_vectors", "expert_shares_weights"))
        for key, value in (("enforce", enforce), ("allow_other_model_vectors", allow_other),
                           ("expert_shares_weights", shares)):
            if not isinstance(value, bool):
                raise SafeInferConfigError(
                    f"{CONFIG_KEY}.{key} must be true or false, got {value!r}")
        expert_model = raw.get("expert_model")
        if expert_model is not None:
            expert_model = _path(f"{CONFIG_KEY}.expert_model", expert_model)
        expert_dtype = raw.get("expert_dtype")
        if expert_dtype is not None and not isinstance(expert_dtype, str):
            raise SafeInferConfigError(
                f"{CONFIG_KEY}.expert_dtype must be a string, got {expert_dtype!r}")
        if shares and (expert_model is None or expert_dtype is not None):
            raise SafeInferConfigError(
                f"{CONFIG_KEY}.expert_shares_weights needs an expert_model (an `ablate` "
                "expert) and no expert_dtype: the expert runs on the served model's own "
                "weights, in their dtype")
        probe_threshold = raw.get("probe_threshold")
        if probe_threshold is not None:
            probe_threshold = check_number(f"{CONFIG_KEY}.probe_threshold", probe_threshold,
                                           -math.inf, math.inf)
        defence = raw.get("defence")
        if defence is not None:
            try:
                defence = Mode.parse(defence)
            except ValueError as exc:
                raise SafeInferConfigError(f"{CONFIG_KEY}.defence: {exc}") from None
            if not defence.defends:
                raise SafeInferConfigError(
                    f"{CONFIG_KEY}.defence must be sa, sgds or safeinfer (what `auto` runs on "
                    f"a flagged request), got {defence.value!r}")
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
        if raw is None:
            return None
        return cls.from_dict(raw).with_identities((additional_config or {}).get(
            IDENTITIES_KEY) or {})

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

    def with_vector(self, name: str, path: str, sha256: str) -> SafeInferConfig:
        """This config with vector `name` (added or replaced): the contents `sha256`, read
        from `path`."""
        return replace(self, vectors={**self.vectors, name: path},
                       vector_sha256={**self.vector_sha256, name: sha256})

    def with_identities(self, identities: Mapping[str, str]) -> SafeInferConfig:
        """This config with the identity of each vector (name -> sha256)."""
        unknown = sorted(set(identities) - set(self.vectors))
        if unknown:
            raise SafeInferConfigError(f"{IDENTITIES_KEY} names vectors {unknown} that "
                                       f"{CONFIG_KEY}.vectors does not configure")
        return replace(self, vector_sha256=dict(identities))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the user keys; never an internal field), accepted back by
        `from_dict`."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata[_KEY]}
        out["vectors"] = dict(self.vectors)
        out["mode"] = self.mode.value
        if self.defence is not None:
            out["defence"] = self.defence.value
        return {k: v for k, v in out.items() if v is not None}


def declared_keys(config_class: type = SafeInferConfig) -> tuple[ConfigKey, ...]:
    """The user keys of `config_class`'s fields, in field order; a field declared with
    neither `user_key` nor `internal` is an error."""
    keys = []
    for item in fields(config_class):
        if _KEY not in item.metadata:
            raise TypeError(f"{config_class.__name__}.{item.name}: declare it with "
                            "user_key(help, flag) or internal()")
        if item.metadata[_KEY] is not None:
            keys.append(ConfigKey(item.name, *item.metadata[_KEY]))
    return tuple(keys)


CONFIG_KEYS: tuple[ConfigKey, ...] = (VECTOR_ALIAS, *declared_keys())
"""Every user key, in the docs' order."""
USER_KEYS = frozenset(key.name for key in CONFIG_KEYS)


def config_table() -> str:
    """The "Server keys" table of docs/configuration.md."""
    return markdown_table(("key", "meaning"), ((f"`{key.name}`", key.help)
                                               for key in CONFIG_KEYS))


def markdown_table(header: tuple[str, ...], rows) -> str:
    """A docs table: the header, then a row per tuple of cells (an empty cell stays blank)."""
    def line(cells) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def load_json_file(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SafeInferConfigError(f"cannot read SafeInfer config {path}: {exc}") from exc


def _path(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise SafeInferConfigError(f"{key} must be a file path, got {value!r}")
    return value
