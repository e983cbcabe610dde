"""Where responses come from: a vLLM engine in this process, a running OpenAI-compatible
server, or engines in Ray actors. All three take the same requests (the user turn and its
per-request `safeinfer_*` options) and report each response as soon as it finishes, so a
run that stops half-way keeps what it finished."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import openai

from vllm_safeinfer.common.contract import GATE_DECISIONS
from vllm_safeinfer.harmeval.http import ChatEndpoint, NotACompletion, describe, is_transient


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt at one point: `prompt` is the user turn of the chat template."""

    request_id: str
    prompt: str
    extra_args: Mapping[str, object] = field(default_factory=dict)
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """A finished response; `gate` is the harm probe's verdict on its prompt (mode
    `auto`: `{"flagged", "score", "defence"}`), None where the request was not gated."""

    request_id: str
    text: str
    finish_reason: str | None
    num_tokens: int
    gate: Mapping[str, Any] | None = None


OnDone = Callable[[Generation], None]


class GenerationError(RuntimeError):
    """A request was refused or failed: the run stops, keeping what finished."""


class Backend(Protocol):
    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone) -> None: ...


def request_seed(seed: int, request_id: str) -> int:
    """A per-request sampling seed: the same wherever and in whatever batch it runs."""
    digest = hashlib.sha256(f"{seed}|{request_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class EngineBackend:
    """A vLLM `LLM` in this process: every request enters the engine at once (one
    continuous batch, whatever the points), and finished ones are reported step by step.
    A failure aborts the rest, leaving the engine usable."""

    def __init__(self, llm) -> None:
        from vllm_safeinfer.common.config import SafeInferConfig

        self.llm = llm
        # Only an engine with SafeInfer has workers that know harm-probe verdicts.
        self._safeinfer = SafeInferConfig.from_additional_config(
            llm.llm_engine.vllm_config.additional_config) is not None

    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from vllm_safeinfer.models import chat_prompt_ids

        engine = self.llm.llm_engine
        token_ids = chat_prompt_ids(self.llm.get_tokenizer(), [r.prompt for r in requests])
        added: dict[str, str] = {}
        try:
            for request, ids in zip(requests, token_ids):
                params = SamplingParams(max_tokens=request.max_tokens,
                                        temperature=request.temperature, seed=request.seed,
                                        extra_args=dict(request.extra_args) or None)
                try:
                    internal = engine.add_request(request.request_id,
                                                  TokensPrompt(prompt_token_ids=ids), params)
                except ValueError as exc:
                    raise GenerationError(f"request {request.request_id!r} refused: {exc}") from exc
                added[internal] = request.request_id
            while engine.has_unfinished_requests():
                finished = [o for o in engine.step() if o.finished]
                ids = [added.pop(o.request_id, o.request_id) for o in finished]
                gates = self._gate_decisions(ids) if finished else {}
                for request_id, output in zip(ids, finished):
                    completion = output.outputs[0]
                    on_done(Generation(request_id, completion.text, completion.finish_reason,
                                       len(completion.token_ids), gates.get(request_id)))
        finally:
            if added:
                engine.abort_request(list(added), internal=True)


    def _gate_decisions(self, request_ids: list[str]) -> dict[str, Mapping[str, Any]]:
        """The worker's harm-probe verdicts of these requests (none for ungated ones, or
        when SafeInfer is not configured)."""
        if not self._safeinfer:
            return {}
        [found, *_] = self.llm.collective_rpc(GATE_DECISIONS, args=(request_ids,))
        return found


class EndpointBackend:
    """A running OpenAI-compatible server (`safeinfer serve`, vLLM, or anyone's):
    `/v1/chat/completions` with the options in `vllm_xargs`, `concurrency` requests in
    flight. The `openai` client retries transient failures (HTTP 5xx, 408, 409, 429,
    dropped connections, time-outs) with backoff, honouring Retry-After; a failure that
    persists, or any other error answer (a 4xx: the request itself is wrong), stops the
    run with the server's message."""

    def __init__(self, base_url: str, served_model: str, *, api_key: str | None = None,
                 concurrency: int = 16, timeout_s: float = 600.0, max_retries: int = 3) -> None:
        self._endpoint = ChatEndpoint(base_url, api_key=api_key, max_retries=max_retries,
                                      timeout_s=timeout_s)
        self.url = self._endpoint.url
        self.served_model = served_model
        self.concurrency = concurrency

    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone) -> None:
        with self._endpoint.client() as client, ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, client, request) for request in requests]
            try:
                for future in as_completed(futures):
                    on_done(future.result())
            finally:
                for future in futures:
                    future.cancel()

    def _one(self, client: openai.OpenAI, request: GenerationRequest) -> Generation:
        body: dict[str, Any] = {
            "model": self.served_model,
            "messages": [{"role": "user", "content": request.prompt}],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
        }
        extra = {"vllm_xargs": dict(request.extra_args)} if request.extra_args else None
        try:
            reply = self._endpoint.complete(client, body, extra_body=extra)
        except NotACompletion as exc:
            raise GenerationError(str(exc)) from exc
        except openai.APIError as exc:
            if is_transient(exc):
                raise GenerationError(self._endpoint.gave_up(exc)) from exc
            raise GenerationError(f"{self.url} refused request {request.request_id!r}: "
                                  f"{describe(exc)}") from exc
        gate = self._endpoint.gate_decision(reply.id) if reply.id else None
        return Generation(request.request_id, reply.text, reply.finish_reason,
                          reply.completion_tokens, gate)


