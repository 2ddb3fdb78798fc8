"""What a worker downloads from its gateway, each checked against its sha256.

- `ModuleStore`: modules on disk as `<dir>/<sha256>.wasm`, fetched once (concurrent requests
  for the same module share one download), kept across restarts. Executor processes read
  the file and compile it once each.
- `BlockCache`: shared task input blocks (`/blocks/<job>/<sha256>?token=...`), kept in
  memory up to a byte budget, least recently used first out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urljoin

import httpx

from .exceptions import ModuleInvalid

log = logging.getLogger(__name__)

BLOCK_CACHE_BYTES = 256 * 1024 * 1024


class ModuleStore:
    def __init__(self, *, directory: Path, base_url: str, http: httpx.AsyncClient) -> None:
        self.directory = directory
        self.base_url = base_url
        self.http = http
        self._checked: set[str] = set()
        self._pending: dict[str, asyncio.Future[Path]] = {}

    def path_of(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.wasm"

    async def get(self, sha256: str, url: str) -> Path:
        """The file of module `sha256`, downloading it from `url` (relative to the gateway)
        unless a verified copy is on disk."""
        path = self.path_of(sha256)
        if sha256 in self._checked:
            return path
        pending = self._pending.get(sha256)
        if pending is None:
            pending = asyncio.ensure_future(self._obtain(sha256, url))
            self._pending[sha256] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(sha256, None))
        return await asyncio.shield(pending)

    async def _obtain(self, sha256: str, url: str) -> Path:
        path = self.path_of(sha256)
        with contextlib.suppress(OSError):
            data = await asyncio.to_thread(path.read_bytes)
            if hashlib.sha256(data).hexdigest() == sha256:
                self._checked.add(sha256)
                return path
            log.warning("cached module %s is corrupt; fetching it again", path)
        full = urljoin(self.base_url + "/", url)
        try:
            resp = await self.http.get(full)
        except httpx.HTTPError as exc:
            raise ModuleInvalid(f"module {sha256[:12]}: cannot fetch {full}: {exc}") from None
        if resp.status_code != 200:
            raise ModuleInvalid(f"module {sha256[:12]}: HTTP {resp.status_code} from {full}")
        data = resp.content
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ModuleInvalid(f"module from {full} has sha256 {actual}, expected {sha256}")
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        await asyncio.to_thread(tmp.write_bytes, data)
        os.replace(tmp, path)  # atomic: another worker sharing the directory never sees half a file
        self._checked.add(sha256)
        log.info("module %s fetched (%d bytes)", sha256[:12], len(data))
        return path


class BlockCache:
    def __init__(
        self,
        *,
        base_url: str,
        http: httpx.AsyncClient,
        token: Callable[[], str],
        budget_bytes: int = BLOCK_CACHE_BYTES,
    ) -> None:
        self.base_url = base_url
        self.http = http
        self.token = token
        self.budget_bytes = budget_bytes
        self._blocks: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    async def get(self, job_id: str, sha256: str) -> bytes:
        data = self._blocks.get(sha256)
        if data is not None:
            self._blocks.move_to_end(sha256)
            return data
        pending = self._pending.get(sha256)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(job_id, sha256))
            self._pending[sha256] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(sha256, None))
        return await asyncio.shield(pending)

    async def _fetch(self, job_id: str, sha256: str) -> bytes:
        url = f"{self.base_url}/blocks/{quote(job_id, safe='')}/{sha256}"
        resp = await self.http.get(url, params={"token": self.token()})
        if resp.status_code != 200:
            raise OSError(f"block {sha256[:12]} of job {job_id}: HTTP {resp.status_code}")
        data = resp.content
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise OSError(f"block {sha256[:12]} of job {job_id} has sha256 {actual}")
        self._blocks[sha256] = data
        self._size += len(data)
        while self._size > self.budget_bytes and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._size -= len(old)
        return data

    async def assemble(self, job_id: str, inline: bytes, blocks: list[str]) -> bytes:
        """A task's input: its inline bytes followed by its blocks, in order."""
        if not blocks:
            return inline
        parts = [inline]
        for sha in blocks:
            parts.append(await self.get(job_id, sha))
        return b"".join(parts)
