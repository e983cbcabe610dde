"""Where the time of one decoding step goes (batch 1 by default): vanilla vLLM against
the plugin's engine in mode off and in mode sa (steered), and, when asked, an engine with
the unsafe expert in mode safeinfer.

Each engine runs in its own process with vLLM's engine core and worker inside it
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so one profiler sees everything a step does. Per
mode it records:

1. the time per step, timed without any profiler, median over `--repeats` generations
   (interleaved across the engines);
2. the torch profiler's view of one generation: vLLM's own phases of a step
   (`VLLM_CUSTOM_SCOPES_FOR_PROFILING`: preprocess, forward, postprocess, sample) and the
   operators by self time, per step;
3. the Python functions of `vllm_safeinfer` by cumulative time per step under cProfile
   (which slows Python, so read them as an upper bound).

On a GPU, compiled mode replays CUDA graphs, whose operators the profiler sees as one
launch: add `--eager` to see them one by one (each with its device time).
Writes `profile.md` and `profile.json` into `--out` and prints the per-step table.

    python benchmarks/profile_step.py --model smollm2-135m-instruct --out /tmp/profile
    python benchmarks/profile_step.py --quick --out /tmp/profile   # tiny model, ~1 min
    python benchmarks/profile_step.py --modes vanilla safeinfer --batch-size 128
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from engine_pool import engine_pool
from subjects import add_subject_arguments, parse_benchmark_args, resolve_subjects

ENGINE_OF_MODE = {"vanilla": "vanilla", "off": "steer", "sa": "steer", "safeinfer": "mix"}
PHASES = ("gpu_model_runner: preprocess", "gpu_model_runner: forward",
          "gpu_model_runner: postprocess", "gpu_model_runner: sample")
QUICK = {"model": "tiny-llama", "output_len": 16, "repeats": 3, "eager": True}


def _engine_process(conn, kind: str, modes: list[str], settings: dict) -> None:
    """Child: one in-process engine answering `mode -> measurements`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if kind == "vanilla":
        os.environ["VLLM_PLUGINS"] = ""
    from vllm import LLM, SamplingParams

    safeinfer = {"vector": settings["vector"]}
    if kind == "mix":
        safeinfer.update(settings["expert_config"])
    batch_size = settings["batch_size"]
    llm = LLM(model=settings["model"], dtype=settings["dtype"], block_size=32, seed=0,
              max_model_len=settings["max_model_len"], enable_prefix_caching=False,
              load_format=settings["load_format"], enforce_eager=settings["eager"],
              max_num_seqs=batch_size,
              additional_config={} if kind == "vanilla" else {"safeinfer": safeinfer})
    prompts = [{"prompt_token_ids": settings["prompt"]}] * batch_size

    def generate(mode: str) -> float:
        extra = None if mode == "vanilla" else {"safeinfer_mode": mode}
        params = SamplingParams(max_tokens=settings["output_len"], temperature=0.0,
                                ignore_eos=True, extra_args=extra)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return (time.perf_counter() - start) * 1000 / settings["output_len"]

    for mode in modes:
        generate(mode)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        what, mode = message
        conn.send(generate(mode) if what == "time" else _profile(generate, mode, settings))


