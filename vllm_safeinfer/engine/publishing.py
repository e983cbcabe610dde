"""A vector publication inside a worker, in two phases so that a publication that fails
anywhere leaves every process as it was: `stage_vector` checks the bytes the frontend
read (their sha256, the file, its shape against the model) and loads them into a row reached only by their
identity; `finish_publish` binds the name to it, or gives the row and the name back.
Between the two, the engine core switches the name's identity (`prefix_cache`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.vectors import SafetyVector, content_sha256

if TYPE_CHECKING:
    from vllm_safeinfer.engine.logits_processor import SafeInferLogitsProcessor


@dataclass(frozen=True)
class StagedVector:
    """A publication in flight in this worker: what `finish_publish` commits or undoes."""

    name: str
    sha256: str
    took_row: bool
    config_before: SafeInferConfig


def stage_vector(processor: SafeInferLogitsProcessor, name: str, where: str, data: bytes,
                 sha256: str) -> None:
    """Phase one of publishing (`Worker.safeinfer_stage_vector`): check that the bytes
    are those the frontend read (their sha256; the frontend checked them against the
    served model's fingerprint, which every worker shares), and load them into a row that
    requests reach only through the identity the engine core stamps on them."""
    if processor.staged is not None:
        finish_publish(processor, processor.staged.sha256, commit=False)
    if content_sha256(data) != sha256:
        raise ValueError(f"vector {name!r} arrived with contents other than the frontend "
                         f"checked (sha256 {content_sha256(data)[:12]}, expected "
                         f"{sha256[:12]})")
    vector = SafetyVector.from_bytes(data, where)
    took_row = processor.state.stage_vector(name, where, vector, sha256)
    processor.staged = StagedVector(name, sha256, took_row, processor.config)
    processor.config = processor.config.with_vector(name, where)


def finish_publish(processor: SafeInferLogitsProcessor, sha256: str, commit: bool) -> None:
    """Phase two (`Worker.safeinfer_finish_publish`): bind the name to the staged row, or
    give the row and the name back (the publication failed elsewhere)."""
    staged = processor.staged
    if staged is None or staged.sha256 != sha256:
        return
    processor.staged = None
    if commit:
        processor.state.vectors.bind(staged.name, sha256)
        return
    processor.config = staged.config_before
    if staged.took_row:
        processor.state.unstage_vector(sha256)
