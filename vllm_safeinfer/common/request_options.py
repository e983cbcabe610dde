"""Per-request SafeInfer options: flat `safeinfer_*` keys of `SamplingParams.extra_args`
(`extra_body={"vllm_xargs": {...}}` on the OpenAI server), validated against the server
config and resolved into the settings one request runs with."""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from vllm_safeinfer.common.config import CONFIG_KEY, SafeInferConfig, check_gamma, check_lam
from vllm_safeinfer.common.modes import Mode

PREFIX = "safeinfer_"
MODE_KEY = "safeinfer_mode"
GAMMA_KEY = "safeinfer_gamma"
VECTOR_KEY = "safeinfer_vector"
LAM_KEY = "safeinfer_lam"
DEFENCE_KEY = "safeinfer_defence"
REQUEST_KEYS = (MODE_KEY, GAMMA_KEY, VECTOR_KEY, LAM_KEY, DEFENCE_KEY)


@dataclass(frozen=True)
class RequestSettings:
    """What one request runs with. `gamma` None means the server's default (config, then
    the vector file); `vector` is None unless the mode steers, `lam` unless it mixes.
    `gated` (mode `auto`): `mode` is the defence, run only if the harm probe flags the
    prompt; otherwise the request runs as `off`."""

    mode: Mode
    vector: str | None = None
    gamma: float | None = None
    lam: float | None = None
    gated: bool = False

    def kv_key(self, vector_sha256: str | None = None, gate: str = "") -> str | None:
        """Identity of what shapes this request's KV cache from its last prompt token on
        (None when nothing does): requests with different keys must never share
        prefix-cache blocks from there on. `vector_sha256` is the content identity of the
        vector it steers with (so no API server, restart or republication can give two
        contents one key); `gate` names the harm probe of a gated request,
        whose KV depends on the probe's decision (steered or not, the expert's KV
        written or skipped)."""
        if not self.mode.steers and not self.gated:
            return None
        gamma = "default" if self.gamma is None else repr(self.gamma)
        steering = f"{vector_sha256}|{gamma}" if self.mode.steers else "unsteered"
        gating = f"|auto:{self.mode.value}:{gate}" if self.gated else ""
        return hashlib.sha256(f"{steering}{gating}".encode()).hexdigest()[:16]


