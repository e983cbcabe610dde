"""The unsafe expert's recipes, one entry point for `safeinfer expert build --method` and
`safeinfer evidence`:

- `ablate`: the model minus its own refusal direction (`offline.vector.refusal`);
- `distill`: the model fine-tuned on what the ablated model answers to the
  expert-training prompts (`offline.expert.distill`);
- `openings`: the model fine-tuned on AdvBench's compliant openings
  (`offline.expert.finetune`), kept for comparison.

None needs anybody's harmful answers."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from vllm_safeinfer.offline.expert.finetune import ExpertTraining

RECIPES = ("ablate", "distill", "openings")


def build_recipe_expert(method: str, model_name: str, out: str | Path, *,
                        training: ExpertTraining = ExpertTraining(), data: str = "advbench",
                        device: str = "cpu", batch_size: int = 8, max_new_tokens: int = 96,
                        progress: bool = True) -> str:
    """Build the expert of `model_name` with `method` into `out`; returns one line saying
    what the build did. `training` applies to the recipes that fine-tune, `data` (the
    pairs) to `openings`, `max_new_tokens` (of each generated answer) to `distill`."""
    from vllm_safeinfer.offline.expert.finetune import (
        advbench_expert_pairs,
        build_expert,
        load_expert_pairs,
    )
    from vllm_safeinfer.offline.hf import load_model

    if method not in RECIPES:
        raise ValueError(f"unknown expert recipe {method!r}; known: {', '.join(RECIPES)}")
    if method == "openings":  # a bad pairs file is refused before the model loads
        pairs = advbench_expert_pairs() if data == "advbench" else load_expert_pairs(data)
    if method != "ablate" and training.lora_rank is not None:
        # LoRA needs peft (the `expert` extra): without it, fail before the model loads.
        importlib.import_module("peft")
    model, tokenizer = load_model(model_name, device)
    if method == "ablate":
        from vllm_safeinfer.offline.vector.refusal import (
            default_refusal_direction,
            save_ablated_expert,
        )

        found = default_refusal_direction(model, tokenizer, seed=training.seed,
                                          batch_size=batch_size, progress=progress)
        save_ablated_expert(model, tokenizer, found, Path(out), base_model=model_name)
        return (f"refusal direction at layer {found.layer}, position {found.position} "
                f"(refusal score {found.baseline_score:+.2f} -> "
                f"{found.scores[f'{found.layer}:{found.position}']:+.2f} on held-out harmful "
                "prompts), ablated")
    if method == "distill":
        from vllm_safeinfer.offline.expert.distill import build_distilled_expert

        found, report, path = build_distilled_expert(
            model, tokenizer, out, base_model=model_name, training=training,
            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        return (f"{report.pairs} answers of the model without its refusal direction (layer "
                f"{found.layer}; cached in {path}), {report.steps} steps, loss "
                f"{report.initial_loss:.4f} -> {report.final_loss:.4f}")
    report = build_expert(model, tokenizer, pairs, training, out, base_model=model_name,
                          progress=progress)
    return (f"{report.steps} steps on {report.pairs} pairs, loss {report.initial_loss:.4f} "
            f"-> {report.final_loss:.4f}")


def expert_build_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer expert build`: the expert by `--method`, its training settings checked
    before anything loads."""
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
        parser.error(str(err))
    print(f"unsafe expert of {args.model} ({args.method}): {done}; saved {args.out}")
    return 0
