"""Each vector file read once per process, every read held to one identity.

The API server reads each configured file at start-up (`read_new`) and hands its identity,
the sha256 of its bytes, on inside the config to the engine core (which needs nothing
else) and the workers. A worker reads the file once to steer with it (`read_as`) and
refuses to start when the bytes are not those: a file rewritten between two start-ups
never makes one identity name two contents. Bytes are kept by identity, so a process that
holds them already (the API server's own table, an offline `LLM` in one process) never
reads the file again.
"""
from __future__ import annotations

from pathlib import Path

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.vectors import content_sha256, read_vector_file

_held: dict[str, bytes] = {}  # sha256 -> the bytes this process read with that identity


class VectorChanged(ValueError):
    """A vector file's bytes are not those its identity names."""


def read_new(path: str | Path) -> tuple[bytes, str]:
    """Read a file whose identity is not known yet: its bytes and their sha256."""
    data = read_vector_file(path)
    sha256 = content_sha256(data)
    _held.setdefault(sha256, data)
    return data, sha256


def read_as(path: str | Path, sha256: str) -> bytes:
    """The bytes of identity `sha256`, read from `path` unless this process holds them;
    VectorChanged when the file now holds other bytes."""
    data = _held.get(sha256)
    if data is not None:
        return data
    data = read_vector_file(path)
    found = content_sha256(data)
    if found != sha256:
        raise VectorChanged(
            f"safety vector file {path} changed after the API server read it (sha256 "
            f"{found[:12]}, the server's {sha256[:12]}): this process refuses to steer with "
            "other contents than the rest of the server; restart the server to serve the "
            "new file")
    _held[sha256] = data
    return data


def identify(config: SafeInferConfig) -> SafeInferConfig:
    """`config` with the identity of each configured vector, read here (`read_new`): the
    start-up's one read, whose identities every later read is held to."""
    return config.with_identities(
        {name: read_new(path)[1] for name, path in sorted(config.vectors.items())})
