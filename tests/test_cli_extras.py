"""A command whose optional dependency is missing names the extra that installs it and
exits with status 2, no traceback: `harmeval` and `calibrate` without openai (extra
`eval`), `expert build` without peft (extra `expert`). Each runs in a subprocess whose
`sys.modules` holds None for the package, which makes importing it fail; the arguments
reach that import before any model loads or any file is written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN_RUN = ("import sys; sys.modules[{package!r}] = None; "
              "from vllm_safeinfer.cli import main; sys.exit(main({argv!r}))")


@pytest.mark.parametrize(("package", "extra", "command", "arguments"), [
    ("openai", "eval", ["harmeval"], ["--model", "tiny-llama", "--dataset", "advbench"]),
    ("openai", "eval", ["calibrate"], ["--model", "tiny-llama", "--vector", "sv.safetensors"]),
    ("peft", "expert", ["expert", "build"], ["--model", "tiny-llama"]),
])
def test_a_missing_optional_dependency_names_its_extra(
        tmp_path: Path, package: str, extra: str, command: list[str],
        arguments: list[str]) -> None:
    out = tmp_path / "out"
    argv = [*command, *arguments, "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", HIDDEN_RUN.format(package=package, argv=argv)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"safeinfer {' '.join(command)} needs the optional dependency "
                           f"'{package}': pip install 'vllm-safeinfer[{extra}]'\n")
    assert not out.exists()
