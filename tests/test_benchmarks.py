"""`benchmarks/throughput.py --quick` end to end, on a copy of tiny Llama whose context is
512 positions (shorter than the benchmark's old fixed limit): every output file exists,
and every ratio it prints is the one computed from the measurements in its CSV."""
from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from vllm_safeinfer.models import model_path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"
RATIO = re.compile(r"(\S+/\S+(?: bound)?) (\d+\.\d{3}) \[(\d+\.\d{3}), (\d+\.\d{3})\]")


def test_quick_throughput_writes_every_file_and_honest_ratios(tmp_path):
    short = tmp_path / "short-context"
    shutil.copytree(model_path("tiny-llama"), short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 512
    (short / "config.json").write_text(json.dumps(config))
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model", str(short),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("throughput.csv", "throughput_runs.csv", "throughput.md", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "throughput_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {r["mode"] for r in runs} == {"vanilla", "off", "sa", "sa-half", "expert-alone",
                                         "sgds", "safeinfer", "hf"}
    assert all(float(r["peak_memory_mb"]) > 0 and float(r["step_ms"]) > 0 for r in runs)

    def tokens(mode, batch, repeat=None):
        values = [float(r["tokens_per_s"]) for r in runs if r["mode"] == mode
                  and int(r["batch_size"]) == batch
                  and (repeat is None or int(r["repeat"]) == repeat)]
        return statistics.median(values)

    printed = {}
    for line in done.stdout.splitlines():
        if line.startswith("batch "):
            batch = int(line.split()[1])
            for name, mid, lo, hi in RATIO.findall(line):
                printed[name, batch] = (float(mid), float(lo), float(hi))
    assert ("sa/vanilla", 1) in printed and ("safeinfer/hf", 4) in printed
    for (name, batch), (mid, lo, hi) in printed.items():
        top, bottom = name.split("/")
        if bottom == "vanilla":
            want = [tokens(top, batch, r) / tokens("vanilla", batch, r) for r in (0, 1)]
            assert round(tokens(top, batch) / tokens("vanilla", batch), 3) == mid
        elif bottom == "hf":
            want = [tokens("safeinfer", batch, r) / tokens("hf", batch, r) for r in (0, 1)]
            assert round(tokens("safeinfer", batch) / tokens("hf", batch), 3) == mid
        else:
            def bound(r=None):
                return 1 / (1 / tokens("vanilla", batch, r) + 1 / tokens("expert-alone", batch, r))
            want = [tokens("safeinfer", batch, r) / bound(r) for r in (0, 1)]
            assert round(tokens("safeinfer", batch) / bound(), 3) == mid
        assert (round(min(want), 3), round(max(want), 3)) == (lo, hi), name
    assert f"| sa/vanilla | 1 | {printed['sa/vanilla', 1][0]:.3f} |" in (out / "throughput.md").read_text()
