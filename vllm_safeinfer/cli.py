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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
