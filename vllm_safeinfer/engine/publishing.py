"""A vector publication inside a worker. `stage_vector` checks the bytes the API server
read (their sha256, the file, its shape against the model) and loads them into a row
reached only by their identity; the engine core then stamps new requests naming the
vector with that identity, and that switch is the publication's commit: a worker steers
by the stamp alone, so it has nothing to bind. A publication that fails before the switch
is taken back (`take_back_vector`), and a row is never taken back while a request steers
with it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_safeinfer.common.vectors import SafetyVector, content_sha256

if TYPE_CHECKING:
    from vllm_safeinfer.engine.logits_processor import SafeInferLogitsProcessor


@dataclass(frozen=True)
class StagedVector:
    """This worker's last staging: what `take_back_vector` may undo."""

    sha256: str
    took_row: bool


def stage_vector(processor: SafeInferLogitsProcessor, name: str, where: str, data: bytes,
                 sha256: str) -> None:
    """`Worker.safeinfer_stage_vector`: check that the bytes are those the API server
    read (their sha256; it checked them against the served model's fingerprint, which
    every worker shares), and load them into a row requests reach only through the
    identity the engine core stamps on them."""
    if content_sha256(data) != sha256:
        raise ValueError(f"vector {name!r} arrived with contents other than the frontend "
                         f"checked (sha256 {content_sha256(data)[:12]}, expected "
                         f"{sha256[:12]})")
    vector = SafetyVector.from_bytes(data, where)
    took_row = processor.state.stage_vector(name, where, vector, sha256)
    processor.staged = StagedVector(sha256, took_row)


def take_back_vector(processor: SafeInferLogitsProcessor, sha256: str) -> None:
    """`Worker.safeinfer_take_back_vector`: give back the row the last staging of
    `sha256` took (the publication failed before the engine core stamped it)."""
    staged = processor.staged
    if staged is None or staged.sha256 != sha256:
        return
    processor.staged = None
    if staged.took_row:
        processor.state.unstage_vector(sha256)
