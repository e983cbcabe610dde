"""Generation throughput of SafeInfer in vLLM against vanilla vLLM and the HF reference.

Each engine lives in its own process for the whole run, so the modes can be measured
interleaved (repeat by repeat) under the same machine conditions:

- `vanilla`: the served model in vLLM without the plugin (`VLLM_PLUGINS=""`);
- `off`, `sa`, `sa-half`: one engine with the plugin and a safety vector, requests in
  mode off, all in mode sa, half and half;
- `expert-alone`: the expert model alone in vanilla vLLM (T_expert);
- `sgds`, `safeinfer`: one engine with the plugin, the vector and the expert;
- `hf`: `vllm_safeinfer.reference` (HF transformers, batched) in mode safeinfer.

Writes `<out>/throughput_runs.csv` (every measurement) and `<out>/throughput.csv`
(`mode,batch_size,tokens_per_s`, the median over repeats), and prints the ratios.

    python benchmarks/throughput.py --model smollm2-135m-instruct --batch-sizes 1 8 32 128
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

ENGINE_OF_MODE = {
    "vanilla": "vanilla", "off": "steer", "sa": "steer", "sa-half": "steer",
    "expert-alone": "expert", "sgds": "mix", "safeinfer": "mix", "hf": "hf",
}
REQUEST_MODE = {"off": "off", "sa": "sa", "sgds": "sgds", "safeinfer": "safeinfer"}


def _prompts(tokenizer, count: int) -> list[list[int]]:
    from vllm_safeinfer.data import advbench_split
    from vllm_safeinfer.models import chat_prompt_ids

    goals = [row.goal for row in advbench_split().evaluation]
    return chat_prompt_ids(tokenizer, [goals[i % len(goals)] for i in range(count)])


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
        conn.send(run(mode, batch_size))
    if close is not None:
        close()


def _vllm_runner(kind: str, model: str, settings: dict, tokenizer):
    from vllm import LLM, SamplingParams

    safeinfer = None
    if kind in ("steer", "mix"):
        safeinfer = {"vector": settings["vector"]}
        if kind == "mix":
            safeinfer["expert_model"] = settings["expert"]
    # No prefix caching: every mode re-runs the same prompts, and a mode measured after
    # another on the same engine would otherwise skip their prefill.
    llm = LLM(model=model, tokenizer=settings["model"], dtype=settings["dtype"],
              max_model_len=1024, block_size=32, seed=0, enable_prefix_caching=False,
              enforce_eager=settings["eager"], max_num_seqs=max(settings["batch_sizes"]),
              additional_config={"safeinfer": safeinfer} if safeinfer else {})

    def run(mode: str, batch_size: int) -> float:
        prompts = _prompts(tokenizer, batch_size)
        params = [SamplingParams(max_tokens=settings["max_tokens"], temperature=0.0,
                                 ignore_eos=True, extra_args=_extra_args(mode, i))
                  for i in range(batch_size)]
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed

    # Without an explicit shutdown the engine's processes outlive the child and the
    # parent's exit waits for them.
    return run, llm.llm_engine.engine_core.shutdown


def _hf_runner(settings: dict, tokenizer):
    import torch

    from vllm_safeinfer.modes import Mode
    from vllm_safeinfer.reference import RowSettings, SafeInferReference
    from vllm_safeinfer.vectors import SafetyVector

    dtype = getattr(torch, settings["dtype"])
    reference = SafeInferReference.from_pretrained(settings["model"], settings["expert"], dtype=dtype)
    vector = SafetyVector.load(settings["vector"])
    row = RowSettings(Mode.SAFEINFER, vector=vector.vector, layer=vector.layer, gamma=vector.gamma)

    def run(mode: str, batch_size: int) -> float:
        prompts = _prompts(tokenizer, batch_size)
        start = time.perf_counter()
        outputs = reference.generate(prompts, row, settings["max_tokens"], ignore_eos=True)
        elapsed = time.perf_counter() - start
        return sum(len(o) for o in outputs) / elapsed

    return run


def _resolve_models(args: argparse.Namespace, workdir: Path) -> dict:
    from transformers import AutoConfig

    from vllm_safeinfer.models import SMOLLM2, TINY_MODELS, expert_of, model_path
    from vllm_safeinfer.vectors import SafetyVector, bundled_vector_path

    model = str(model_path(args.model)) if args.model in (*TINY_MODELS, SMOLLM2) else args.model
    if args.expert:
        expert = str(model_path(args.expert)) if args.expert in TINY_MODELS else args.expert
    elif args.model in TINY_MODELS:
        expert = str(model_path(expert_of(args.model)))
    else:
        # A fine-tuned copy of the served model costs exactly what the model costs.
        expert = model
    vector = args.vector
    if vector is None and args.model == SMOLLM2:
        vector = str(bundled_vector_path(SMOLLM2))
    if vector is None:
        import torch

        config = AutoConfig.from_pretrained(model)
        vector = str(workdir / "random.safetensors")
        SafetyVector(vector=torch.randn(config.hidden_size) / config.hidden_size ** 0.5,
                     layer=config.num_hidden_layers // 4, model=args.model,
                     hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                     heads=((0, 0),)).save(vector)
    return {"model": model, "expert": expert, "vector": vector, "dtype": args.dtype,
            "eager": args.eager, "max_tokens": args.max_tokens,
            "batch_sizes": args.batch_sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="project model name or checkpoint path")
    parser.add_argument("--expert", help="expert checkpoint (default: the tiny model's twin, "
                        "or the served model itself)")
    parser.add_argument("--vector", help="safety vector (default: bundled for SmolLM2, "
                        "else a random one: speed does not depend on it)")
    parser.add_argument("--modes", nargs="+", default=list(ENGINE_OF_MODE),
                        choices=list(ENGINE_OF_MODE))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[32],
                        help="batch sizes for the slow HF reference")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action="store_true", help="enforce_eager for every engine")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds to wait before each measurement: a vLLM worker "
                        "busy-polls its message queue for 1 s after its last step, so the "
                        "engine measured before would otherwise take cores from the next")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        settings = _resolve_models(args, Path(tmp))
        runs = _measure(args, settings)
    _report(args, runs, out)


def _measure(args: argparse.Namespace, settings: dict) -> list[tuple[str, int, int, float]]:
    context = mp.get_context("spawn")
    kinds = sorted({ENGINE_OF_MODE[m] for m in args.modes})
    engines = {}
    for kind in kinds:  # started one after the other: two starting at once compete for cores
        parent, child = context.Pipe()
        process = context.Process(target=_serve_engine, args=(child, kind, settings))
        process.start()
        engines[kind] = (parent, process)
        _receive(parent, process, kind)
        print(f"engine {kind} ready", flush=True)
    runs = []
    try:
        for repeat in range(args.repeats):
            for batch_size in sorted(set(args.batch_sizes) | set(args.hf_batch_sizes)):
                for mode in args.modes:
                    sizes = args.hf_batch_sizes if mode == "hf" else args.batch_sizes
                    if batch_size not in sizes:
                        continue
                    conn, process = engines[ENGINE_OF_MODE[mode]]
                    time.sleep(args.settle)
                    conn.send((mode, batch_size))
                    tokens_per_s = _receive(conn, process, mode)
                    runs.append((mode, batch_size, repeat, tokens_per_s))
                    print(f"repeat {repeat} batch {batch_size:4d} {mode:12s} "
                          f"{tokens_per_s:9.1f} tok/s", flush=True)
    finally:
        for conn, process in engines.values():
            if process.is_alive():
                conn.send(None)
        for conn, process in engines.values():
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return runs


def _receive(conn, process, what: str):
    """The engine process's answer; an error if it died instead of answering."""
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"the engine process for {what!r} exited ({process.exitcode})")
    return conn.recv()


