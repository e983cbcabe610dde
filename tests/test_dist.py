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
        "vllm_safeinfer/offline/expert.py",
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
    assert not any(n.startswith("kernels/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "safeinfer = vllm_safeinfer.plugin:register" in text
    assert "safeinfer = vllm_safeinfer.cli:main" in text
