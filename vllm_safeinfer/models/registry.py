"""The project's models by name (`MODEL_NAMES`) and their checkpoint folders in the build
cache, built on first use from nothing (`tiny`) or from GGUF files (`gguf`), never
downloaded from a model hub.

SmolLM2's unsafe expert is named here too, but it is trained, not built: fine-tuning is
offline work (`vllm_safeinfer.offline.expert.project_models` trains it into `model_folder`).
Until then `model_path` refuses it and says how to make it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vllm_safeinfer.models.cache import build_atomically, cache_dir
from vllm_safeinfer.models.gguf import build_qwen, build_smollm2
from vllm_safeinfer.models.tiny import SHAPE_MODELS, TINY_MODELS, build_shape, build_tiny

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
# SmolLM2's unsafe expert: SmolLM2 fine-tuned (LoRA, merged) by `safeinfer expert build`
# with its defaults on the expert-training part of the AdvBench split.
SMOLLM2_EXPERT = f"{SMOLLM2}-expert"
MODEL_NAMES: tuple[str, ...] = (*TINY_MODELS, SMOLLM2, SMOLLM2_EXPERT, QWEN, *SHAPE_MODELS)
_BUILD_VERSION = "2"


def model_folder(name: str) -> Path:
    """A model's folder in the cache, built or not. SmolLM2's expert is trained on the
    split's expert part, so its folder names that part's hash: a changed split trains a
    new expert."""
    if name != SMOLLM2_EXPERT:
        return cache_dir() / "models" / f"{name}-v{_BUILD_VERSION}"
    from vllm_safeinfer.data import advbench_split

    rows = [[row.goal, row.target] for row in advbench_split().expert_train]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-v{_BUILD_VERSION}-{digest}"


def model_path(name: str) -> Path:
    """Checkpoint folder of a named model, built on first use (SmolLM2's expert once
    trained)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    out = model_folder(name)
    if not (out / "config.json").exists():
        if name == SMOLLM2_EXPERT:
            raise ValueError(f"{name} is not trained yet: `safeinfer models {name}` trains "
                             "it once (about 2 minutes on a CPU)")
        build = {SMOLLM2: build_smollm2, QWEN: build_qwen}.get(
            name, build_shape if name in SHAPE_MODELS else build_tiny)
        build_atomically(out, lambda tmp: build(name, tmp))
    return out


def resolve_model(name_or_path: str) -> str:
    """A checkpoint folder or hub id as given; a project model name (see `MODEL_NAMES`)
    becomes its local checkpoint, built on first use."""
    if name_or_path in MODEL_NAMES and not Path(name_or_path).exists():
        return str(model_path(name_or_path))
    if name_or_path.startswith((".", "/")) and not Path(name_or_path).is_dir():
        raise ValueError(f"model folder {name_or_path} does not exist "
                         f"(project models: {', '.join(MODEL_NAMES)})")
    return name_or_path


def expert_of(name: str) -> str:
    """Name of a project model's unsafe expert (a tiny model's smaller random twin, or
    SmolLM2's fine-tuned expert)."""
    twin = f"{name}-expert"
    if twin not in MODEL_NAMES:
        raise ValueError(f"{name!r} has no expert twin")
    return twin
