"""SafeInfer's HTTP surface on vLLM's OpenAI server, added through vLLM's own extension
point (`--middleware`, which `safeinfer serve` passes for you):

- `GET /v1/safeinfer` shows the server's SafeInfer configuration, read-only. Request
  paths never name files, and the response shows none (vectors by name, the expert by
  its folder's name, the harm probe by its layer and threshold).
- `GET /v1/safeinfer/gate/{id}` gives the harm probe's verdict on a request in mode
  `auto` (`id`: the completion's `id`), from the workers; 404 when none is known.
- Completion and chat requests have their `vllm_xargs` SafeInfer options validated as
  the client wrote them, before vLLM's request model converts them: it turns `true` into
  1 for a field that takes strings and numbers, so a `"safeinfer_gamma": true` would
  otherwise steer at gamma 1 instead of being refused.

vLLM adds `--middleware` entries outside its own API-key check, so this one applies the
same rule itself: with `--api-key` (or `VLLM_API_KEY`) set, a request without the key as
`Authorization: Bearer` gets 401.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vllm_safeinfer.config import SafeInferConfig

PATH = "/v1/safeinfer"
VECTORS_PATH = "/v1/safeinfer/vectors"
GATE_PATH = "/v1/safeinfer/gate/"
VECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MIDDLEWARE = f"{__name__}.safeinfer_endpoints"


def describe(config: SafeInferConfig | None, model_config) -> dict[str, Any]:
    """The configuration as `GET /v1/safeinfer` reports it (published vectors included)."""
    from vllm_safeinfer.batch_state import VectorTable

    if config is None:
        return {"configured": False}
    table = VectorTable(config, model_config)
    probe = None
    if config.probe is not None:
        from vllm_safeinfer.probe import HarmProbe

        loaded = HarmProbe.load(config.probe)
        probe = {"layer": loaded.layer, "normalize": loaded.normalize, "method": loaded.method,
                 "threshold": (loaded.threshold if config.probe_threshold is None
                               else config.probe_threshold)}
    return {
        "configured": True,
        "vectors": {name: {"layer": entry.layer, "default_gamma": entry.gamma,
                           "relative_dose": entry.dose}
                    for name, entry in sorted(table.entries.items())},
        "default_vector": config.default_vector,
        "expert": None if config.expert_model is None else Path(config.expert_model).name,
        "expert_dtype": config.expert_dtype,
        "defaults": {"mode": config.mode.value, "gamma": config.gamma, "lam": config.lam,
                     "defence": None if config.default_defence is None
                     else config.default_defence.value},
        "probe": probe,
        "enforce": config.enforce,
    }


def api_keys(args) -> list[str]:
    """The keys vLLM's server accepts (`--api-key`, else `VLLM_API_KEY`)."""
    import vllm.envs as envs

    return [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]


def authorized(headers: Any, keys: list[str]) -> bool:
    if not keys:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(
        hmac.compare_digest(token.encode(), key.encode()) for key in keys)


def bad_request(message: str):
    """vLLM's own error body, so clients parse ours like its other 400s."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "BadRequestError",
                                   "param": None, "code": 400}}, 400)


async def check_options(request) -> str | None:
    """The error in a generation request's raw SafeInfer options, if any."""
    from vllm_safeinfer.request_options import resolve_request

    config = _config(request.app.state)
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None  # not JSON: vLLM answers that itself
    xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        resolve_request(xargs, config)
    except ValueError as err:
        return str(err)
    return None


async def safeinfer_endpoints(request, call_next: Callable[[Any], Awaitable[Any]]):
    from fastapi.responses import JSONResponse

    if request.url.path in GENERATION_PATHS and request.method == "POST":
        error = await check_options(request)
        return bad_request(error) if error else await call_next(request)
    gate = request.url.path.startswith(GATE_PATH)
    if request.url.path not in (PATH, VECTORS_PATH) and not gate:
        return await call_next(request)
    state = request.app.state
    if not authorized(request.headers, api_keys(state.args)):
        return JSONResponse({"error": "unauthorized: send the server's API key"}, 401)
    if gate:
        return await gate_decision(request, request.url.path[len(GATE_PATH):])
    if request.url.path == VECTORS_PATH:
        if request.method != "POST":
            return JSONResponse({"error": f"{VECTORS_PATH} takes POST"}, 405)
        return await publish(request)
    if request.method != "GET":
        return JSONResponse({"error": f"{PATH} is read-only: use GET"}, 405)
    if not hasattr(state, "safeinfer_description"):
        state.safeinfer_description = describe(_config(state), state.vllm_config.model_config)
    return JSONResponse(state.safeinfer_description)