class RayBackend:
    """Engines in Ray actors, each a single-process vLLM engine (vLLM's CPU platform
    refuses its own Ray executor); requests are dealt out in chunks, and each finished
    chunk is reported as it arrives. Connects to the cluster at `address`, or starts a
    local Ray when none is running and no address is given. On a cluster with GPUs each
    actor takes one GPU."""

    def __init__(self, llm_kwargs: Mapping[str, Any], *, workers: int,
                 address: str | None = None, chunk_size: int = 64) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.llm_kwargs = dict(llm_kwargs)
        self.workers = workers
        self.address = address
        self.chunk_size = chunk_size

    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone) -> None:
        import ray

        with _ray_session(self.address):
            gpus = ray.cluster_resources().get("GPU", 0)
            actor_class = ray.remote(_EngineActor).options(
                num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0,
                runtime_env={"env_vars": _engine_env()})
            actors = [actor_class.remote(self.llm_kwargs) for _ in range(self.workers)]
            try:
                self._deal(actors, list(requests), on_done)
            finally:
                for actor in actors:
                    ray.kill(actor)

    def _deal(self, actors: list, requests: list[GenerationRequest], on_done: OnDone) -> None:
        import ray

        size = max(1, min(self.chunk_size, -(-len(requests) // len(actors))))
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        running = {}
        for actor in actors:
            if chunks:
                running[actor.generate.remote(chunks.pop(0))] = actor
        while running:
            [ready], _ = ray.wait(list(running))
            actor = running.pop(ready)
            try:
                generations = ray.get(ready)
            except ray.exceptions.RayTaskError as exc:
                raise GenerationError(f"a Ray engine worker failed: {exc}") from exc
            for generation in generations:
                on_done(generation)
            if chunks:
                running[actor.generate.remote(chunks.pop(0))] = actor


class _EngineActor:
    """Hosts one engine in a Ray worker process."""

    def __init__(self, llm_kwargs: Mapping[str, Any]) -> None:
        from vllm import LLM

        self.backend = EngineBackend(LLM(**llm_kwargs))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        done: list[Generation] = []
        self.backend.generate(requests, done.append)
        return done


@contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Use the running Ray of this process, else connect (or start a local one) and
    shut it down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, runtime_env={"env_vars": _engine_env()}, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _engine_env() -> dict[str, str]:
    """vLLM's settings of this process, for the engines in the actors."""
    return {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
