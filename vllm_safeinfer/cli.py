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


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="vLLM's OpenAI-compatible server with SafeInfer",
        description="Unknown arguments are passed to vLLM's server unchanged.",
    )
    from vllm_safeinfer.serve import add_arguments

    add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        import os

        from vllm_safeinfer.serve import safeinfer_dict, vllm_command

        try:
            command = vllm_command(args.model, safeinfer_dict(args), args.vllm_args)
        except ValueError as err:
            p.error(str(err))
        print("+ " + " ".join(command), flush=True)
        os.execv(command[0], command)

    p.set_defaults(func=run, accepts_unknown=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_demo, _add_vector, _add_serve):
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
