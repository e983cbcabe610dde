"""One POST with retries, shared by the endpoint backend and the OpenAI judge: a
transient failure (HTTP 5xx, 429, a dropped connection, a time-out) is retried with
exponential backoff; any other answer is returned to the caller to judge."""
from __future__ import annotations

import time
from collections.abc import Mapping

import httpx

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class RetriesExhausted(RuntimeError):
    """Every attempt failed transiently; the message names the URL and the last error."""


def post_json(client: httpx.Client, url: str, body: Mapping[str, object], *,
              max_retries: int, backoff_s: float) -> httpx.Response:
    """POST `body` as JSON; retry transient failures up to `max_retries` times."""
    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            response = client.post(url, json=body)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            last = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code not in RETRYABLE_STATUS:
            return response
        last = f"HTTP {response.status_code}: {response.text[:500]}"
    raise RetriesExhausted(f"{url}: gave up after {max_retries + 1} attempts; last: {last}")


def api_url(base_url: str, path: str) -> str:
    """`http://host:port` or `http://host:port/v1` + `/chat/completions`."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + path