async def gate_decision(request, request_id: str):
    """The harm probe's verdict on `request_id`, as the first worker recorded it."""
    from fastapi.responses import JSONResponse

    if request.method != "GET":
        return JSONResponse({"error": f"{GATE_PATH}ID is read-only: use GET"}, 405)
    if _config(request.app.state) is None or not request_id:
        return JSONResponse({"error": "no gate decision: SafeInfer is not configured"}, 404)
    found = await request.app.state.engine_client.collective_rpc(
        "safeinfer_gate_decisions", args=([request_id],))
    decision = found[0].get(request_id) if found else None
    if decision is None:
        return JSONResponse({"error": f"no gate decision for {request_id!r} (not in mode "
                                      "auto, unfinished, or forgotten)"}, 404)
    return JSONResponse({"id": request_id, **decision})


async def publish(request):
    """`POST /v1/safeinfer/vectors {"name": NAME}`: load `vector_dir/NAME.safetensors`
    (the folder the operator configured; requests still never name files) as a new
    version of vector NAME, in every worker, then in the engine core, then here: from the
    engine core's switch on, new requests naming NAME steer with it and get its cache
    identity; running ones keep the contents they started with."""
    from fastapi.responses import JSONResponse

    from vllm_safeinfer.batch_state import VectorTable
    from vllm_safeinfer.model_identity import check_vector_model
    from vllm_safeinfer.vectors import SafetyVector

    state = request.app.state
    config = _config(state)
    try:
        body = json.loads(await request.body())
    except ValueError:
        return bad_request(f"{VECTORS_PATH} takes a JSON object {{\"name\": NAME}}")
    name = body.get("name") if isinstance(body, dict) else None
    if config is None or config.vector_dir is None:
        return bad_request("this server has no safeinfer.vector_dir to publish vectors from")
    if not isinstance(name, str) or not VECTOR_NAME.fullmatch(name):
        return bad_request(f"name must match {VECTOR_NAME.pattern} (a file name in the "
                           f"server's vector_dir, without .safetensors), got {name!r}")
    path = str(Path(config.vector_dir) / f"{name}.safetensors")
    if not hasattr(state, "safeinfer_lock"):
        state.safeinfer_lock = asyncio.Lock()
        state.safeinfer_table = VectorTable(config, state.vllm_config.model_config)
        state.safeinfer_version = 0
    async with state.safeinfer_lock:
        try:
            vector = SafetyVector.load(path)
            state.safeinfer_table.check_publishable(name, path, vector)
            check_vector_model(vector, state.vllm_config.model_config,
                               allow_other_model=config.allow_other_model_vectors)
        except (OSError, ValueError) as err:
            return bad_request(f"vector {name!r}: {err}")
        version = state.safeinfer_version + 1
        engine = state.engine_client
        await engine.collective_rpc("safeinfer_publish_vector", args=(name, path, version))
        await engine.engine_core.call_utility_async("safeinfer_publish_vector", name, path,
                                                    version)
        entry = state.safeinfer_table.publish(name, path, vector, version)
        state.safeinfer_version = version
        state.safeinfer_config = config.with_vector(name, path)
        engine.input_processor._safeinfer_config = state.safeinfer_config
        if hasattr(state, "safeinfer_description"):
            del state.safeinfer_description
    return JSONResponse({"name": name, "version": version, "layer": entry.layer,
                         "default_gamma": entry.gamma, "relative_dose": entry.dose})


def _config(state) -> SafeInferConfig | None:
    if not hasattr(state, "safeinfer_config"):
        state.safeinfer_config = SafeInferConfig.from_additional_config(
            state.vllm_config.additional_config)
    return state.safeinfer_config
