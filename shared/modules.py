"""The WASM module registry: module name -> bytes and sha256, from `static/wasm/`.

Nodes are told a module's sha256 and fetch it from `/modules/<sha256>.wasm`, so a cached
copy is valid forever and a changed module can never be mistaken for the old one. Modules
users upload are not in the registry: their bytes live in Redis (`store.modules`), and a
gateway names one with `Module.uploaded` and serves it from there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .exceptions import ConfigError

DEFAULT_STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@dataclass(frozen=True)
class Module:
    name: str
    sha256: str
    path: Path | None  # None: uploaded, its bytes in Redis
    data: bytes  # held in memory: the bytes served are always the bytes hashed (b"" if uploaded)

    @classmethod
    def uploaded(cls, sha256: str) -> Module:
        """A module a job brought (`store.modules`): known by its hash, its bytes not held here."""
        return cls(f"uploaded-{sha256[:12]}", sha256, None, b"")

    @property
    def url(self) -> str:
        return f"/modules/{self.sha256}.wasm"


class ModuleRegistry:
    def __init__(self, *, static_dir: Path = DEFAULT_STATIC_DIR, extra_dirs: tuple[Path, ...] = ()) -> None:
        self.by_name: dict[str, Module] = {}
        self.by_sha: dict[str, Module] = {}
        for directory in (static_dir / "wasm", *extra_dirs):
            for path in sorted(directory.glob("*.wasm")):
                data = path.read_bytes()
                mod = Module(path.stem, hashlib.sha256(data).hexdigest(), path, data)
                self.by_name[mod.name] = mod
                self.by_sha[mod.sha256] = mod

    def get(self, name: str) -> Module:
        try:
            return self.by_name[name]
        except KeyError:
            raise ConfigError(f"WASM module {name!r} not found; run `make wasm`") from None
