"""`make dist`'s wheel carries the package data and installs no top-level `kernels`."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)], check=True)
    [wheel] = tmp_path.glob("vllm_safeinfer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "vllm_safeinfer/plugin.py",
        "vllm_safeinfer/harmeval/run.py",
        "vllm_safeinfer/offline/expert/finetune.py",
        "vllm_safeinfer/models/registry.py",
        "vllm_safeinfer/bundled/smollm2-135m-instruct.calibration.json",
        "vllm_safeinfer/kernels/steer.py",
        "vllm_safeinfer/kernels/mix.py",
        "vllm_safeinfer/bundled/smollm2-135m-instruct.safetensors",
        "vllm_safeinfer/data/README.md",
        "vllm_safeinfer/data/advbench/advbench_harmful_behaviors.json",
        "vllm_safeinfer/data/advbench/LICENSE.SafeDecoding.MIT",
        "vllm_safeinfer/data/xstest/LICENSE.CC-BY-4.0",
        "vllm_safeinfer/data/refusal_prefixes_gcg.txt",
    }
    assert expected <= names, sorted(expected - names)
    data_dir = ROOT / "vllm_safeinfer" / "data"
    for folder in sorted(d for d in data_dir.iterdir() if d.is_dir() and d.name != "__pycache__"):
        licenses = sorted(f.name for f in folder.iterdir() if f.name.startswith("LICENSE"))
        assert licenses, f"vendored dataset {folder.name} has no license file"
        assert {f"vllm_safeinfer/data/{folder.name}/{name}" for name in licenses} <= names, \
            f"the wheel lacks {folder.name}'s license"
        mit = [name for name in licenses if "MIT" in name]
        for name in mit:
            text = (folder / name).read_text()
            assert "Permission is hereby granted" in text and "Copyright" in text, \
                f"{folder.name}/{name} is not the MIT license text"
    assert not any(n.startswith("kernels/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "safeinfer = vllm_safeinfer.plugin:register" in text
    assert "safeinfer = vllm_safeinfer.cli:main" in text
