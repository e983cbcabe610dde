"""Publishing a safety vector to a running server (`POST /v1/safeinfer/vectors`), all or
nothing.

The API server reads `vector_dir/NAME.safetensors` once and checks it (file, model,
table); from then on only those bytes travel: every worker receives them with their
sha256 and verifies both on arrival before staging a row reached by that identity alone
(`engine/publishing.py`), then the engine core switches the name to the new identity
(`engine/prefix_cache.py`): that switch is the commit, since workers steer by the
identity each request is stamped with. A failure at either step takes the staged rows
back before any request was stamped with them: every process keeps the vector it had,
no slot stays used, and the client gets an error saying which step failed.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.contract import PUBLISH_VECTOR, STAGE_VECTOR, TAKE_BACK_VECTOR
from vllm_safeinfer.common.model_identity import check_vector_model
from vllm_safeinfer.common.vector_table import VectorTable
from vllm_safeinfer.common.vectors import SafetyVector, content_sha256, read_vector_file

logger = logging.getLogger(__name__)


class PublishError(Exception):
    """A publication refused or undone; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Publisher:
    """The API server's side of publishing: its table (to check and describe), the
    version count of each name, and one publication at a time."""

    def __init__(self, config: SafeInferConfig, vllm_config, api_server_count: int) -> None:
        # The bytes the start-up checks read, by the identities they wrote in the config.
        self.table = VectorTable(config, vllm_config.model_config)
        self.versions: dict[str, int] = {}
        self._model_config = vllm_config.model_config
        self._lock = asyncio.Lock()
        self._refusal = self._single_frontend_refusal(vllm_config, api_server_count)

    @staticmethod
    def _single_frontend_refusal(vllm_config, api_server_count: int) -> str | None:
        if api_server_count > 1:
            return (f"this server runs {api_server_count} API servers; a vector published "
                    "through one would stay unknown to the others: publishing needs "
                    "--api-server-count 1")
        if vllm_config.parallel_config.data_parallel_size > 1:
            return ("publishing vectors is not supported with data parallelism: restart "
                    "with the vector configured")
        return None

    async def publish(self, config: SafeInferConfig, engine, name: str
                      ) -> tuple[SafeInferConfig, dict[str, Any]]:
        """Publish `vector_dir/name.safetensors` through `engine` (vLLM's engine client);
        returns the config with the vector and the response body."""
        if self._refusal is not None:
            raise PublishError(409, self._refusal)
        if config.vector_dir is None:
            raise PublishError(400, "this server has no safeinfer.vector_dir to publish "
                                    "vectors from")
        where = str(Path(config.vector_dir) / f"{name}.safetensors")
        async with self._lock:
            try:
                data = read_vector_file(where)
                sha256 = content_sha256(data)
                vector = SafetyVector.from_bytes(data, where)
                check_vector_model(vector, self._model_config,
                                   allow_other_model=config.allow_other_model_vectors)
                self.table.check_publishable(name, where, vector, sha256)
            except (OSError, ValueError) as err:
                raise PublishError(400, f"vector {name!r}: {err}") from None
            await self._run_everywhere(engine, name, where, data, sha256)
            self.table.stage(name, where, vector, sha256)
            entry = self.table.bind(name, sha256)
            self.versions[name] = self.versions.get(name, 0) + 1
        return config.with_vector(name, where, sha256), {
            "name": name, "version": self.versions[name], "sha256": sha256,
            **entry.describe()}

    async def _run_everywhere(self, engine, name: str, where: str, data: bytes,
                              sha256: str) -> None:
        step = "a worker refused it"
        try:
            await engine.collective_rpc(STAGE_VECTOR, args=(name, where, data, sha256))
            step = "the engine core refused it"
            await engine.engine_core.call_utility_async(PUBLISH_VECTOR, name, where, sha256)
        except Exception as err:
            await self._take_back(engine, sha256)
            raise PublishError(500, f"vector {name!r} was not published: {step} ({err}); "
                                    "every process keeps its previous vectors") from None

    @staticmethod
    async def _take_back(engine, sha256: str) -> None:
        try:
            await engine.collective_rpc(TAKE_BACK_VECTOR, args=(sha256,))
        except Exception:
            logger.exception("SafeInfer: taking back a failed publication failed")
