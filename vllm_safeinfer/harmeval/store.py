"""Crash-safe storage of a run's responses: `responses.jsonl` grows one flushed line per
finished response, `run.json` pins the run's settings. `--resume` reloads both, drops a
line cut short by a crash, and refuses settings that differ; the finished run rewrites
the file in a canonical order, so a resumed run ends with the same bytes as an
uninterrupted one."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RESPONSES = "responses.jsonl"
SETTINGS = "run.json"

Record = dict[str, Any]


def record_key(record: Mapping[str, Any]) -> tuple[str, str]:
    return record["point"], record["prompt_id"]


class ResponseStore:
    def __init__(self, out: Path, settings: Mapping[str, Any], *, resume: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / RESPONSES
        settings_path = out / SETTINGS
        if settings_path.exists() or self.path.exists():
            if not resume:
                raise ValueError(f"{out} holds a run already: pass --resume to continue it, "
                                 "or choose another --out")
            _check_same_settings(settings_path, settings)
        else:
            write_atomically(settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.records: dict[tuple[str, str], Record] = {}
        if self.path.exists():
            self._load()
        self._handle = self.path.open("a", encoding="utf-8")

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.records

    def append(self, record: Record) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records[record_key(record)] = record

    def finalize(self, order: Callable[[Record], Any]) -> list[Record]:
        """Rewrite `responses.jsonl` sorted by `order`; returns the records."""
        self._handle.close()
        records = sorted(self.records.values(), key=order)
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        write_atomically(self.path, text)
        return records

    def close(self) -> None:
        self._handle.close()

    def _load(self) -> None:
        good = 0
        with self.path.open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.records[record_key(record)] = record
                good += len(line)
        if good != self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(good)


def write_atomically(path: Path, text: str | bytes) -> None:
    """Replace `path` so that a crash leaves the old file or the new one, never a torn
    one: the new bytes reach the disk before the rename, the rename before returning."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(text.encode() if isinstance(text, str) else text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _check_same_settings(path: Path, settings: Mapping[str, Any]) -> None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--resume: cannot read the run's settings {path}: {exc}") from exc
    current = json.loads(json.dumps(settings))
    differ = _differences(saved, current)
    if differ:
        raise ValueError(f"--resume: these settings differ from the run in {path.parent}: "
                         f"{', '.join(differ)}")


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """The dotted names of the values that differ, as deep as both are objects."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [where or "settings"]
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{where}.{key}" if where else key
        if key not in saved or key not in current:
            out.append(name)
        else:
            out += _differences(saved[key], current[key], name)
    return out