def _profile(generate, mode: str, settings: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    steps = settings["output_len"]
    device = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device else [])]
    with profile(activities=activities) as prof:
        generate(mode)
    averages = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1000 / steps for e in averages if e.key in PHASES}
    ops = sorted(((e.key, e.self_cpu_time_total / 1000 / steps, e.count / steps,
                   e.self_device_time_total / 1000 / steps if device else None)
                  for e in averages if e.key not in PHASES), key=lambda op: -op[1])
    profiler = cProfile.Profile()
    profiler.enable()
    generate(mode)
    profiler.disable()
    ours = []
    for (file, line, name), (_, calls, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if "vllm_safeinfer" in file:
            ours.append((f"{Path(file).name}:{line} {name}", cumulative * 1000 / steps,
                         calls / steps))
    ours.sort(key=lambda fn: -fn[1])
    return {"phases_ms": phases, "ops": ops[:settings["top"]],
            "all_ops": {name: (ms, calls) for name, ms, calls, _ in ops},
            "python": ours[:settings["top"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_subject_arguments(parser)
    parser.add_argument("--modes", nargs="+", choices=list(ENGINE_OF_MODE),
                        default=["vanilla", "off", "sa"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--output-len", type=int, default=64, help="tokens per generation")
    parser.add_argument("--repeats", type=int, default=7, help="timed generations per mode")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parse_benchmark_args(parser, QUICK, "a tiny model: checks the script")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subjects = resolve_subjects(args, Path(tmp))
        from transformers import AutoTokenizer

        from vllm_safeinfer.data import advbench_split
        from vllm_safeinfer.models import chat_prompt_ids

        tokenizer = AutoTokenizer.from_pretrained(subjects.model)
        prompt = chat_prompt_ids(tokenizer, [advbench_split().evaluation[0].goal])[0]
        settings = {"model": subjects.model, "vector": subjects.vector,
                    "expert": subjects.expert, "expert_config": subjects.expert_config(),
                    "batch_size": args.batch_size, "dtype": args.dtype,
                    "max_model_len": args.max_model_len, "load_format": args.load_format,
                    "eager": args.eager, "output_len": args.output_len, "prompt": prompt,
                    "top": args.top}
        results = _measure(args, settings)
    _report(args, results, out)


def _measure(args: argparse.Namespace, settings: dict) -> dict:
    modes = {mode: ENGINE_OF_MODE[mode] for mode in args.modes}
    with engine_pool() as pool:
        for kind in dict.fromkeys(modes.values()):
            pool.start(kind, _engine_process, kind,
                       [mode for mode, k in modes.items() if k == kind], settings)
        step_ms: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, kind in modes.items():
                time.sleep(1.5)  # the same pause between measurements as throughput.py's
                step_ms[mode].append(pool.ask(kind, ("time", mode)))
        profiles = {mode: pool.ask(kind, ("profile", mode)) for mode, kind in modes.items()}
    return {"step_ms": step_ms, "profiles": profiles}


def _report(args: argparse.Namespace, results: dict, out: Path) -> None:
    step_ms, profiles = results["step_ms"], results["profiles"]
    median = {mode: statistics.median(values) for mode, values in step_ms.items()}
    base = next(iter(median))
    lines = [f"# One decoding step at batch {args.batch_size}: {args.model}", "",
             f"{args.output_len} tokens per generation, {'eager' if args.eager else 'compiled'}, "
             f"{args.repeats} timed generations per mode (interleaved, no profiler).", "",
             "| | " + " | ".join(median) + " |", "|---|" + "---|" * len(median),
             "| ms per step, median | " + " | ".join(f"{v:.2f}" for v in median.values()) + " |",
             "| min - max | " + " | ".join(f"{min(v):.2f} - {max(v):.2f}"
                                            for v in step_ms.values()) + " |",
             f"| speed vs {base} | " + " | ".join(f"{median[base] / v:.3f}"
                                                  for v in median.values()) + " |"]
    lines += ["", "## vLLM's phases of a step (torch profiler, CPU ms per step)", "",
              "| phase | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    lines += [f"| {phase.split(': ')[1]} | " + " | ".join(
        f"{p['phases_ms'].get(phase, 0):.3f}" for p in profiles.values()) + " |" for phase in PHASES]
    for mode, profile in profiles.items():
        lines += ["", f"## Operators in mode {mode} (self ms per step)", "",
                  f"| operator | CPU ms | calls | {base}'s CPU ms | device ms |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{name}` | {ms:.3f} | {calls:.1f} | "
                  f"{profiles[base]['all_ops'].get(name, (0, 0))[0]:.3f} | "
                  f"{'' if device is None else f'{device:.3f}'} |"
                  for name, ms, calls, device in profile["ops"]]
        if profile["python"]:
            lines += ["", f"`vllm_safeinfer` functions in mode {mode} (cProfile, cumulative "
                      "ms per step):", "", "| function | ms per step | calls per step |",
                      "|---|---|---|"]
            lines += [f"| `{name}` | {ms:.3f} | {calls:.1f} |" for name, ms, calls in profile["python"]]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines[:9]))
    print(f"\nwrote {out / 'profile.md'}, {out / 'profile.json'}")


if __name__ == "__main__":
    main()