def _report(args: argparse.Namespace, runs, out: Path) -> None:
    with open(out / "throughput_runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "batch_size", "repeat", "tokens_per_s"])
        writer.writerows(runs)
    median: dict[tuple[str, int], float] = {}
    for mode, batch_size in {(m, b) for m, b, _, _ in runs}:
        median[mode, batch_size] = statistics.median(
            t for m, b, _, t in runs if (m, b) == (mode, batch_size))
    with open(out / "throughput.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "batch_size", "tokens_per_s"])
        for (mode, batch_size), value in sorted(median.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            writer.writerow([mode, batch_size, f"{value:.1f}"])
    print(f"\nmedian of {args.repeats} interleaved repeats, {args.max_tokens} tokens per request")
    for batch_size in sorted({b for _, b in median}):
        line = [f"batch {batch_size:4d}"]
        base = median.get(("vanilla", batch_size))
        for mode in ("off", "sa", "sa-half", "sgds", "safeinfer"):
            value = median.get((mode, batch_size))
            if value is not None and base:
                line.append(f"{mode}/vanilla {value / base:.3f}")
        expert = median.get(("expert-alone", batch_size))
        safeinfer = median.get(("safeinfer", batch_size))
        if base and expert and safeinfer:
            bound = 1 / (1 / base + 1 / expert)
            line.append(f"safeinfer/two-model bound {safeinfer / bound:.3f}")
        hf = median.get(("hf", batch_size))
        if hf and safeinfer:
            line.append(f"safeinfer/hf {safeinfer / hf:.2f}")
        print("  ".join(line))
    print(f"\nwrote {out / 'throughput.csv'} and {out / 'throughput_runs.csv'}")


if __name__ == "__main__":
    main()
