"""What a worker downloads from its gateway, each checked against its sha256.

The controller is not trusted further than it must be (issue 9.9): every download is from
the controller's own origin (scheme, host and port of the join link; no redirects), its
size is capped while it streams (a module at `MAX_MODULE_BYTES`, like the controller's own
check, a block at `MAX_BLOCK_BYTES`, a task's input at `MAX_INPUT_BYTES`), and the module
cache on disk is bounded.

- `ModuleStore`: modules on disk as `<dir>/<sha256>.wasm`, fetched once (concurrent requests
  for the same module share one download), kept across restarts, at most `max_count`
  modules and `max_bytes` bytes, least recently used first out. Executor processes read
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
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import httpx

from ..shared.wasm_module import MAX_MODULE_BYTES
from .exceptions import ModuleInvalid

log = logging.getLogger(__name__)

MIB = 1024 * 1024
BLOCK_CACHE_BYTES = 256 * MIB
MAX_BLOCK_BYTES = 128 * MIB  # one shared input block
MAX_INPUT_BYTES = 256 * MIB  # a task's whole input (inline bytes and blocks); the worker's frame cap too
MAX_JSON_BYTES = 1 * MIB  # a small JSON answer (`/api/modules`)
MODULE_CACHE_BYTES = 1024 * MIB
MODULE_CACHE_COUNT = 64
_DEFAULT_PORTS = {"http": 80, "https": 443}


class TooLarge(OSError):
    """A download went past its size limit (it was stopped there)."""


class ForeignUrl(OSError):
    """A URL the controller sent is not on the controller's own origin (never fetched)."""


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL, with the scheme's default port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    except ValueError:  # a port that is not a number
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def on_origin(base_url: str, url: str) -> str:
    """`url` resolved against the controller's `base_url`, if it stays on that origin;
    `ForeignUrl` if it points anywhere else (another host, port or scheme)."""
    full = urljoin(base_url + "/", url)
    if origin_of(full) != origin_of(base_url) or origin_of(full)[0] not in _DEFAULT_PORTS:
        raise ForeignUrl(f"refused to fetch {full!r}: not on the controller's origin {base_url}")
    return full


async def read_capped(
    http: httpx.AsyncClient, url: str, *, limit: int, what: str, params: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """(HTTP status, body) of GET `url`, streamed and stopped as soon as the body is larger
    than `limit` bytes (`TooLarge`); redirects are not followed. The body of a non-200
    answer is not read."""
    async with http.stream("GET", url, params=params, follow_redirects=False) as resp:
        if resp.status_code != 200:
            return resp.status_code, b""
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"{what} is {int(declared)} bytes, more than the limit of {limit}; not fetched")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"{what} is larger than the limit of {limit} bytes; download stopped")
            chunks.append(chunk)
        return resp.status_code, b"".join(chunks)


