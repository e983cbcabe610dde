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

from vllm_safeinfer import data
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


SERVING = Path(__file__).parents[1] / "benchmarks" / "serving.py"
SERVING_RATIO = re.compile(r"(\w+)/vanilla tpot (\d+\.\d{3}) ttft (\d+\.\d{3})")


def test_quick_serving_measures_each_default_mode_on_dummy_weights(tmp_path):
    """`benchmarks/serving.py --quick` on a weightless copy of tiny Llama served with
    `--load-format dummy` (the GPU's 7B path): every server answered every request, each
    SafeInfer server counted them in its default mode (the client names no mode), the
    CSV holds vLLM's own numbers, and every printed ratio is the CSV's."""
    shape = tmp_path / "weightless"
    shutil.copytree(model_path("tiny-llama"), shape, ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "serving"
    done = subprocess.run([sys.executable, str(SERVING), "--quick", "--model", str(shape),
                           "--load-format", "dummy", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for name in ("serving.csv", "serving.md", "serving.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "serving.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["request_rate"]) for r in rows] == [
        (mode, rate) for mode in ("vanilla", "sa", "sgds", "safeinfer") for rate in ("4.0", "inf")]
    for row in rows:
        assert (row["completed"], row["failed"]) == ("8", "0"), row
        # 2 rates x (8 measured + 2 warm-up requests)
        assert row["served_in_mode"] == ("" if row["mode"] == "vanilla" else "20.0"), row
        raw = json.loads((out / "raw" / f"{row['mode']}-{row['request_rate']}.json").read_text())
        assert float(row["p50_tpot_ms"]) == raw["p50_tpot_ms"] > 0
        assert float(row["p99_ttft_ms"]) == raw["p99_ttft_ms"] > 0

    def metric(mode, rate, name):
        return next(float(r[name]) for r in rows if (r["mode"], r["request_rate"]) == (mode, rate))

    printed = {}
    for line in done.stdout.splitlines():
        if line.startswith("rate "):
            rate = line.split()[1]
            for mode, tpot, ttft in SERVING_RATIO.findall(line):
                printed[mode, rate] = (float(tpot), float(ttft))
    assert len(printed) == 6
    for (mode, rate), (tpot, ttft) in printed.items():
        assert round(metric(mode, rate, "p50_tpot_ms") / metric("vanilla", rate, "p50_tpot_ms"), 3) == tpot
        assert round(metric(mode, rate, "p50_ttft_ms") / metric("vanilla", rate, "p50_ttft_ms"), 3) == ttft


def test_quick_serving_mixed_traffic_in_mode_auto(tmp_path):
    """`--harmful-share`: real prompts, half harmful; the `auto` server's probe decided
    every request (flagged plus let through = every request it served) and the printed
    throughput ratio is the CSV's."""
    out = tmp_path / "serving"
    done = subprocess.run([sys.executable, str(SERVING), "--quick", "--modes", "vanilla", "auto",
                           "--harmful-share", "0.5", "--request-rates", "inf",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    prompts = json.loads((out / "raw" / "prompts.json").read_text())
    advbench = {p.text for p in data.evaluation_set("advbench").prompts}
    assert len(prompts) == 10 and sum(p["question"] in advbench for p in prompts) == 5
    assert all(p["question"] in p["conversations"][0]["value"] for p in prompts)
    with open(out / "serving.csv") as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    auto = rows["auto"]
    assert (auto["completed"], auto["failed"]) == ("8", "0")
    assert float(auto["flagged"]) + float(auto["let_through"]) == float(auto["served_in_mode"]) == 10
    ratio = float(auto["output_throughput"]) / float(rows["vanilla"]["output_throughput"])
    assert "auto/vanilla tpot" in done.stdout and f"throughput {ratio:.3f}" in done.stdout
    bad = subprocess.run([sys.executable, str(SERVING), "--harmful-share", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--harmful-share must be in [0, 1]" in bad.stderr


def test_llama2_7b_shape_is_a_weightless_llama2_7b(tmp_path):
    """The GPU benchmarks' 7B: Llama-2-7B's parameter count on the meta device, no
    weight file, a tokenizer inside its vocabulary, and the random vector the benchmarks
    steer it with fits it."""
    import argparse

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from subjects import resolve_subjects
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from vllm_safeinfer.common.vectors import SafetyVector

    path = model_path("llama2-7b-shape")
    assert not list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert len(AutoTokenizer.from_pretrained(path)) <= config.vocab_size
    args = argparse.Namespace(model="llama2-7b-shape", expert=None, vector=None,
                              expert_shares_weights=False)
    subjects = resolve_subjects(args, tmp_path)
    assert subjects.model == subjects.expert == str(path)
    vector = SafetyVector.load(subjects.vector)
    assert (vector.hidden_size, vector.num_layers, vector.layer) == (4096, 32, 8)


def test_quick_profile_shows_the_steering_op_only_where_it_runs(tmp_path):
    """`benchmarks/profile_step.py --quick`: the step table covers vanilla, off and sa;
    the profiler saw the steering op once per step in the plugin's engine and never in
    vanilla vLLM's; the plugin's Python shows up under cProfile."""
    out = tmp_path / "profile"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "profile_step.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((out / "profile.json").read_text())
    assert sorted(results["step_ms"]) == ["off", "sa", "vanilla"]
    assert all(len(v) == 3 and min(v) > 0 for v in results["step_ms"].values())
    profiles = results["profiles"]
    assert "safeinfer::steer_" not in profiles["vanilla"]["all_ops"]
    for mode in ("off", "sa"):
        assert profiles[mode]["all_ops"]["safeinfer::steer_"][1] == 1.0
        assert any("update_state" in fn[0] for fn in profiles[mode]["python"])
    assert profiles["vanilla"]["python"] == []
    assert all(profiles[m]["phases_ms"]["gpu_model_runner: forward"] > 0 for m in profiles)
    assert "| speed vs vanilla | 1.000 |" in (out / "profile.md").read_text()
