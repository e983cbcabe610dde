"""The chat-completions client shared by the endpoint backend and the OpenAI judge: the
`openai` client's own retries (exponential backoff with jitter, `Retry-After` honoured)
for transient failures, and one wording of what went wrong, naming the URL."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# httpx is imported here, not where the gate is asked: the openai client reads
# sys.modules["httpx"] from its worker threads, and a first import in one of them would
# show the others a half-initialised module.
import httpx
import openai

# Statuses the openai client retries (with connection errors and time-outs): once its
# retries run out they mean the server, not one request, is in trouble.
RETRIED_STATUS = frozenset({408, 409, 429})
# vLLM's convention for "no key": the client insists on one, the server ignores it.
NO_KEY = "EMPTY"


@dataclass(frozen=True)
class Reply:
    """What a chat completion says: the text, why it stopped, how many tokens, its id."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    id: str | None = None


class NotACompletion(RuntimeError):
    """A success answer that holds no chat completion: not an OpenAI-compatible server."""


def api_base(base_url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> `http://host:port/v1`."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class ChatEndpoint:
    """`/v1/chat/completions` of one server. Without an API key no Authorization header
    is sent at all, so a server that checks keys says so instead of reading "EMPTY"."""

    def __init__(self, base_url: str, *, api_key: str | None, max_retries: int,
                 timeout_s: float) -> None:
        self._base = api_base(base_url)
        self.url = self._base + "/chat/completions"
        self._api_key = api_key or NO_KEY
        self._headers: Mapping[str, Any] = {} if api_key else {"Authorization": openai.Omit()}
        self.max_retries = max_retries
        self.timeout_s = timeout_s

    def client(self) -> openai.OpenAI:
        """A client to use in a `with` block; it is safe to share between threads."""
        return openai.OpenAI(base_url=self._base, api_key=self._api_key,
                             max_retries=self.max_retries, timeout=self.timeout_s)

    def complete(self, client: openai.OpenAI, body: Mapping[str, Any],
                 extra_body: Mapping[str, Any] | None = None) -> Reply:
        """One chat completion; `NotACompletion` if a success answer holds none (the
        client does not check what it parses)."""
        try:
            completion: object = client.chat.completions.create(
                **body, extra_body=extra_body, extra_headers=self._headers)
        except ValueError as error:
            raise NotACompletion(f"{self.url} answered no chat completion: {error}") from error
        choices = getattr(completion, "choices", None)
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None)
        if message is None or not isinstance(text, (str, type(None))):
            raise NotACompletion(
                f"{self.url} answered no chat completion: {str(completion)[:500]}")
        tokens = getattr(getattr(completion, "usage", None), "completion_tokens", None)
        reply_id = getattr(completion, "id", None)
        return Reply(text or "", getattr(choice, "finish_reason", None),
                     tokens if isinstance(tokens, int) else 0,
                     reply_id if isinstance(reply_id, str) else None)

    def gate_decision(self, completion_id: str) -> dict | None:
        """SafeInfer's harm-probe verdict on a completion (`GET /v1/safeinfer/gate/ID`),
        None where the server has none: not gated, or not a SafeInfer server."""
        from urllib.parse import quote

        headers = {} if self._api_key == NO_KEY else {"Authorization": f"Bearer {self._api_key}"}
        try:
            answer = httpx.get(f"{self._base}/safeinfer/gate/{quote(completion_id, safe='')}",
                               headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError:
            return None
        if answer.status_code != 200:
            return None
        body = answer.json()
        return {k: body[k] for k in ("flagged", "score", "defence") if k in body}

    def gave_up(self, error: openai.APIError) -> str:
        """What the last attempt got, after how many attempts."""
        attempts = 1 + int(error.request.headers.get("x-stainless-retry-count", "0"))
        return f"{self.url}: gave up after {attempts} attempts; last: {describe(error)}"


def is_transient(error: openai.APIError) -> bool:
    """Whether the client retried this failure (and so gave up on it)."""
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRIED_STATUS or error.status_code >= 500
    return isinstance(error, openai.APIConnectionError)


def describe(error: openai.APIError) -> str:
    """The server's own message for an error answer, else the underlying network error."""
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {error.response.text[:1000]}"
    cause = error.__cause__
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return f"{type(error).__name__}: {error}{detail}"
