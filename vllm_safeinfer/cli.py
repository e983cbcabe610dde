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
    p = sub.add_parser(
        "demo", help="SafeInfer on the embedded SmolLM2: ASR, over-refusal, degeneration by mode",
        description="HarmEval on 50 AdvBench evaluation prompts and 50 XSTest safe prompts in "
        "all four modes at the bundled vector's calibrated strengths (the unsafe expert is "
        "built once and cached).")
    p.add_argument("--out", default="safeinfer-demo", help="report folder")
    p.add_argument("--limit", type=int, default=50, help="prompts per dataset")
    p.add_argument("--max-tokens", type=int, default=48)

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from vllm_safeinfer.demo import calibrated_defaults, run_demo
        from vllm_safeinfer.models import SMOLLM2, expert_of, model_path
        from vllm_safeinfer.vectors import bundled_vector_path

        defaults = calibrated_defaults(SMOLLM2)
        try:
            run_demo(model=str(model_path(SMOLLM2)), vector=str(bundled_vector_path(SMOLLM2)),
                     expert=str(model_path(expert_of(SMOLLM2))), defaults=defaults,
                     out=Path(args.out),
                     limit=args.limit, max_tokens=args.max_tokens,
                     engine_args={"dtype": "float32"})
        except ValueError as err:
            p.error(f"{err} (a finished or stopped demo in --out {args.out} is continued only "
                    "with the same settings: choose another --out or delete it)")
        return 0

    p.set_defaults(func=run)


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
    p.add_argument("--limit", type=int, default=50, help="prompts per evaluation set")
    p.add_argument("--calibration-limit", type=int, default=40,
                   help="prompts per calibration set")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--engine-args", default='{"dtype": "float32"}', metavar="JSON",
                   help="vLLM engine arguments (max_model_len: sized to the prompts unless "
                   "given)")
    p.add_argument("--no-gate", action="store_true",
                   help="no harm probe: calibrate and evaluate the ungated modes only")
    p.add_argument("--out", default="safeinfer-evidence", help="report folder")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from vllm_safeinfer.offline.evidence import EvidenceSettings, run_evidence
        from vllm_safeinfer.offline.recipes import RECIPES

        try:
            settings = EvidenceSettings(
                model=args.model,
                recipes=RECIPES if args.compare_recipes else tuple(args.recipes.split(",")),
                vector_method=args.vector_method, limit=args.limit,
                calibration_limit=args.calibration_limit, max_tokens=args.max_tokens,
                engine_args=_json_object(args.engine_args), gate=not args.no_gate)
        except ValueError as err:
            p.error(str(err))
        try:
            run_evidence(settings, Path(args.out))
        except (ValueError, RuntimeError) as err:
            print(f"safeinfer evidence: error: {err}", file=sys.stderr)
            return 1
        return 0

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

    def run(args: argparse.Namespace) -> int:
        if args.method == "refusal-direction":
            return _build_refusal_vector(args, b)
        from vllm_safeinfer.offline.demonstrations import (
            advbench_demonstrations, load_demonstrations)
        from vllm_safeinfer.offline.hf import load_model
        from vllm_safeinfer.offline.vector_builder import build_safety_vector
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
                rank_prompts=args.rank_prompts, seed=args.seed,
                gamma=0.5 if args.gamma is None else args.gamma,
                batch_size=args.batch_size, progress=True,
            )
        except (OSError, ValueError) as err:
            b.error(str(err))
        vector.save(args.out)
        effects = vector.head_effects or (None,) * len(vector.heads)
        print(f"safety vector for {vector.model}: layer {vector.layer}, "
              f"hidden size {vector.hidden_size}, norm {vector.vector.norm():.4f}, "
              f"residual norm {vector.residual_norm:.4f}, relative dose at gamma "
              f"{vector.gamma:g}: {vector.relative_dose():.4f}")
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

    inspect = actions.add_parser(
        "inspect", help="print a safety vector file's metadata, norm and relative dose")
    inspect.add_argument("file", help="FILE.safetensors, or a project model name for its "
                         "bundled vector")

    def print_inspect(args: argparse.Namespace) -> int:
        from pathlib import Path

        from vllm_safeinfer.vectors import SafetyVector, bundled_vector_path

        try:
            path = args.file if Path(args.file).exists() else bundled_vector_path(args.file)
            print(f"file: {path}\n{SafetyVector.load(path).describe()}")
        except (OSError, ValueError) as err:
            inspect.error(str(err))
        return 0

    inspect.set_defaults(func=print_inspect)


