"""SafeInfer's HTTP surface on vLLM's OpenAI server, added through vLLM's own extension
point (`--middleware`, which `safeinfer serve` passes for you):

- `GET /v1/safeinfer` shows the server's SafeInfer configuration, read-only. Request
  paths never name files, and the response shows none (vectors by name, the expert by
  its folder's name).
- Completion and chat requests have their `vllm_xargs` SafeInfer options validated as
  the client wrote them, before vLLM's request model converts them: it turns `true` into
  1 for a field that takes strings and numbers, so a `"safeinfer_gamma": true` would
  otherwise steer at gamma 1 instead of being refused.

vLLM adds `--middleware` entries outside its own API-key check, so this one applies the
same rule itself: with `--api-key` (or `VLLM_API_KEY`) set, a request without the key as
`Authorization: Bearer` gets 401.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vllm_safeinfer.config import SafeInferConfig

PATH = "/v1/safeinfer"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MIDDLEWARE = f"{__name__}.safeinfer_endpoints"


def describe(vllm_config) -> dict[str, Any]:
    """The configuration as `GET /v1/safeinfer` reports it."""
    from vllm_safeinfer.batch_state import VectorTable

    config = SafeInferConfig.from_additional_config(vllm_config.additional_config)
    if config is None:
        return {"configured": False}
    table = VectorTable(config, vllm_config.model_config)
    return {
        "configured": True,
        "vectors": {name: {"layer": entry.layer, "default_gamma": entry.gamma,
                           "relative_dose": entry.dose}
                    for name, entry in sorted(table.entries.items())},
        "default_vector": config.default_vector,
        "expert": None if config.expert_model is None else Path(config.expert_model).name,
        "expert_dtype": config.expert_dtype,
        "defaults": {"mode": config.mode.value, "gamma": config.gamma, "lam": config.lam},
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

    state = request.app.state
    if not hasattr(state, "safeinfer_config"):
        state.safeinfer_config = SafeInferConfig.from_additional_config(
            state.vllm_config.additional_config)
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None  # not JSON: vLLM answers that itself
    xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        resolve_request(xargs, state.safeinfer_config)
    except ValueError as err:
        return str(err)
    return None


async def safeinfer_endpoints(request, call_next: Callable[[Any], Awaitable[Any]]):
    from fastapi.responses import JSONResponse

    if request.url.path in GENERATION_PATHS and request.method == "POST":
        error = await check_options(request)
        return bad_request(error) if error else await call_next(request)
    if request.url.path != PATH:
        return await call_next(request)
    state = request.app.state
    if not authorized(request.headers, api_keys(state.args)):
        return JSONResponse({"error": "unauthorized: send the server's API key"}, 401)
    if request.method != "GET":
        return JSONResponse({"error": f"{PATH} is read-only: use GET"}, 405)
    if not hasattr(state, "safeinfer_description"):
        state.safeinfer_description = describe(state.vllm_config)
    return JSONResponse(state.safeinfer_description)
