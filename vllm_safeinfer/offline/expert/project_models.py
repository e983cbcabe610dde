"""Every project model by name, SmolLM2's unsafe expert included (`safeinfer models`).

The registry (`vllm_safeinfer.models`) builds the random, shape-only and converted
checkpoints. SmolLM2's expert is SmolLM2 fine-tuned with `safeinfer expert build`'s
defaults on the expert-training part of the AdvBench split (`finetune`): training is
offline work, so it happens here, once, into the folder the registry names for it.
Whoever needs the expert by name (the demo, `safeinfer models`, `calibrate --expert`,
the benchmarks) resolves it here and gets it trained on first use."""
from __future__ import annotations

import argparse
from pathlib import Path

from vllm_safeinfer.models import (
    MODEL_NAMES,
    SMOLLM2,
    SMOLLM2_EXPERT,
    build_atomically,
    model_folder,
    model_path,
    resolve_model,
)


def smollm2_expert() -> Path:
    """SmolLM2's unsafe expert, trained on first use (about 2 minutes on a CPU)."""
    out = model_folder(SMOLLM2_EXPERT)
    if not (out / "config.json").exists():
        build_atomically(out, _train_smollm2_expert)
    return out


def project_model_path(name: str) -> Path:
    """`model_path`, with SmolLM2's expert trained on first use."""
    return smollm2_expert() if name == SMOLLM2_EXPERT else model_path(name)


def resolve_project_model(name_or_path: str) -> str:
    """`resolve_model`, with SmolLM2's expert trained on first use."""
    if name_or_path == SMOLLM2_EXPERT and not Path(name_or_path).exists():
        return str(smollm2_expert())
    return resolve_model(name_or_path)


def models_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer models`: build the named models (default: all) and print their paths."""
    for name in args.names or MODEL_NAMES:
        print(f"{name}\t{project_model_path(name)}")
    return 0


def _train_smollm2_expert(out: Path) -> None:
    from vllm_safeinfer.offline.expert.finetune import (
        ExpertTraining,
        advbench_expert_pairs,
        build_expert,
    )
    from vllm_safeinfer.offline.hf import load_model

    model, tokenizer = load_model(SMOLLM2)
    build_expert(model, tokenizer, advbench_expert_pairs(), ExpertTraining(), out,
                 base_model=SMOLLM2, progress=True)
