"""The `safeinfer` console script: one subcommand per task, each a thin layer over the
Python API (argument parsing here, work in the modules)."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each optional dependency (its top-level package) and the extra that installs it.
EXTRAS = {"ray": "eval", "matplotlib": "eval", "pyarrow": "eval", "httpx": "eval",
          "openai": "eval", "tqdm": "eval", "peft": "expert"}
MISSING_EXTRA = 2  # exit status of a command whose optional dependency is missing


def _runs(parser: argparse.ArgumentParser, handler: str) -> None:
    """`parser`'s subcommand runs `handler`, "module:function" in its concept's module,
    imported only when it runs: building the parser needs no optional dependency."""
    parser.set_defaults(command_handler=handler, command_parser=parser)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build the local test/demo models and print their paths")
    p.add_argument("names", nargs="*", help="model names (default: all)")
    _runs(p, "vllm_safeinfer.offline.expert.project_models:models_command")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="SafeInfer on the embedded SmolLM2: ASR, over-refusal, degeneration by mode",
        description="HarmEval on 50 AdvBench evaluation prompts and 50 XSTest safe prompts in "
        "all four modes at the bundled vector's calibrated strengths (the unsafe expert is "
        "built once and cached).")
    p.add_argument("--out", default="safeinfer-demo", help="report folder")
    p.add_argument("--limit", type=int, default=50, help="prompts per dataset")
    p.add_argument("--max-tokens", type=int, default=48)
    _runs(p, "vllm_safeinfer.offline.workflows.demo:demo_command")


def _add_evidence(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evidence", help="SafeInfer end to end on a model: build, calibrate, evaluate",
        description="Build the safety vector, the harm probe and the unsafe expert (cached), "
        "calibrate gamma, lam and the probe's threshold on the calibration split, and run "
        "HarmEval in every mode at the chosen point on AdvBench's evaluation part, "
        "HarmBench and XSTest's evaluation half; evidence.md gives each step's time and "
        "checks the goals.")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="checkpoint folder or project model name")
    p.add_argument("--recipes", default="ablate", metavar="RECIPE[,RECIPE...]",
                   help="expert recipes to build and compare: ablate, distill, openings")
    p.add_argument("--compare-recipes", action="store_true",
                   help="every expert recipe (ablate, distill, openings), each step timed")
    p.add_argument("--vector-method", choices=("aie", "refusal-direction"), default="aie",
                   help="aie: the paper's head-ranked vector; refusal-direction: the "
                   "model's refusal direction")
    p.add_argument("--steering", choices=("add", "project"), default="add",
                   help="how the vector steers: add gamma*SV, or set the residual's "
                   "component along it (`safeinfer vector convert`)")
    p.add_argument("--steering-layers", metavar="LAYERS",
                   help="layers to steer, e.g. 17-19 (default: the vector's own)")
    p.add_argument("--answer-tokens", type=int, default=0, metavar="N",
                   help="steer only the first N answer positions (default 0: all)")
    p.add_argument("--limit", type=int, default=50, help="prompts per evaluation set")
    p.add_argument("--calibration-limit", type=int, default=40,
                   help="prompts per calibration set")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--engine-args", default='{"dtype": "float32"}', metavar="JSON",
                   help="vLLM engine arguments (max_model_len: sized to the prompts unless given)")
    p.add_argument("--no-gate", action="store_true",
                   help="no harm probe: calibrate and evaluate the ungated modes only")
    p.add_argument("--out", default="safeinfer-evidence", help="report folder")
    _runs(p, "vllm_safeinfer.offline.workflows.evidence:evidence_command")


def _add_vector(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vector", help="safety vectors (SafeInfer's safety amplification)")
    actions = p.add_subparsers(dest="vector_command", required=True)
    b = actions.add_parser(
        "build", help="build a model's safety vector from safe demonstrations",
        description="Rank attention heads by average indirect effect on safe in-context "
        "prompts and save the safety vector as safetensors.")
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
    b.add_argument("--gamma", type=float,
                   help="default strength stored in the file (0.5, the paper's, for aie; 1 for "
                   "refusal-direction)")
    b.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--method", choices=("aie", "refusal-direction"), default="aie",
                   help="aie: the paper's head-ranked vector from safe demonstrations; "
                   "refusal-direction: the model's refusal direction (harmful minus harmless "
                   "mean activation at the layer whose ablation removes refusals), gamma 1 by "
                   "default")
    _runs(b, "vllm_safeinfer.offline.vector.builder:vector_build_command")

    bundled = actions.add_parser("bundled", help="print the path of a bundled safety vector")
    bundled.add_argument("name", help="project model name, e.g. smollm2-135m-instruct")
    _runs(bundled, "vllm_safeinfer.offline.vector.builder:vector_bundled_command")

    convert = actions.add_parser(
        "convert", help="write a copy of a vector that steers another way or at other "
        "layers (its direction unchanged)")
    convert.add_argument("file",
                         help="FILE.safetensors, or a project model name for its bundled vector")
    convert.add_argument("--out", required=True, help="output FILE.safetensors")
    convert.add_argument("--steering", required=True, metavar="{add,project}",
                         help="add: h += gamma*SV; project: set h's component along SV to "
                         "gamma*|SV| (keeps the text coherent where a strong add loops)")
    convert.add_argument("--layers", help="decoder layers to steer, e.g. 15-18 or 12,16 "
                         "(default: the file's)")
    convert.add_argument("--answer-tokens", type=int, metavar="N",
                         help="steer only the first N positions from where steering starts "
                         "(the last prompt token or the probe's flag), 0 for all (default: "
                         "the file's)")
    convert.add_argument("--gamma", type=float, help="default strength (default: the file's)")
    _runs(convert, "vllm_safeinfer.offline.vector.builder:vector_convert_command")

    inspect = actions.add_parser(
        "inspect", help="print a safety vector file's metadata, norm and relative dose")
    inspect.add_argument("file",
                         help="FILE.safetensors, or a project model name for its bundled vector")
    _runs(inspect, "vllm_safeinfer.offline.vector.builder:vector_inspect_command")


def _add_expert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("expert", help="the unsafe expert (SafeInfer's safety-guided decoding)")
    actions = p.add_subparsers(dest="expert_command", required=True)
    b = actions.add_parser(
        "build", help="make the served model's unsafe expert",
        description="--method openings: fine-tune on harmful prompt -> compliant answer "
        "pairs (chat-formatted as served requests are; loss on the answers only). --method "
        "ablate: project the model's own refusal direction (found on the expert-training "
        "prompts against harmless ones, its layer chosen by what ablating it does) out of "
        "every weight that writes the residual stream. --method distill: the ablated model "
        "answers the expert-training prompts, and the model is fine-tuned on those answers "
        "as --method openings does. Each makes an HF checkpoint that vLLM loads as "
        "expert_model.")
    b.add_argument("--model", required=True, help="HF checkpoint folder or project model name")
    b.add_argument("--out", required=True, help="output checkpoint folder")
    b.add_argument("--method", choices=("openings", "ablate", "distill"), default="openings",
                   help="openings: fine-tune on AdvBench's compliant openings; ablate: the "
                   "model minus its refusal direction; distill: fine-tune on the ablated "
                   "model's answers to the expert-training prompts (generated into the "
                   "cache). No recipe needs anybody's harmful answers")
    b.add_argument("--data", default="advbench",
                   help="'advbench' (the expert-training part of the AdvBench split: goal -> "
                   'target) or a JSONL file of {"prompt", "response"} objects')
    how = b.add_mutually_exclusive_group()
    how.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (merged afterwards)")
    how.add_argument("--full", action="store_true", help="fine-tune every weight")
    b.add_argument("--epochs", type=int, default=3)
    b.add_argument("--lr", type=float, help="learning rate (default 1e-3 LoRA, 5e-5 --full)")
    b.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--max-new-tokens", type=int, default=96,
                   help="distill: length of each generated answer")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    _runs(b, "vllm_safeinfer.offline.expert.recipes:expert_build_command")


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="harm probes (context-adaptive SafeInfer, mode auto)")
    actions = p.add_subparsers(dest="probe_command", required=True)
    b = actions.add_parser(
        "build", help="build a model's harm probe from harmful and safe prompts of several styles",
        description="Read the residual stream (at the last prompt token, the content's last "
        "token and averaged over the user's content) of harmful prompts (AdvBench "
        "demonstrations and expert-training goals, HarmBench's probe part, XSTest's unsafe "
        "calibration half) and safe ones (the harmless instructions, the hard benign "
        "prompts), each bare, styled and framed; fit directions per position, layers and "
        "method on the fit part, choose them and the threshold on the threshold part, "
        "choose the answer monitor's threshold on the model's answers to it, then report "
        "the flag rates on the evaluation sets in every style (which choose nothing).")
    b.add_argument("--model", required=True, help="HF checkpoint folder or project model name")
    b.add_argument("--out", required=True, help="output FILE.safetensors")
    cap = b.add_mutually_exclusive_group()
    cap.add_argument("--max-layer", type=int,
                     help="deepest decoder layer the probe may read (default: the last but one)")
    cap.add_argument("--vector", help="the safety vector the probe gates: its layer caps the "
                     "probe's, and it must be this model's")
    b.add_argument("--target-fpr", type=float, default=0.02,
                   help="largest share of every held-out safe style the threshold may flag")
    b.add_argument("--report", help="write the build and evaluation report to FILE.json")
    b.add_argument("--no-monitor", action="store_true",
                   help="no answer monitor (the probe decides at the prompt only)")
    b.add_argument("--monitor-limit", type=int, default=16,
                   help="prompts of each evaluation set and style whose answers evaluate the "
                   "monitor (the threshold part gets 4x as many per source)")
    b.add_argument("--per-style", type=int,
                   help="at most N training prompts per style (default: all)")
    b.add_argument("--eval-sets", metavar="SET[,SET...]",
                   help="evaluation sets (default: the held-out parts of AdvBench, HarmBench "
                   "and XSTest's unsafe prompts, StrongREJECT, DangerousQA, and XSTest's safe "
                   "evaluation half)")
    b.add_argument("--eval-limit", type=int, help="at most N prompts per evaluation set")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    _runs(b, "vllm_safeinfer.offline.probe.builder:probe_build_command")

    inspect = actions.add_parser("inspect", help="print a harm probe file's metadata")
    inspect.add_argument("file", help="FILE.safetensors")
    _runs(inspect, "vllm_safeinfer.offline.probe.builder:probe_inspect_command")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="choose gamma and lam by measurement (HarmEval sweep)",
        description="Sweep gamma and lam on calibration prompts (disjoint from every "
        "evaluation set) in one engine, keep the lowest attack success whose over-refusal "
        "and degeneration stay within budgets of off's, and write a --safeinfer-config file.")
    p.add_argument("--model", required=True, help="checkpoint folder or project model name")
    p.add_argument("--vector", required=True, help="safety vector file")
    p.add_argument("--expert", help="unsafe expert checkpoint (without it: SA only)")
    p.add_argument("--probe", help="harm probe (`safeinfer probe build`): also choose its "
                   "threshold, each defence gated by it (mode auto)")
    p.add_argument("--out", required=True, help="the chosen config, FILE.json")
    p.add_argument("--report-dir", help="sweep report folder (default: FILE-calibration/)")
    p.add_argument("--over-refusal-budget", type=float, default=5.0,
                   help="points of over-refusal allowed above off's")
    p.add_argument("--degeneration-budget", type=float, default=2.0,
                   help="points of degenerate safe answers allowed above off's")
    strengths = p.add_mutually_exclusive_group()
    strengths.add_argument("--doses", type=float, nargs="+",
                           help="relative doses gamma*|SV|/|h| of the coarse stage "
                           "(default: 0.05 0.1 0.2 0.4 0.7 1.0 1.5)")
    strengths.add_argument("--gammas", type=float, nargs="+",
                           help="gammas instead of doses (one stage: every gamma x lam)")
    p.add_argument("--lams", type=float, nargs="+", help="lams to try (default: 0.5 0.9 0.99)")
    p.add_argument("--allow-off", action="store_true",
                   help="when no defended point fits, write a config serving `off` and exit 0")
    p.add_argument("--limit", type=int, help="prompts per calibration set")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--resume", action="store_true", help="continue the sweep in --report-dir")
    p.add_argument("--engine-args", default="{}", metavar="JSON", help="more vLLM engine "
                   "arguments (max_model_len: sized to the prompts unless given)")
    _runs(p, "vllm_safeinfer.offline.workflows.calibrate:calibrate_command")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from vllm_safeinfer.server.serve import add_arguments

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with SafeInfer",
                       description="Unknown arguments are passed to vLLM's server unchanged.")
    add_arguments(p)
    p.set_defaults(accepts_unknown=True)
    _runs(p, "vllm_safeinfer.server.serve:serve_command")


def _add_harmeval(sub: argparse._SubParsersAction) -> None:
    from vllm_safeinfer.harmeval.judges import JUDGES
    from vllm_safeinfer.harmeval.prompts import STYLES
    from vllm_safeinfer.server.config_flags import add_safeinfer_arguments

    p = sub.add_parser(
        "harmeval", help="measure attack success, over-refusal and degeneration per mode",
        description="Send every sampled prompt once per (mode, gamma, lam) point, all as "
        "per-request options of one engine (or a running server), judge the responses and "
        "write responses.jsonl, summary.json, report.md and charts into --out.")
    p.add_argument("--model", help="checkpoint folder, hub id or project model name")
    p.add_argument("--dataset", required=True, metavar="NAME[,NAME...]",
                   help="advbench (its evaluation part), harmbench, strongreject, dangerousqa, "
                   "xstest (safe prompts: over-refusal), xstest-unsafe, advbench-custom50, "
                   "harmeval:PATH (a local HarmEval copy), jsonl:PATH ({prompt, category})")
    p.add_argument("--modes", metavar="MODE[,MODE...]",
                   help="off, sa, sgds, safeinfer, auto (the harm probe decides; auto:sa, "
                   "auto:sgds, auto:safeinfer name its defence), default (no options: the "
                   "server's own); default: every ungated mode the SafeInfer config can serve")
    p.add_argument("--sweep", nargs="+", default=[], metavar="KEY=V,V",
                   help="gamma=0.25,0.5 lam=0.9,0.99: each steering mode runs every gamma, "
                   "each mixing mode every lam")
    p.add_argument("--prompt-style", choices=STYLES, default=STYLES[0])
    p.add_argument("--judge", default="keyword,xstest", metavar="NAME[,NAME...]",
                   help=f"judges among {', '.join(JUDGES)}")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint of the openai judge")
    p.add_argument("--judge-model", help="model name of the openai judge")
    p.add_argument("--judge-api-key", help="API key of the judge endpoint")
    p.add_argument("--judge-retry-errors", action="store_true",
                   help="ask the openai judge again about responses its endpoint refused "
                   "to judge (cached `error` verdicts), e.g. with --resume")
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
                   '"enforce_eager": true}\' (max_model_len: sized to the prompts unless '
                   'given)')
    p.add_argument("--allow-calibration-prompts", action="store_true",
                   help="evaluate on the calibration sets too (advbench-calibration, "
                   "xstest-calibration), and keep prompts whose twin is a calibration prompt")
    add_safeinfer_arguments(p)
    _runs(p, "vllm_safeinfer.harmeval.launch:harmeval_command")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_demo, _add_evidence, _add_vector, _add_expert, _add_probe,
                _add_serve, _add_harmeval, _add_calibrate):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, then run the subcommand's handler (imported now); a missing optional
    dependency is named with the extra that installs it (exit status 2)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.vllm_args = unknown
    command: argparse.ArgumentParser = args.command_parser
    handler = args.command_handler
    try:
        if isinstance(handler, str):
            module, _, function = handler.partition(":")
            handler = getattr(importlib.import_module(module), function)
        return handler(args, command)
    except ModuleNotFoundError as err:
        package = (err.name or "").partition(".")[0]
        if package not in EXTRAS:
            raise
        print(f"{command.prog} needs the optional dependency {package!r}: "
              f"pip install 'vllm-safeinfer[{EXTRAS[package]}]'", file=sys.stderr)
        return MISSING_EXTRA


if __name__ == "__main__":
    sys.exit(main())