def resolve_request(extra_args: Mapping[str, Any] | None,
                    config: SafeInferConfig | None) -> RequestSettings:
    """Validate a request's `safeinfer_*` keys against the server config.

    Raises ValueError (HTTP 400 on the server) naming the key at fault.
    """
    given = {k: v for k, v in (extra_args or {}).items() if k.startswith(PREFIX)}
    unknown = sorted(set(given) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown SafeInfer option(s) {unknown}; known: {list(REQUEST_KEYS)}")
    if config is None:
        if given:
            raise ValueError(
                f"SafeInfer option(s) {sorted(given)} sent, but SafeInfer is not configured "
                f"on this server (additional_config[{CONFIG_KEY!r}])"
            )
        return RequestSettings(Mode.OFF)
    if given and config.enforce:
        raise ValueError(
            f"this server enforces its SafeInfer configuration; remove {sorted(given)} "
            "from the request"
        )
    mode = config.mode
    mode_key = MODE_KEY if MODE_KEY in given else f"{CONFIG_KEY}.mode"
    if MODE_KEY in given:
        try:
            mode = Mode.parse(given[MODE_KEY])
        except ValueError as exc:
            raise ValueError(f"{MODE_KEY}: {exc}") from None
    gated = mode is Mode.AUTO
    if DEFENCE_KEY in given and not gated:
        raise ValueError(f"{DEFENCE_KEY} has no effect in mode {mode.value!r}; it names what "
                         "mode 'auto' runs on a flagged request")
    if gated:
        config.check_mode_supported(mode, mode_key, vector=None)
        mode = config.default_defence
        if DEFENCE_KEY in given:
            try:
                mode = Mode.parse(given[DEFENCE_KEY])
            except ValueError as exc:
                raise ValueError(f"{DEFENCE_KEY}: {exc}") from None
            if not mode.defends:
                raise ValueError(f"{DEFENCE_KEY} must be sa, sgds or safeinfer, got "
                                 f"{mode.value!r}")
        mode_key = DEFENCE_KEY if DEFENCE_KEY in given else f"{CONFIG_KEY}.defence"
    vector = given.get(VECTOR_KEY)
    if vector is not None:
        if not isinstance(vector, str) or vector not in config.vectors:
            raise ValueError(
                f"{VECTOR_KEY} {vector!r} is not a loaded vector (the server's API key "
                "lists them: GET /v1/safeinfer)"
            )
    gamma = check_gamma(GAMMA_KEY, given[GAMMA_KEY]) if GAMMA_KEY in given else None
    lam = check_lam(LAM_KEY, given[LAM_KEY]) if LAM_KEY in given else None
    for key, needed, what in ((VECTOR_KEY, mode.steers, "steer"),
                              (GAMMA_KEY, mode.steers, "steer"),
                              (LAM_KEY, mode.mixes, "mix in the expert")):
        if key in given and not needed:
            raise ValueError(
                f"{key} has no effect in mode {mode.value!r}, which does not {what}"
            )
    config.check_mode_supported(mode, mode_key, vector=vector)
    if mode.mixes and lam is None:
        lam = config.lam
    if not mode.steers:
        return RequestSettings(mode, lam=lam, gated=gated)
    return RequestSettings(mode, vector=vector or config.default_vector, gamma=gamma, lam=lam,
                           gated=gated)


def resolve_or_defaults(extra_args: Mapping[str, Any] | None, config: SafeInferConfig
                        ) -> tuple[RequestSettings, ValueError | None]:
    """Resolution inside the engine, where nothing may raise: a request that reached it
    without the frontend's validation and cannot be resolved runs with the server's
    defaults, and the error comes back for the caller to log. The engine core (cache
    identity) and the worker (steering, mixing) both resolve this way, so they agree."""
    try:
        return resolve_request(extra_args, config), None
    except ValueError as err:
        return resolve_request(None, config), err


def check_json_types(options: Mapping[str, Any]) -> None:
    """What the OpenAI server's request models would hide: they read `vllm_xargs` values
    as strings or numbers and turn JSON true/false into 1/0, so a `"safeinfer_gamma":
    true` would steer at gamma 1. Checked on the raw JSON, before they convert it."""
    for key, value in options.items():
        if key.startswith(PREFIX) and isinstance(value, bool):
            kind = "number" if key in (GAMMA_KEY, LAM_KEY) else "string"
            raise ValueError(f"{key} must be a {kind}, got bool {value!r}")


@dataclass
class Validation:
    """One request's validation in the frontend: the config it is checked against and,
    once `validate` ran, what it resolved to (the frontend's metrics read it)."""

    config: SafeInferConfig | None
    settings: RequestSettings | None = None


# `validate_params` (vLLM's logits-processor hook) receives only the SamplingParams, yet
# the checks need the server's config. The frontend's InputProcessor knows it and opens a
# `Validation` here around each request; a context variable, not a global, so two engines
# in one process (tests, a Ray actor) each validate against their own config.
_validating: ContextVar[Validation | None] = ContextVar("safeinfer_validation", default=None)


@contextlib.contextmanager
def validating_with(config: SafeInferConfig | None) -> Iterator[Validation]:
    """Within the block, `validate` checks against `config` and records the result."""
    validation = Validation(config)
    token = _validating.set(validation)
    try:
        yield validation
    finally:
        _validating.reset(token)


def validate(extra_args: Mapping[str, Any] | None) -> RequestSettings:
    """The frontend's one resolution of a request (vLLM's `validate_params`), against the
    config of the InputProcessor validating it (none outside one)."""
    validation = _validating.get()
    settings = resolve_request(extra_args, None if validation is None else validation.config)
    if validation is not None:
        validation.settings = settings
    return settings
