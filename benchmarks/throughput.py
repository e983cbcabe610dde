"""Generation throughput of SafeInfer in vLLM against vanilla vLLM and the HF reference.

Each engine lives in its own process for the whole run, so the modes can be measured
interleaved (repeat by repeat) under the same machine conditions:

- `vanilla`: the served model in vLLM without the plugin (`VLLM_PLUGINS=""`);
- `off`, `sa`, `sa-half`: one engine with the plugin and a safety vector, requests in
  mode off, all in mode sa, half and half;
- `expert-alone`: the expert model alone in vanilla vLLM (T_expert);
- `sgds`, `safeinfer`: one engine with the plugin, the vector and the expert;
- `safeinfer-separate`: with `--expert-shares-weights`, the same expert checkpoint run
  as a model of its own (its weights loaded, its own forward), to set against
  `safeinfer`'s rows inside the served model's forward;
- `hf`: `vllm_safeinfer.offline.reference` (HF transformers, batched) in mode safeinfer.

Any model: limits come from the model (or `--max-model-len`); prompts are the
chat-formatted AdvBench evaluation goals, or `--input-len` synthetic token ids.
Per mode and batch size it records tokens/s, the time per decoding step (ms per output
token of each request) and the peak resident memory of the engine's processes (their
high-water marks summed; device memory in use on a GPU), over interleaved repeats.

Writes into `--out`: `throughput_runs.csv` (every measurement), `throughput.csv`
(min / median / max per mode and batch size), `throughput.md` (the table and the ratios,
each ratio with its spread over the repeats) and `throughput.png`; prints the ratios.

    python benchmarks/throughput.py --model smollm2-135m-instruct --batch-sizes 1 8 32 128
    python benchmarks/throughput.py --quick --out /tmp/bench     # a tiny model, seconds
    python benchmarks/throughput.py --model llama2-7b-shape --load-format dummy \
        --dtype bfloat16 --input-len 512 --output-len 128          # GPU: a 7B, no download
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

from engine_pool import engine_pool
from subjects import add_subject_arguments, parse_benchmark_args, resolve_subjects

ENGINE_OF_MODE = {
    "vanilla": "vanilla", "off": "steer", "sa": "steer", "sa-half": "steer",
    "expert-alone": "expert", "sgds": "mix", "safeinfer": "mix", "hf": "hf",
    "safeinfer-separate": "mix-separate",
}
REQUEST_MODE = {"off": "off", "sa": "sa", "sgds": "sgds", "safeinfer": "safeinfer",
                "safeinfer-separate": "safeinfer"}


def _prompts(tokenizer, count: int, input_len: int | None) -> list[list[int]]:
    """`count` prompts: `input_len` seeded random token ids each, or chat-formatted
    AdvBench evaluation goals."""
    if input_len is not None:
        import random

        rng = random.Random(0)
        return [[rng.randrange(10, len(tokenizer) - 10) for _ in range(input_len)]
                for _ in range(count)]
    from vllm_safeinfer.data import advbench_split
    from vllm_safeinfer.models import chat_prompt_ids

    goals = [row.goal for row in advbench_split().evaluation]
    return chat_prompt_ids(tokenizer, [goals[i % len(goals)] for i in range(count)])


def _peak_memory_mb() -> float:
    """Peak memory of this engine: device memory in use on a GPU, else the resident
    high-water marks (VmHWM) of this process and every process it started."""
    import psutil
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    peak = 0
    me = psutil.Process()
    for process in (me, *me.children(recursive=True)):
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak += int(line.split()[1]) * 1024
    return peak / 2**20


def _extra_args(mode: str, index: int) -> dict | None:
    if mode == "sa-half":
        return {"safeinfer_mode": "sa" if index % 2 == 0 else "off"}
    return {"safeinfer_mode": REQUEST_MODE[mode]} if mode in REQUEST_MODE else None


def _serve_engine(conn, kind: str, settings: dict) -> None:
    """Child process: build one engine, then answer (mode, batch size) with tokens/s."""
    if kind in ("vanilla", "expert"):
        os.environ["VLLM_PLUGINS"] = ""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer

    model = settings["expert"] if kind == "expert" else settings["model"]
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    if kind == "hf":
        run, close = _hf_runner(settings, tokenizer), None
    else:
        run, close = _vllm_runner(kind, model, settings, tokenizer)
    run("warmup", 2)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        mode, batch_size = message
        tokens_per_s, step_ms = run(mode, batch_size)
        conn.send((tokens_per_s, step_ms, _peak_memory_mb()))
    if close is not None:
        close()


def _vllm_runner(kind: str, model: str, settings: dict, tokenizer):
    from vllm import LLM, SamplingParams

    safeinfer = None
    if kind in ("steer", "mix", "mix-separate"):
        safeinfer = {"vector": settings["vector"]}
        if kind == "mix":
            safeinfer.update(settings["expert_config"])
        if kind == "mix-separate":
            safeinfer["expert_model"] = settings["expert"]
    # No prefix caching: every mode re-runs the same prompts, and a mode measured after
    # another on the same engine would otherwise skip their prefill.
    llm = LLM(model=model, tokenizer=settings["model"], dtype=settings["dtype"],
              max_model_len=settings["max_model_len"], block_size=32, seed=0,
              enable_prefix_caching=False, load_format=settings["load_format"],
              enforce_eager=settings["eager"], max_num_seqs=max(settings["batch_sizes"]),
              additional_config={"safeinfer": safeinfer} if safeinfer else {})

    def run(mode: str, batch_size: int) -> tuple[float, float]:
        prompts = _prompts(tokenizer, batch_size, settings["input_len"])
        params = [SamplingParams(max_tokens=settings["max_tokens"], temperature=0.0,
                                 ignore_eos=True, extra_args=_extra_args(mode, i))
                  for i in range(batch_size)]
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return tokens / elapsed, 1000 * elapsed / settings["max_tokens"]

    # Without an explicit shutdown the engine's processes outlive the child and the
    # parent's exit waits for them.
    return run, llm.llm_engine.engine_core.shutdown


def _hf_runner(settings: dict, tokenizer):
    import torch

    from vllm_safeinfer.common.modes import Mode
    from vllm_safeinfer.common.vectors import SafetyVector
    from vllm_safeinfer.offline.reference import RowSettings, SafeInferReference

    dtype = getattr(torch, settings["dtype"])
    reference = SafeInferReference.from_pretrained(settings["model"], settings["expert"], dtype=dtype)
    vector = SafetyVector.load(settings["vector"])
    row = RowSettings(Mode.SAFEINFER, vector=vector.vector, layer=vector.layer, gamma=vector.gamma)

    def run(mode: str, batch_size: int) -> tuple[float, float]:
        prompts = _prompts(tokenizer, batch_size, settings["input_len"])
        start = time.perf_counter()
        outputs = reference.generate(prompts, row, settings["max_tokens"], ignore_eos=True)
        elapsed = time.perf_counter() - start
        return sum(len(o) for o in outputs) / elapsed, 1000 * elapsed / settings["max_tokens"]

    return run


QUICK = {"model": "tiny-llama", "batch_sizes": [1, 4], "hf_batch_sizes": [4],
         "max_tokens": 8, "repeats": 2, "settle": 0.2, "eager": True}
RATIO_MODES = ("off", "sa", "sa-half", "sgds", "safeinfer", "safeinfer-separate")
Run = tuple[str, int, int, float, float, float]  # mode, batch, repeat, tok/s, step ms, MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_subject_arguments(parser)
    parser.add_argument("--modes", nargs="+", choices=list(ENGINE_OF_MODE),
                        help="default: all (all but hf with --load-format dummy)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[32],
                        help="batch sizes for the slow HF reference")
    parser.add_argument("--output-len", "--max-tokens", dest="max_tokens", type=int, default=64,
                        help="tokens generated per request")
    parser.add_argument("--input-len", type=int,
                        help="synthetic prompts of this many token ids (default: AdvBench)")
    parser.add_argument("--max-model-len", type=int,
                        help="context limit of every engine (default: the model's own)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds to wait before each measurement: a vLLM worker "
                        "busy-polls its message queue for 1 s after its last step, so the "
                        "engine measured before would otherwise take cores from the next")
    args = parse_benchmark_args(parser, QUICK, "a tiny model, small batches, 2 repeats: "
                                "checks the pipeline")
    if args.modes is None:
        args.modes = [m for m in ENGINE_OF_MODE if (m != "hf" or args.load_format != "dummy")
                      and (m != "safeinfer-separate" or args.expert_shares_weights)]
    if "safeinfer-separate" in args.modes and not args.expert_shares_weights:
        parser.error("mode safeinfer-separate compares with an expert sharing the weights: "
                     "add --expert-shares-weights")
    if "hf" in args.modes and args.load_format == "dummy":
        parser.error("mode hf loads the checkpoint's weights: drop it with --load-format dummy")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subjects = resolve_subjects(args, Path(tmp))
        settings = {"model": subjects.model, "expert": subjects.expert,
                    "expert_config": subjects.expert_config(),
                    "vector": subjects.vector, "dtype": args.dtype, "eager": args.eager,
                    "max_tokens": args.max_tokens, "batch_sizes": args.batch_sizes,
                    "max_model_len": args.max_model_len, "input_len": args.input_len,
                    "load_format": args.load_format}
        runs = _measure(args, settings)
    _report(args, runs, out)


def _measure(args: argparse.Namespace, settings: dict) -> list[Run]:
    runs = []
    with engine_pool() as pool:
        for kind in sorted({ENGINE_OF_MODE[m] for m in args.modes}):
            pool.start(kind, _serve_engine, kind, settings)
            print(f"engine {kind} ready", flush=True)
        for repeat in range(args.repeats):
            for batch_size in sorted(set(args.batch_sizes) | set(args.hf_batch_sizes)):
                for mode in args.modes:
                    sizes = args.hf_batch_sizes if mode == "hf" else args.batch_sizes
                    if batch_size not in sizes:
                        continue
                    time.sleep(args.settle)
                    tokens_per_s, step_ms, memory_mb = pool.ask(ENGINE_OF_MODE[mode],
                                                                (mode, batch_size))
                    runs.append((mode, batch_size, repeat, tokens_per_s, step_ms, memory_mb))
                    print(f"repeat {repeat} batch {batch_size:4d} {mode:12s} "
                          f"{tokens_per_s:9.1f} tok/s {step_ms:8.1f} ms/step "
                          f"{memory_mb:8.0f} MB", flush=True)
    return runs


def _spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def ratios(runs: list[Run]) -> dict[tuple[str, int], tuple[float, float, float]]:
    """Per (name, batch size): the ratio of medians, and the min and max of the
    per-repeat ratios (each repeat measured the modes back to back). Names are
    `MODE/vanilla`, `safeinfer/two-model bound` and `safeinfer/hf`."""
    speeds: dict[tuple[str, int], dict[int, float]] = {}
    for mode, batch_size, repeat, tokens_per_s, _, _ in runs:
        speeds.setdefault((mode, batch_size), {})[repeat] = tokens_per_s
    repeats = sorted({run[2] for run in runs})
    out = {}
    for b in sorted({b for _, b in speeds}):
        central = _named_ratios(lambda m: statistics.median(speeds[m, b].values())
                                if (m, b) in speeds else None)
        per_repeat = [_named_ratios(lambda m, r=r: speeds.get((m, b), {}).get(r))
                      for r in repeats]
        for name, mid in central.items():
            values = [ratio[name] for ratio in per_repeat if name in ratio] or [mid]
            out[name, b] = (min(values), mid, max(values))
    return out


def _named_ratios(speed) -> dict[str, float]:
    """The ratios that `speed` (mode -> tokens/s, or None if not measured) gives."""
    base, expert, safeinfer, hf = map(speed, ("vanilla", "expert-alone", "safeinfer", "hf"))
    out = {f"{mode}/vanilla": speed(mode) / base for mode in RATIO_MODES if speed(mode) and base}
    if safeinfer and base and expert:
        out["safeinfer/two-model bound"] = safeinfer / (1 / (1 / base + 1 / expert))
    if safeinfer and hf:
        out["safeinfer/hf"] = safeinfer / hf
    return out


def _report(args: argparse.Namespace, runs: list[Run], out: Path) -> None:
    with open(out / "throughput_runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "batch_size", "repeat", "tokens_per_s", "step_ms",
                         "peak_memory_mb"])
        writer.writerows(runs)
    keys = sorted({(m, b) for m, b, *_ in runs}, key=lambda k: (k[1], k[0]))
    rows = []
    for mode, batch_size in keys:
        mine = [r for r in runs if r[:2] == (mode, batch_size)]
        rows.append([mode, batch_size, *(f"{v:.1f}" for v in _spread([r[3] for r in mine])),
                     f"{statistics.median(r[4] for r in mine):.2f}",
                     f"{max(r[5] for r in mine):.0f}"])
    header = ["mode", "batch_size", "tokens_per_s_min", "tokens_per_s_median",
              "tokens_per_s_max", "step_ms_median", "peak_memory_mb"]
    with open(out / "throughput.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    table = ratios(runs)
    lines = [f"# Throughput: {args.model}", "",
             f"{args.repeats} interleaved repeats, {args.max_tokens} tokens per request, "
             f"{'synthetic prompts of %d tokens' % args.input_len if args.input_len else 'AdvBench prompts'}.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    lines += ["", "| ratio | batch size | median | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {b} | {mid:.3f} | {lo:.3f} | {hi:.3f} |"
              for (name, b), (lo, mid, hi) in table.items()]
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    _chart(runs, out / "throughput.png")
    print(f"\nmedian of {args.repeats} interleaved repeats, {args.max_tokens} tokens per "
          "request (in brackets: the min and max of the per-repeat ratios)")
    for b in sorted({b for _, b in table}):
        print(f"batch {b:4d}  " + "  ".join(
            f"{name} {mid:.3f} [{lo:.3f}, {hi:.3f}]"
            for (name, bb), (lo, mid, hi) in table.items() if bb == b))
    print(f"\nwrote {', '.join(str(out / n) for n in ('throughput.csv', 'throughput_runs.csv', 'throughput.md', 'throughput.png'))}")


def _chart(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in sorted({r[0] for r in runs}):
        sizes = sorted({r[1] for r in runs if r[0] == mode})
        spreads = [_spread([r[3] for r in runs if r[:2] == (mode, b)]) for b in sizes]
        mids = [m for _, m, _ in spreads]
        ax.errorbar(sizes, mids, yerr=[[m - lo for lo, m, _ in spreads],
                                       [hi - m for _, m, hi in spreads]],
                    marker="o", capsize=3, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s (median, min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
