"""Where `safeinfer evidence` keeps what it builds: each artefact under a key of what made
it, so a changed input rebuilds it and an unchanged one is read back.

An artefact's key hashes the model's weights (sampled fingerprint, not its path), the
data split (every prompt each part holds: demonstrations, expert training, probe fit and
threshold, calibration), the source of the modules that build that kind of artefact, and
the options it was built with (the recipe, the vector method, the key of the vector a
probe or a converted vector is made from). A path-keyed cache served a vector built on
an older split, or by an older builder, as if it were current.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The modules whose code makes each kind of artefact (beside the data split, keyed apart).
BUILDERS: Mapping[str, tuple[str, ...]] = {
    "vector": ("vllm_safeinfer.offline.vector.builder", "vllm_safeinfer.offline.vector.heads",
               "vllm_safeinfer.offline.vector.demonstrations",
               "vllm_safeinfer.offline.vector.refusal", "vllm_safeinfer.offline.hf",
               "vllm_safeinfer.common.vectors"),
    "probe": ("vllm_safeinfer.offline.probe.builder", "vllm_safeinfer.offline.probe.fit",
              "vllm_safeinfer.offline.probe.prompts", "vllm_safeinfer.offline.probe.states",
              "vllm_safeinfer.offline.probe.monitor", "vllm_safeinfer.offline.probe.report",
              "vllm_safeinfer.offline.hf", "vllm_safeinfer.common.probe",
              "vllm_safeinfer.data.framings", "vllm_safeinfer.data.benign"),
    "expert": ("vllm_safeinfer.offline.expert.finetune", "vllm_safeinfer.offline.expert.distill",
               "vllm_safeinfer.offline.expert.recipes", "vllm_safeinfer.offline.vector.refusal",
               "vllm_safeinfer.offline.hf"),
}


def code_sha256(modules: tuple[str, ...]) -> str:
    """The sha256 of the modules' source files, in the order given."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find the source of {name}")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()


def split_sha256() -> str:
    """The sha256 of every prompt the split puts in a part a defence is built or tuned on."""
    from vllm_safeinfer.data.splits import built_on

    return hashlib.sha256(json.dumps(built_on(), sort_keys=True).encode()).hexdigest()


def model_identity(model: str) -> str:
    """The served weights' fingerprint (the checkpoint's resolved path where the files
    give none)."""
    from vllm_safeinfer.common.model_identity import checkpoint_fingerprint
    from vllm_safeinfer.models import resolve_model

    folder = Path(resolve_model(model)).resolve()
    return checkpoint_fingerprint(folder) or f"path:{folder}"


def artefact_key(kind: str, model_id: str, options: Mapping[str, Any]) -> str:
    """The key of a `kind` artefact of the model `model_id` built with `options`."""
    payload = {"kind": kind, "model": model_id, "split": split_sha256(),
               "code": code_sha256(BUILDERS[kind]), "options": dict(options)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def evidence_cache(model: str) -> Path:
    """The folder of a model's evidence artefacts (`$VLLM_SAFEINFER_CACHE/evidence/NAME`);
    the keys, not the folder, say which build a file is."""
    from vllm_safeinfer.models import cache_dir

    return cache_dir() / "evidence" / Path(model).name