class ModuleStore:
    def __init__(
        self,
        *,
        directory: Path,
        base_url: str,
        http: httpx.AsyncClient,
        max_bytes: int = MODULE_CACHE_BYTES,
        max_count: int = MODULE_CACHE_COUNT,
        max_module_bytes: int = MAX_MODULE_BYTES,
    ) -> None:
        self.directory = directory
        self.base_url = base_url
        self.http = http
        self.max_bytes = max_bytes
        self.max_count = max(1, max_count)
        self.max_module_bytes = max_module_bytes
        self._checked: set[str] = set()
        self._pending: dict[str, asyncio.Future[Path]] = {}

    def path_of(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.wasm"

    async def get(self, sha256: str, url: str) -> Path:
        """The file of module `sha256`, downloading it from `url` (relative to the gateway,
        or absolute on the gateway's origin) unless a verified copy is on disk."""
        path = self.path_of(sha256)
        if sha256 in self._checked and path.exists():
            _touch(path)
            return path
        self._checked.discard(sha256)
        pending = self._pending.get(sha256)
        if pending is None:
            pending = asyncio.ensure_future(self._obtain(sha256, url))
            self._pending[sha256] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(sha256, None))
        return await asyncio.shield(pending)

    async def _obtain(self, sha256: str, url: str) -> Path:
        path = self.path_of(sha256)
        with contextlib.suppress(OSError):
            if path.stat().st_size <= self.max_module_bytes:
                data = await asyncio.to_thread(path.read_bytes)
                if hashlib.sha256(data).hexdigest() == sha256:
                    self._checked.add(sha256)
                    _touch(path)
                    return path
            log.warning("cached module %s is corrupt; fetching it again", path)
        try:
            full = on_origin(self.base_url, url)
            status, data = await read_capped(
                self.http, full, limit=self.max_module_bytes, what=f"module {sha256[:12]} from {full}"
            )
        except (ForeignUrl, TooLarge) as exc:
            raise ModuleInvalid(f"module {sha256[:12]}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ModuleInvalid(f"module {sha256[:12]}: cannot fetch {url}: {exc}") from None
        if status != 200:
            raise ModuleInvalid(f"module {sha256[:12]}: HTTP {status} from {full}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ModuleInvalid(f"module from {full} has sha256 {actual}, expected {sha256}")
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        await asyncio.to_thread(tmp.write_bytes, data)
        os.replace(tmp, path)  # atomic: another worker sharing the directory never sees half a file
        self._checked.add(sha256)
        log.info("module %s fetched (%d bytes)", sha256[:12], len(data))
        await asyncio.to_thread(self.evict, keep=sha256)
        return path

    def evict(self, *, keep: str = "") -> list[str]:
        """Delete the least recently used modules until at most `max_count` modules and
        `max_bytes` bytes are on disk (never `keep`, the one just fetched); returns the
        sha256 of those deleted. A module deleted while a task still needs it is fetched again."""
        entries: list[tuple[float, int, Path]] = []
        for path in self.directory.glob("*.wasm"):
            with contextlib.suppress(OSError):
                st = path.stat()
                entries.append((st.st_mtime, st.st_size, path))
        entries.sort()  # oldest use first
        total = sum(size for _, size, _ in entries)
        count = len(entries)
        deleted: list[str] = []
        for _mtime, size, path in entries:
            if count <= self.max_count and total <= self.max_bytes:
                break
            if path.stem == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._checked.discard(path.stem)
            deleted.append(path.stem)
            count -= 1
            total -= size
        if deleted:
            log.info("module cache: %d least recently used module(s) removed", len(deleted))
        return deleted


def _touch(path: Path) -> None:
    """Mark a module as used now (its mtime orders the cache's eviction)."""
    with contextlib.suppress(OSError):
        os.utime(path)


class BlockCache:
    def __init__(
        self,
        *,
        base_url: str,
        http: httpx.AsyncClient,
        token: Callable[[], str],
        budget_bytes: int = BLOCK_CACHE_BYTES,
        max_block_bytes: int = MAX_BLOCK_BYTES,
        max_input_bytes: int = MAX_INPUT_BYTES,
    ) -> None:
        self.base_url = base_url
        self.http = http
        self.token = token
        self.budget_bytes = budget_bytes
        self.max_block_bytes = max_block_bytes
        self.max_input_bytes = max_input_bytes
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
        # built here from the controller's origin: the frame names only the job and the hash
        url = on_origin(self.base_url, f"/blocks/{quote(job_id, safe='')}/{quote(sha256, safe='')}")
        status, data = await read_capped(
            self.http,
            url,
            params={"token": self.token()},
            limit=self.max_block_bytes,
            what=f"block {sha256[:12]} of job {job_id}",
        )
        if status != 200:
            raise OSError(f"block {sha256[:12]} of job {job_id}: HTTP {status}")
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
        """A task's input: its inline bytes followed by its blocks, in order (`TooLarge`
        past `max_input_bytes` in all)."""
        if not blocks:
            return inline
        parts = [inline]
        size = len(inline)
        for sha in blocks:
            data = await self.get(job_id, sha)
            size += len(data)
            if size > self.max_input_bytes:
                raise TooLarge(f"the task's input is larger than the limit of {self.max_input_bytes} bytes")
            parts.append(data)
        return b"".join(parts)
