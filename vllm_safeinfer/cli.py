"""The `safeinfer` console script: one subcommand per task, each a thin layer over the
Python API (argument parsing here, work in the modules)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build the local test/demo models and print their paths")
    p.add_argument("names", nargs="*", help="model names (default: all)")

    def run(args: argparse.Namespace) -> int:
        from vllm_safeinfer.models import MODEL_NAMES, model_path

        for name in args.names or MODEL_NAMES:
            print(f"{name}\t{model_path(name)}")
        return 0

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate with the embedded SmolLM2-135M-Instruct in vLLM")
    p.add_argument("--prompt", action="append", help="user prompt (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)

    def run(args: argparse.Namespace) -> int:
        from vllm_safeinfer.demo import run_demo

        return run_demo(prompts=args.prompt, max_tokens=args.max_tokens)

    p.set_defaults(func=run)


def _add_vector(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vector", help="safety vectors (SafeInfer's safety amplification)")
    actions = p.add_subparsers(dest="vector_command", required=True)
    b = actions.add_parser(
        "build",
        help="build a model's safety vector from safe demonstrations",
        description="Rank attention heads by average indirect effect on safe in-context "
        "prompts and save the safety vector as safetensors.",
    )
    b.add_argument("--model", required=True, help="HF checkpoint folder or project model name")
    b.add_argument("--out", required=True, help="output FILE.safetensors")
    b.add_argument("--demos", default="advbench",
                   help="'advbench' (the project's AdvBench demonstrations) or a JSONL file "
                   'of {"input", "output"} objects')
    b.add_argument("--layer", type=int, help="decoder layer to steer (default: num_layers // 4)")
    b.add_argument("--heads", default="auto",
                   help="'auto' (rank by indirect effect) or LAYER:HEAD,LAYER:HEAD,...")
    b.add_argument("--top-heads", type=int, default=10, help="heads kept after ranking")
    b.add_argument("--prompts", type=int, default=100, help="in-context prompts for the mean")
    b.add_argument("--shots", type=int, default=10, help="demonstrations per prompt")
    b.add_argument("--rank-prompts", type=int, default=16, help="corrupted prompts for ranking")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--gamma", type=float, default=0.5, help="default strength stored in the file")
    b.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")

    def run(args: argparse.Namespace) -> int:
        from vllm_safeinfer.amplification import (
            advbench_demonstrations,
            build_safety_vector,
            load_demonstrations,
            load_model,
        )
        from vllm_safeinfer.vectors import parse_heads

        try:
            heads = None if args.heads == "auto" else parse_heads(args.heads)
            demos = (
                advbench_demonstrations()
                if args.demos == "advbench"
                else load_demonstrations(args.demos)
            )
            model, tokenizer = load_model(args.model, args.device)
            vector = build_safety_vector(
                model, tokenizer, demos,
                model_name=args.model, layer=args.layer, heads=heads,
                top_heads=args.top_heads, prompts=args.prompts, shots=args.shots,
                rank_prompts=args.rank_prompts, seed=args.seed, gamma=args.gamma,
                batch_size=args.batch_size, progress=True,
            )
        except (OSError, ValueError) as err:
            b.error(str(err))
        vector.save(args.out)
        effects = vector.head_effects or (None,) * len(vector.heads)
        print(f"safety vector for {vector.model}: layer {vector.layer}, "
              f"hidden size {vector.hidden_size}, norm {vector.vector.norm():.4f}")
        for (layer, head), effect in zip(vector.heads, effects):
            print(f"  head {layer}:{head}" + ("" if effect is None else f"  AIE {effect:.3e}"))
        print(f"saved {args.out}")
        return 0

    b.set_defaults(func=run)

    bundled = actions.add_parser("bundled", help="print the path of a bundled safety vector")
    bundled.add_argument("name", help="project model name, e.g. smollm2-135m-instruct")

    def print_bundled(args: argparse.Namespace) -> int:
        from vllm_safeinfer.vectors import bundled_vector_path

        try:
            print(bundled_vector_path(args.name))
        except ValueError as err:
            bundled.error(str(err))
        return 0

    bundled.set_defaults(func=print_bundled)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="vLLM's OpenAI-compatible server with SafeInfer",
        description="Unknown arguments are passed to vLLM's server unchanged.",
    )
    from vllm_safeinfer.serve import add_arguments

    add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        import os

        from vllm_safeinfer.config_flags import safeinfer_dict
        from vllm_safeinfer.serve import vllm_command

        try:
            command = vllm_command(args.model, safeinfer_dict(args), args.vllm_args)
        except ValueError as err:
            p.error(str(err))
        print("+ " + " ".join(command), flush=True)
        os.execv(command[0], command)

    p.set_defaults(func=run, accepts_unknown=True)


def _add_harmeval(sub: argparse._SubParsersAction) -> None:
    from vllm_safeinfer.config_flags import add_safeinfer_arguments
    from vllm_safeinfer.harmeval.judges import JUDGES
    from vllm_safeinfer.harmeval.prompts import STYLES

    p = sub.add_parser(
        "harmeval", help="measure attack success, over-refusal and degeneration per mode",
        description="Send every sampled prompt once per (mode, gamma, lam) point, all as "
        "per-request options of one engine (or a running server), judge the responses and "
        "write responses.jsonl, summary.json, report.md and charts into --out.",
    )
    p.add_argument("--model", help="checkpoint folder, hub id or project model name")
    p.add_argument("--dataset", required=True, metavar="NAME[,NAME...]",
                   help="advbench (its evaluation part), harmbench, strongreject, dangerousqa, "
                   "xstest (safe prompts: over-refusal), xstest-unsafe, advbench-custom50, "
                   "harmeval:PATH (a local HarmEval copy), jsonl:PATH ({prompt, category})")
    p.add_argument("--modes", metavar="MODE[,MODE...]",
                   help="off, sa, sgds, safeinfer, default (no options: the server's own); "
                   "default: every mode the SafeInfer config can serve")
    p.add_argument("--sweep", nargs="+", default=[], metavar="KEY=V,V",
                   help="gamma=0.25,0.5 lam=0.9,0.99: each steering mode runs every gamma, "
                   "each mixing mode every lam")
    p.add_argument("--prompt-style", choices=STYLES, default=STYLES[0])
    p.add_argument("--judge", default="keyword,xstest", metavar="NAME[,NAME...]",
                   help=f"judges among {', '.join(JUDGES)}")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint of the openai judge")
    p.add_argument("--judge-model", help="model name of the openai judge")
    p.add_argument("--judge-api-key", help="API key of the judge endpoint")
    p.add_argument("--per-category", type=int, help="at most N prompts per category")
    p.add_argument("--limit", type=int, help="at most N prompts per dataset (stratified)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="sampling and prompt-sampling seed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="split the prompts across engines in Ray actors (a local Ray, or "
                   "the cluster at ADDRESS)")
    p.add_argument("--workers", type=int, default=1, help="Ray engine actors")
    p.add_argument("--endpoint", help="evaluate this running OpenAI-compatible server")
    p.add_argument("--served-model", help="the model name the --endpoint serves")
    p.add_argument("--api-key", help="API key of --endpoint")
    p.add_argument("--engine-args", default="{}", metavar="JSON",
                   help='more vLLM engine arguments, e.g. \'{"dtype": "float32", '
                   '"max_model_len": 2048, "enforce_eager": true}\'')
    add_safeinfer_arguments(p)

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from vllm_safeinfer.config import SafeInferConfig
        from vllm_safeinfer.config_flags import safeinfer_dict
        from vllm_safeinfer.harmeval.judges import make_judges
        from vllm_safeinfer.harmeval.backends import GenerationError
        from vllm_safeinfer.harmeval.judges import JudgeError
        from vllm_safeinfer.harmeval.launch import backend_factory, engine_kwargs, environment
        from vllm_safeinfer.harmeval.points import (
            check_servable, parse_sweep, plan_points, servable_modes)
        from vllm_safeinfer.harmeval.run import JUDGE_CACHE, HarmEvalSettings, run_harmeval
        from vllm_safeinfer.models import resolve_model

        try:
            if (args.model is None) == (args.endpoint is None):
                raise ValueError("give exactly one of --model and --endpoint")
            raw = safeinfer_dict(args) or None
            config = SafeInferConfig.from_dict(raw) if raw is not None else None
            modes = args.modes.split(",") if args.modes else servable_modes(config)
            points = plan_points(modes, parse_sweep(args.sweep))
            if args.endpoint is None or config is not None:
                check_servable(points, config)
            out = Path(args.out)
            judges = make_judges(args.judge.split(","), judge_url=args.judge_url,
                                 judge_model=args.judge_model, api_key=args.judge_api_key,
                                 cache_path=out / JUDGE_CACHE)
            settings = HarmEvalSettings(
                model=args.model or args.served_model, datasets=tuple(args.dataset.split(",")),
                points=points, prompt_style=args.prompt_style,
                judges=tuple(j.name for j in judges), per_category=args.per_category,
                limit=args.limit, max_tokens=args.max_tokens, temperature=args.temperature,
                seed=args.seed, safeinfer=raw)
            extra = json.loads(args.engine_args)
            if not isinstance(extra, dict):
                raise ValueError("--engine-args must be a JSON object")
            llm_kwargs = None if args.model is None else engine_kwargs(
                resolve_model(args.model), raw, seed=args.seed, extra=extra)
            make_backend = backend_factory(
                llm_kwargs=llm_kwargs, endpoint=args.endpoint, served_model=args.served_model,
                api_key=args.api_key, use_ray=args.ray is not None,
                ray_address=args.ray or None, workers=args.workers)
        except (ValueError, json.JSONDecodeError) as err:
            p.error(str(err))
        try:
            summary = run_harmeval(settings, make_backend, judges, out, resume=args.resume,
                                   environment=environment(raw))
        except (ValueError, GenerationError, JudgeError) as err:
            print(f"safeinfer harmeval: error: {err}", file=sys.stderr)
            return 1
        for row in summary["tradeoff"]:
            print(f"  {row['point']:<32} ASR {row['asr']}%  over-refusal "
                  f"{row['over_refusal']}%  degenerate {row['degenerate_pct']}%")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_demo, _add_vector, _add_serve, _add_harmeval):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.vllm_args = unknown
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
