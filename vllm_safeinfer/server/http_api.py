"""SafeInfer's HTTP surface on vLLM's OpenAI server, added through vLLM's own extension
point (`--middleware`, which `safeinfer serve` passes for you):

- `GET /v1/safeinfer` shows the server's SafeInfer configuration, read-only. Request
  paths never name files, and the response shows none (vectors by name, the expert by
  its folder's name, the harm probe by its layer and threshold).
- `GET /v1/safeinfer/gate/{id}` gives the harm probe's verdict on a request in mode
  `auto` (`id`: the completion's `id`), from the workers; 404 when none is known.
- `POST /v1/safeinfer/vectors {"name": NAME}` publishes `vector_dir/NAME.safetensors`
  (`publishing.py`). It is the operator's: it needs the admin key (`--safeinfer-admin-key`
  of `safeinfer serve`, or the environment variable `SAFEINFER_ADMIN_KEY`), never the
  inference key, and is refused (403) on a server that has none.
- `GET /metrics` (vLLM's) first asks the workers to add the counts they hold on the
  device to their counters, so a scrape sees every finished request; at most once per
  `WORKER_READ_INTERVAL_S` whatever the scrape rate (a read makes every worker wait for
  its device between two steps), so a scrape may lag the device by that long.
- Every door: a request's SafeInfer options are resolved and checked once, in the
  frontend's InputProcessor, which every route that reaches the engine goes through
  (`/v1/completions`, `/v1/chat/completions`, `/v1/responses`, `/v1/messages`,
  `/invocations`, ...), so they answer alike. Here only the raw JSON types of
  `vllm_xargs` are checked (`request_options.check_json_types`), on any JSON POST, before
  vLLM's request models turn `true` into 1 (a `"safeinfer_gamma": true` would otherwise
  steer at gamma 1).

vLLM adds `--middleware` entries outside its own API-key check, so this one checks keys
before it reads any body. With `--api-key` (or `VLLM_API_KEY`) set, vLLM guards only the
paths under `/v1`, `/v2`, `/inference` and `/cohere`; this middleware answers 401 without
the key as `Authorization: Bearer` on every other path too (`/invocations`, `/tokenize`,
`/pooling`, the dev and RL routes, ...) except `OPEN_PATHS` (health, ping, version, load,
metrics and the API docs), and a request to a guarded path without the key goes straight
to vLLM's 401, its body unread. Error messages never list vector names: a client learns
them only from `GET /v1/safeinfer`, behind the key. Bodies on SafeInfer's endpoints are
limited to `MAX_BODY_BYTES` (413).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.contract import GATE_DECISIONS, REPORT_METRICS
from vllm_safeinfer.common.vector_table import VectorTable

logger = logging.getLogger(__name__)

WORKER_READ_INTERVAL_S = 1.0

PATH = "/v1/safeinfer"
VECTORS_PATH = "/v1/safeinfer/vectors"
GATE_PATH = "/v1/safeinfer/gate/"
VECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# What stays reachable without the API key: liveness, the version, the load, the
# Prometheus scrape and the API's docs.
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/load", "/metrics", "/docs",
                        "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
METRICS_PATH = "/metrics"
MIDDLEWARE = f"{__name__}.safeinfer_endpoints"
ADMIN_KEY_ENV = "SAFEINFER_ADMIN_KEY"
MAX_BODY_BYTES = 64 << 10
PUBLISHING_OFF = (f"publishing vectors is off on this server: start it with "
                  f"--safeinfer-admin-key (or set {ADMIN_KEY_ENV}) and send that key")


def describe(config: SafeInferConfig | None, table: VectorTable | None) -> dict[str, Any]:
    """The configuration as `GET /v1/safeinfer` reports it (published vectors included)."""
    if config is None or table is None:
        return {"configured": False}
    probe = None
    if config.probe is not None:
        from vllm_safeinfer.common.probe import HarmProbe

        loaded = HarmProbe.load(config.probe)
        probe = {"layers": list(loaded.layers), "position": loaded.position,
                 "normalize": loaded.normalize, "method": loaded.method,
                 "threshold": (loaded.threshold if config.probe_threshold is None
                               else config.probe_threshold),
                 "monitor_threshold": loaded.monitor_threshold}
    return {
        "configured": True,
        "vectors": {name: entry.describe() for name, entry in sorted(table.entries.items())},
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


def error(status: int, message: str):
    """vLLM's own error body, so clients parse ours like its other errors."""
    from fastapi.responses import JSONResponse

    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            404: "NotFoundError", 405: "MethodNotAllowed", 409: "ConflictError",
            413: "RequestTooLarge"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": status}}, status)


class BodyTooLarge(Exception):
    pass


async def limited_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, read no further than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


async def check_options(request) -> str | None:
    """The error in the raw JSON types of a request's `vllm_xargs`, if any."""
    from vllm_safeinfer.common.request_options import check_json_types

    if not request.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None  # not JSON: vLLM answers that itself
    xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        check_json_types(xargs)
    except ValueError as err:
        return str(err)
    return None


def guarded_by_vllm(path: str) -> bool:
    """Whether vLLM's own API-key middleware checks `path`."""
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

    return path.startswith(GUARDED_PREFIX)


