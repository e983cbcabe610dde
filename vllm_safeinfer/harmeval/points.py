"""Sweep points: the (mode, gamma, lam) settings a run evaluates. Each becomes the
per-request `safeinfer_*` options of its requests, so every point runs in one engine.

`default` is a pseudo-mode that sends no SafeInfer option at all: the server's own
defaults, or the plain model on a server without SafeInfer. `auto:sa`, `auto:sgds` and
`auto:safeinfer` are mode `auto` with that defence; plain `auto` uses the server's."""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_safeinfer.common.config import SafeInferConfig, check_gamma, check_lam
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.request_options import DEFENCE_KEY, GAMMA_KEY, LAM_KEY, MODE_KEY
from vllm_safeinfer.common.vectors import SafetyVector

DEFAULT = "default"
MODES: tuple[str, ...] = (*(m.value for m in Mode), DEFAULT,
                          *(f"{Mode.AUTO.value}:{m.value}" for m in Mode if m.defends))
SWEEP_KEYS = ("gamma", "lam")


def split_mode(mode: str) -> tuple[Mode, Mode | None]:
    """A point's mode string -> (the request's mode, the defence `auto` runs: None for
    the server's, or when not `auto`)."""
    name, _, defence = mode.partition(":")
    return Mode(name), (Mode(defence) if defence else None)


def acting_mode(mode: str, config: SafeInferConfig | None) -> Mode:
    """What a flagged request of this point runs (the point's mode unless `auto`)."""
    if mode == DEFAULT:
        return config.mode if config is not None else Mode.OFF
    requested, defence = split_mode(mode)
    if requested is not Mode.AUTO:
        return requested
    if defence is not None:
        return defence
    return (config.default_defence if config is not None else None) or Mode.SAFEINFER


@dataclass(frozen=True)
class Point:
    """One setting of a run; `gamma`/`lam` None means the server's default."""

    mode: str
    gamma: float | None = None
    lam: float | None = None

    @property
    def key(self) -> str:
        """A readable, unique name: `sa gamma=0.5`, `safeinfer gamma=0.5 lam=0.9`. Values
        print as the shortest text that reads back as the same float, so two strengths
        never share a key."""
        parts = [self.mode]
        parts += [f"{name}={float(value)!r}" for name, value in (("gamma", self.gamma),
                                                                  ("lam", self.lam))
                  if value is not None]
        return " ".join(parts)

    def extra_args(self) -> dict[str, object]:
        """The request's `safeinfer_*` options."""
        if self.mode == DEFAULT:
            return {}
        mode, defence = split_mode(self.mode)
        args: dict[str, object] = {MODE_KEY: mode.value}
        if defence is not None:
            args[DEFENCE_KEY] = defence.value
        if self.gamma is not None:
            args[GAMMA_KEY] = self.gamma
        if self.lam is not None:
            args[LAM_KEY] = self.lam
        return args

    def to_dict(self) -> dict[str, object]:
        return {"point": self.key, "mode": self.mode, "gamma": self.gamma, "lam": self.lam}


def parse_sweep(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """`["gamma=0.25,0.5", "lam=0.9"]` -> `{"gamma": (0.25, 0.5), "lam": (0.9,)}`,
    checked against the ranges a request accepts."""
    sweep: dict[str, tuple[float, ...]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in SWEEP_KEYS or not values:
            raise ValueError(f"--sweep expects gamma=V,V,... or lam=V,V,...; got {item!r}")
        if name in sweep:
            raise ValueError(f"--sweep names {name} twice")
        check = check_gamma if name == "gamma" else check_lam
        try:
            numbers = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--sweep {name}: not a list of numbers: {values!r}") from None
        sweep[name] = tuple(dict.fromkeys(check(f"--sweep {name}", v) for v in numbers))
    return sweep


def plan_points(modes: Sequence[str], sweep: Mapping[str, Sequence[float]]) -> tuple[Point, ...]:
    """Every mode crossed with the sweep values it uses: `sa` takes the gammas, `sgds`
    the lams, `safeinfer` both, `off` and `default` neither; `auto` as its defence
    (plain `auto` as `safeinfer`)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    gammas = tuple(sweep.get("gamma") or (None,))
    lams = tuple(sweep.get("lam") or (None,))
    points: list[Point] = []
    for mode in dict.fromkeys(modes):
        acting = acting_mode(mode, None)
        steers, mixes = acting.steers, acting.mixes
        for gamma, lam in itertools.product(gammas if steers else (None,),
                                            lams if mixes else (None,)):
            points.append(Point(mode, gamma, lam))
    return tuple(points)


def servable_modes(config: SafeInferConfig | None) -> tuple[str, ...]:
    """The modes a configuration can serve: the default set of a run."""
    if config is None:
        return (DEFAULT,)
    modes = [Mode.OFF]
    if config.default_vector is not None:
        modes.append(Mode.SA)
    if config.has_expert:
        modes.append(Mode.SGDS)
        if config.default_vector is not None:
            modes.append(Mode.SAFEINFER)
    return tuple(m.value for m in modes)


def check_servable(points: Sequence[Point], config: SafeInferConfig | None) -> None:
    """Refuse, before any engine starts, a point the configuration cannot serve."""
    for point in points:
        if point.mode == DEFAULT:
            continue
        if config is None:
            raise ValueError(f"mode {point.mode!r} needs SafeInfer configured "
                             "(--safeinfer-config or --safeinfer-* flags)")
        mode, defence = split_mode(point.mode)
        config.check_mode_supported(mode, "--modes", vector=None)
        if defence is not None:
            config.check_mode_supported(defence, "--modes", vector=None)


def relative_doses(points: Sequence[Point], config: SafeInferConfig | None
                   ) -> dict[str, float | None]:
    """Each point's steering dose `gamma * |SV| / |h|` with the default vector, so a
    sweep's strengths read the same on every model; None where the point does not steer
    or the dose is unknown (no config, as against an endpoint; a file without the
    residual norm; a layer override)."""
    vector = None
    if config is not None and config.default_vector is not None:
        vector = SafetyVector.load(config.vectors[config.default_vector])
    doses: dict[str, float | None] = {}
    for point in points:
        mode = acting_mode(point.mode, config)
        dose = None
        if vector is not None and mode.steers and config.layer in (None, vector.layer):
            gamma = next(g for g in (point.gamma, config.gamma, vector.gamma) if g is not None)
            dose = vector.relative_dose(gamma)
        doses[point.key] = None if dose is None else round(dose, 4)
    return doses
