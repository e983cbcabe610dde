"""The server's named safety vectors as one `[rows, hidden]` fp32 table, kept alike in
the API server (to check and describe), and in each worker (to steer).

A vector is identified by the sha256 of its file's bytes: that identity names its row,
is stamped on every request that steers with it (the engine core's prefix-cache key) and
is all a worker goes by to pick a request's row. The bytes are those the API server read
at start-up (`vector_files`). With a `vector_dir`, `RELOAD_SLOTS` spare rows take vectors
published while the server runs. Publishing is staged: `stage` adds the row (reached by
its identity only), `bind` makes the name point at it (the API server's table, which
describes and checks), `unstage` takes back the last row taken, before any request was
stamped with it. Rows in use are never reused, so a running request keeps the contents
it started with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.vector_files import read_as, read_new
from vllm_safeinfer.common.vectors import ADD, PROJECT, SafetyVector

RELOAD_SLOTS = 16


@dataclass(frozen=True)
class LoadedVector:
    """A vector's row in the table, the layers it steers and how (`projects`: target
    projection, else an add; `answer_tokens`: how many positions, 0 for all), its norm
    `|SV|` (a projection's target is `gamma * |SV|`), its default strength, that
    strength's relative dose `gamma * |SV| / |h|` (None when the file does not record the
    residual norm, or when the config moves the vector off the layer it was measured at)
    and the sha256 of its file (its identity)."""

    index: int
    layers: tuple[int, ...]
    projects: bool
    answer_tokens: int
    norm: float
    gamma: float
    dose: float | None
    sha256: str

    def describe(self) -> dict[str, object]:
        """What the operator endpoints show of it."""
        return {"layers": list(self.layers), "steering": PROJECT if self.projects else ADD,
                "answer_tokens": self.answer_tokens, "default_gamma": self.gamma,
                "relative_dose": self.dose}


class VectorTable:
    """Named vectors (`entries`: the current contents of each name) and every row by its
    identity (`by_sha256`)."""

    def __init__(self, config: SafeInferConfig, model_config) -> None:
        self.entries: dict[str, LoadedVector] = {}
        self.by_sha256: dict[str, LoadedVector] = {}
        self._config = config
        self._model_config = model_config
        rows = []
        for index, (name, path) in enumerate(sorted(config.vectors.items())):
            sha256 = config.vector_sha256.get(name)
            if sha256 is None:
                data, sha256 = read_new(path)
            else:
                data = read_as(path, sha256)
            vector = SafetyVector.from_bytes(data, path)
            entry = self._entry(name, path, vector, index, sha256)
            self.entries[name] = entry
            self.by_sha256.setdefault(entry.sha256, entry)
            rows.append(vector.vector.float())
        hidden = model_config.get_hidden_size()
        spare = RELOAD_SLOTS if config.vector_dir is not None else 0
        self.table = torch.zeros(len(rows) + spare or 1, hidden)
        if rows:
            self.table[:len(rows)] = torch.stack(rows)
        self.units = unit_rows(self.table)
        self._used = len(rows)
        self.layers: tuple[int, ...] = tuple(sorted(
            {layer for e in self.entries.values() for layer in e.layers}
            | ({config.layer} if config.layer is not None and config.vector_dir else set())))

    @property
    def rows_used(self) -> int:
        return self._used

    def _entry(self, name: str, where: str, vector: SafetyVector, index: int,
               sha256: str) -> LoadedVector:
        config, model_config = self._config, self._model_config
        vector.check_compatible(model_config)
        total = model_config.hf_config.num_hidden_layers
        layers = vector.layers
        if config.layer is not None:
            if len(layers) != 1:
                raise ValueError(f"safety vector {name!r} ({where}) steers layers "
                                 f"{list(layers)}: the config's single `layer` cannot move it")
            layers = (config.layer,)
        if not all(0 <= layer < total for layer in layers):
            raise ValueError(
                f"safety vector {name!r} ({where}): layers {list(layers)} are outside the "
                f"model's {total} decoder layers"
            )
        gamma = float(config.gamma if config.gamma is not None else vector.gamma)
        dose = vector.relative_dose(gamma) if layers == vector.layers else None
        return LoadedVector(index, layers, vector.projects, vector.answer_tokens,
                            float(vector.vector.norm()), gamma, dose, sha256)

    def check_publishable(self, name: str, where: str, vector: SafetyVector,
                          sha256: str) -> LoadedVector:
        """The entry `vector` would get (its existing row when these contents are loaded
        already), or ValueError saying why it cannot be published."""
        if self._config.vector_dir is None:
            raise ValueError("this server has no vector_dir: vectors cannot be published")
        if sha256 in self.by_sha256:
            return self.by_sha256[sha256]
        if self._used >= self.table.shape[0]:
            raise ValueError(f"all {RELOAD_SLOTS} slots for published vectors are used: "
                             "restart the server to publish more")
        entry = self._entry(name, where, vector, self._used, sha256)
        unsteered = sorted(set(entry.layers) - set(self.layers))
        if unsteered:
            raise ValueError(f"{where} steers layers {unsteered}, which this server does not "
                             f"steer (steered: {list(self.layers)}); restart with them "
                             "configured")
        return entry

    def stage(self, name: str, where: str, vector: SafetyVector, sha256: str
              ) -> tuple[LoadedVector, bool]:
        """Load `vector` into a row (unless its contents are loaded already); returns its
        entry and whether a row was taken. No name points at it until `bind`."""
        entry = self.check_publishable(name, where, vector, sha256)
        if sha256 in self.by_sha256:
            return entry, False
        self.table[entry.index] = vector.vector.float()
        self.units[entry.index] = unit_rows(self.table[entry.index:entry.index + 1])[0]
        self._used += 1
        self.by_sha256[sha256] = entry
        return entry, True

    def unstage(self, sha256: str) -> None:
        """Give back the row `stage` took for `sha256` (the last one taken)."""
        entry = self.by_sha256.pop(sha256)
        if entry.index != self._used - 1 or entry in self.entries.values():
            raise RuntimeError(f"row {entry.index} of vector {sha256[:12]} is in use")
        self.table[entry.index] = 0
        self.units[entry.index] = 0
        self._used -= 1

    def bind(self, name: str, sha256: str) -> LoadedVector:
        """From now on `name` means the contents `sha256`."""
        self.entries[name] = self.by_sha256[sha256]
        return self.entries[name]

    def row(self, sha256: str) -> LoadedVector:
        """The entry of the contents a request is stamped with. Every process loads the
        same bytes under the same identity (`vector_files`) and workers stage a published
        vector before the engine core stamps it, so a miss is a broken invariant."""
        entry = self.by_sha256.get(sha256)
        if entry is None:
            raise RuntimeError(f"SafeInfer: a request is stamped with vector contents "
                               f"{sha256[:12]} that this process never loaded")
        return entry


def unit_rows(table: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (a zero row stays zero): the directions a
    projection sets the residual's component along."""
    norms = table.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, table / norms.clamp_min(torch.finfo(table.dtype).tiny), 0.0)