def _build_refusal_vector(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from vllm_safeinfer.offline.hf import load_model
    from vllm_safeinfer.offline.refusal import default_refusal_direction, refusal_vector

    try:
        model, tokenizer = load_model(args.model, args.device)
        found = default_refusal_direction(model, tokenizer, seed=args.seed,
                                          batch_size=args.batch_size, progress=True)
        vector = refusal_vector(model, found, model_name=args.model,
                                gamma=1.0 if args.gamma is None else args.gamma)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    vector.save(args.out)
    print(f"refusal-direction vector for {vector.model}: layer {vector.layer} (the "
          f"direction at layer {found.layer}'s input, position {found.position}), norm "
          f"{vector.vector.norm():.4f}, residual norm {vector.residual_norm:.4f}, relative "
          f"dose at gamma {vector.gamma:g}: {vector.relative_dose():.4f}; saved {args.out}")
    return 0


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
        "expert_model.",
    )
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

    def run(args: argparse.Namespace) -> int:
        from vllm_safeinfer.offline.expert import ExpertTraining
        from vllm_safeinfer.offline.recipes import build_recipe_expert

        try:
            training = ExpertTraining(
                lora_rank=None if args.full else args.lora_rank, epochs=args.epochs,
                lr=args.lr or (5e-5 if args.full else 1e-3), max_steps=args.max_steps,
                batch_size=args.batch_size, seed=args.seed)
            done = build_recipe_expert(args.method, args.model, args.out, training=training,
                                       data=args.data, device=args.device,
                                       batch_size=args.batch_size,
                                       max_new_tokens=args.max_new_tokens)
        except (OSError, ValueError, RuntimeError) as err:
            b.error(str(err))
        print(f"unsafe expert of {args.model} ({args.method}): {done}; saved {args.out}")
        return 0

    b.set_defaults(func=run)


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="harm probes (context-adaptive SafeInfer, mode auto)")
    actions = p.add_subparsers(dest="probe_command", required=True)
    b = actions.add_parser(
        "build", help="build a model's harm probe from harmful and safe prompts of several styles",
        description="Read the residual stream at the last prompt token of harmful prompts "
        "(AdvBench demonstrations and expert-training goals, HarmBench's probe part, XSTest's "
        "unsafe calibration half) and safe ones (the harmless instructions, XSTest's safe "
        "calibration half); fit a direction per layer and method on part of every style, "
        "choose layer, method and threshold on the rest, then report the chosen probe's flag "
        "rates on the evaluation sets (which choose nothing).")
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

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from vllm_safeinfer.offline.probe_builder import build_probe_file, describe
        from vllm_safeinfer.probe import HarmProbe

        if args.report and not Path(args.report).parent.is_dir():
            b.error(f"folder {Path(args.report).parent} of --report does not exist")
        try:
            report = build_probe_file(
                args.model, args.out, max_layer=args.max_layer, vector=args.vector,
                target_fpr=args.target_fpr, per_style=args.per_style,
                **({"eval_sets": tuple(args.eval_sets.split(","))} if args.eval_sets else {}),
                eval_limit=args.eval_limit,
                seed=args.seed, batch_size=args.batch_size, device=args.device,
                progress=True)
        except (OSError, ValueError) as err:
            b.error(str(err))
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(describe(HarmProbe.load(args.out)))
        print(f"goal ({report['goal']['rule']}): {'met' if report['goal']['met'] else 'missed'}; "
              f"built in {report['build_s']} s, {report['total_s']} s with the evaluation; "
              f"saved {args.out}")
        return 0

    b.set_defaults(func=run)

    inspect = actions.add_parser("inspect", help="print a harm probe file's metadata")
    inspect.add_argument("file", help="FILE.safetensors")

    def print_inspect(args: argparse.Namespace) -> int:
        from vllm_safeinfer.offline.probe_builder import describe
        from vllm_safeinfer.probe import HarmProbe

        try:
            print(f"file: {args.file}\n{describe(HarmProbe.load(args.file))}")
        except (OSError, ValueError) as err:
            inspect.error(str(err))
        return 0

    inspect.set_defaults(func=print_inspect)


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
    p.add_argument("--engine-args", default="{}", metavar="JSON",
                   help="more vLLM engine arguments (max_model_len: sized to the prompts "
                   "unless given)")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from vllm_safeinfer.harmeval.launch import (
            artefact_hashes, backend_factory, engine_kwargs, sized_engine_args)
        from vllm_safeinfer.harmeval.points import parse_sweep
        from vllm_safeinfer.models import resolve_model
        from vllm_safeinfer.offline.calibrate import (
            DEFAULT_DOSES, DEFAULT_LAMS, NoFittingPoint, calibrate, calibration_prompts)

        out = Path(args.out)
        report_dir = Path(args.report_dir or out.with_name(out.stem + "-calibration"))
        safeinfer = {"vector": args.vector}
        if args.probe:
            safeinfer["probe"] = args.probe
        try:
            if args.expert:
                safeinfer["expert_model"] = resolve_model(args.expert)
            sweep = parse_sweep([f"lam={','.join(map(repr, args.lams or DEFAULT_LAMS))}"]
                                + ([f"gamma={','.join(map(repr, args.gammas))}"]
                                   if args.gammas else []))
            model = resolve_model(args.model)
            engine_args = sized_engine_args(model, calibration_prompts(args.limit),
                                            args.max_tokens, _json_object(args.engine_args))
            make_backend = backend_factory(llm_kwargs=engine_kwargs(
                model, safeinfer, seed=0, extra=engine_args))
            _, chosen, _ = calibrate(
                model=args.model, safeinfer=safeinfer, make_backend=make_backend, out=out,
                report_dir=report_dir, doses=args.doses or DEFAULT_DOSES,
                gammas=sweep.get("gamma"), lams=sweep["lam"],
                over_refusal_budget=args.over_refusal_budget,
                degeneration_budget=args.degeneration_budget, allow_off=args.allow_off,
                limit=args.limit, max_tokens=args.max_tokens, engine_args=engine_args,
                artefacts=artefact_hashes(safeinfer), resume=args.resume)
        except ValueError as err:
            p.error(str(err))
        except NoFittingPoint as err:
            print(f"safeinfer calibrate: {err}", file=sys.stderr)
            return 1
        if chosen is None:
            print(f"chosen: off (no defended point fits; --allow-off); wrote {out}")
            return 0
        print(f"chosen: {chosen.point} (ASR {chosen.asr:.1f}%, over-refusal "
              f"{chosen.over_refusal:.1f}%, degenerate safe answers "
              f"{chosen.benign_degenerate:.1f}%); wrote {out}")
        return 0

    p.set_defaults(func=run)


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
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # Prometheus's multiprocess mode, so the workers' counters reach /metrics.
            import tempfile

            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="safeinfer-metrics-")
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

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from vllm_safeinfer.config import SafeInferConfig
        from vllm_safeinfer.config_flags import safeinfer_dict
        from vllm_safeinfer.harmeval.judges import make_judges
        from vllm_safeinfer.harmeval.backends import GenerationError
        from vllm_safeinfer.harmeval.judges import JudgeError
        from vllm_safeinfer.harmeval.launch import (
            artefact_hashes, backend_factory, engine_kwargs, environment, sized_settings)
        from vllm_safeinfer.harmeval.points import (
            check_servable, parse_sweep, plan_points, servable_modes)
        from vllm_safeinfer.harmeval.run import (
            JUDGE_CACHE, HarmEvalSettings, run_harmeval, sample_items)
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
                                 cache_path=out / JUDGE_CACHE,
                                 retry_errors=args.judge_retry_errors)
            settings = HarmEvalSettings(
                model=args.model or args.served_model, datasets=tuple(args.dataset.split(",")),
                points=points, prompt_style=args.prompt_style,
                judges=tuple(j.name for j in judges), per_category=args.per_category,
                limit=args.limit, max_tokens=args.max_tokens, temperature=args.temperature,
                seed=args.seed, safeinfer=raw,
                allow_calibration_prompts=args.allow_calibration_prompts,
                endpoint=args.endpoint, artefacts=artefact_hashes(raw))
            llm_kwargs = None
            if args.model is None:
                sample_items(settings)  # the datasets refused before any request
            else:
                model = resolve_model(args.model)
                settings = sized_settings(settings, model, _json_object(args.engine_args))
                llm_kwargs = engine_kwargs(model, raw, seed=args.seed,
                                           extra=settings.engine_args)
            make_backend = backend_factory(
                llm_kwargs=llm_kwargs, endpoint=args.endpoint, served_model=args.served_model,
                api_key=args.api_key, use_ray=args.ray is not None,
                ray_address=args.ray or None, workers=args.workers)
        except ValueError as err:
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


def _json_object(text: str) -> dict:
    """`--engine-args`: a JSON object, or a ValueError that says so."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--engine-args is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError("--engine-args must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_demo, _add_evidence, _add_vector, _add_expert, _add_probe,
                _add_serve, _add_harmeval, _add_calibrate):
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
