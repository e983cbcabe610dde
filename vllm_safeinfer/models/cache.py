"""The build cache: where every built model, expert and evidence artefact lives, and how
a build lands there, so a build interrupted or run twice at once never leaves half a
checkpoint behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "VLLM_SAFEINFER_CACHE"


def cache_dir() -> Path:
    """Root of the build cache (`$VLLM_SAFEINFER_CACHE`, default ~/.cache/vllm_safeinfer)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vllm_safeinfer"
    return Path(root)


def build_atomically(out: Path, build: Callable[[Path], object]) -> None:
    """Build into a temporary sibling and rename, so concurrent or interrupted builds
    never leave a half-written checkpoint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
