"""The SafeInfer modes a request can run in."""
from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """`sa` steers (safety amplification), `sgds` mixes in the expert (safety-guided
    decoding), `safeinfer` does both, `off` neither. `auto` lets the harm probe decide
    per request: a flagged request runs its defence (one of the three), the others `off`."""

    OFF = "off"
    SA = "sa"
    SGDS = "sgds"
    SAFEINFER = "safeinfer"
    AUTO = "auto"

    @property
    def defends(self) -> bool:
        """A defence `auto` can run: `sa`, `sgds` or `safeinfer`."""
        return self.steers or self.mixes

    @property
    def steers(self) -> bool:
        return self in (Mode.SA, Mode.SAFEINFER)

    @property
    def mixes(self) -> bool:
        return self in (Mode.SGDS, Mode.SAFEINFER)

    @classmethod
    def parse(cls, value: object) -> "Mode":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        names = ", ".join(m.value for m in cls)
        raise ValueError(f"mode must be one of {names}; got {value!r}")