async def safeinfer_endpoints(request, call_next: Callable[[Any], Awaitable[Any]]):
    path, state = request.url.path, request.app.state
    if path == METRICS_PATH and request.method == "GET" and _config(state) is not None:
        if not hasattr(state, "safeinfer_worker_reads"):
            state.safeinfer_worker_reads = WorkerReads()
        await state.safeinfer_worker_reads.report(state.engine_client)
        return await call_next(request)
    gate = path.startswith(GATE_PATH)
    keys = api_keys(state.args)
    if path == VECTORS_PATH:
        return await publish(request)
    if path == PATH or gate:
        return await read_only(request, path, gate, keys)
    if request.method == "OPTIONS" or path in OPEN_PATHS:
        return await call_next(request)
    if not authorized(request.headers, keys):
        if guarded_by_vllm(path):
            return await call_next(request)  # vLLM answers 401, the body unread
        return error(401, "unauthorized: send the server's API key")
    if request.method == "POST":
        message = await check_options(request)
        if message:
            return error(400, message)
    return await call_next(request)


async def read_only(request, path: str, gate: bool, keys: list[str]):
    """`GET /v1/safeinfer` and `GET /v1/safeinfer/gate/ID`, behind the API key."""
    from fastapi.responses import JSONResponse

    if not authorized(request.headers, keys):
        return error(401, "unauthorized: send the server's API key")
    if request.method != "GET":
        return error(405, f"{path if not gate else GATE_PATH + 'ID'} is read-only: use GET")
    if gate:
        return await gate_decision(request, path[len(GATE_PATH):])
    state = request.app.state
    if not hasattr(state, "safeinfer_description"):
        config = _config(state)
        state.safeinfer_description = describe(
            config, None if config is None else _publisher(state).table)
    return JSONResponse(state.safeinfer_description)


class WorkerReads:
    """The workers count on the device and add to their counters now and then; a scrape
    asks them to add what they hold now, so it sees every finished request. One read at
    a time, and none within `WORKER_READ_INTERVAL_S` of the last."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._last = float("-inf")

    async def report(self, engine) -> None:
        async with self._lock:
            now = time.monotonic()
            if now - self._last < WORKER_READ_INTERVAL_S:
                return
            self._last = now
            try:
                await engine.collective_rpc(REPORT_METRICS)
            except Exception:
                logger.exception("SafeInfer: the workers' metrics could not be read for "
                                 "this scrape")


async def gate_decision(request, request_id: str):
    """The harm probe's verdict on `request_id`, as the first worker recorded it."""
    from fastapi.responses import JSONResponse

    if _config(request.app.state) is None or not request_id:
        return error(404, "no gate decision: SafeInfer is not configured")
    found = await request.app.state.engine_client.collective_rpc(
        GATE_DECISIONS, args=([request_id],))
    decision = found[0].get(request_id) if found else None
    if decision is None:
        return error(404, f"no gate decision for {request_id!r} (not in mode auto, "
                          "unfinished, or forgotten)")
    return JSONResponse({"id": request_id, **decision})


async def publish(request):
    """`POST /v1/safeinfer/vectors {"name": NAME}` with the admin key: load
    `vector_dir/NAME.safetensors` (the folder the operator configured; requests never
    name files) as the new contents of vector NAME everywhere (`publishing.py`). From
    the engine core's switch on, new requests naming NAME steer with it and are keyed by
    its contents; running ones keep the contents they started with."""
    from fastapi.responses import JSONResponse

    from vllm_safeinfer.server.publishing import PublishError

    state = request.app.state
    admin_key = os.environ.get(ADMIN_KEY_ENV, "")
    if not admin_key:
        return error(403, PUBLISHING_OFF)
    if admin_key in api_keys(state.args):
        return error(403, f"publishing is off: the admin key ({ADMIN_KEY_ENV}) must differ "
                          "from the inference key (--api-key)")
    if not authorized(request.headers, [admin_key]):
        return error(401, f"unauthorized: publishing needs the admin key ({ADMIN_KEY_ENV}) "
                          "as Authorization: Bearer")
    if request.method != "POST":
        return error(405, f"{VECTORS_PATH} takes POST")
    try:
        body = json.loads(await limited_body(request))
    except BodyTooLarge:
        return error(413, f"{VECTORS_PATH} takes a body of at most {MAX_BODY_BYTES} bytes")
    except ValueError:
        return error(400, f"{VECTORS_PATH} takes a JSON object {{\"name\": NAME}}")
    name = body.get("name") if isinstance(body, dict) else None
    config = _config(state)
    if config is None:
        return error(400, "SafeInfer is not configured on this server")
    if not isinstance(name, str) or not VECTOR_NAME.fullmatch(name):
        return error(400, f"name must match {VECTOR_NAME.pattern} (a file name in the "
                          f"server's vector_dir, without .safetensors), got {name!r}")
    try:
        new_config, answer = await _publisher(state).publish(config, state.engine_client, name)
    except PublishError as err:
        return error(err.status, str(err))
    state.safeinfer_config = new_config
    state.engine_client.input_processor._safeinfer_config = new_config
    if hasattr(state, "safeinfer_description"):
        del state.safeinfer_description
    return JSONResponse(answer)


def _publisher(state):
    from vllm_safeinfer.server.publishing import Publisher

    if not hasattr(state, "safeinfer_publisher"):
        state.safeinfer_publisher = Publisher(
            _config(state), state.vllm_config, getattr(state.args, "api_server_count", 1) or 1)
    return state.safeinfer_publisher


def _config(state) -> SafeInferConfig | None:
    if not hasattr(state, "safeinfer_config"):
        state.safeinfer_config = SafeInferConfig.from_additional_config(
            state.vllm_config.additional_config)
    return state.safeinfer_config
