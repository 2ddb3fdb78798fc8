"""The task repo (`PD_TASK_REPO`, `processdistro up --task-repo DIR`): a user's own kinds.

Each `DIR/<kind>/` is one kind, named by its directory, and holds a `kind.toml`:

    description = "count the words of each input"   # required: `processdistro kinds` shows it
    module = "wordfreq.wasm"    # the WebAssembly module, relative to the kind's directory
    args = ["--top", "10"]      # optional: argv after the program name
    env = { LANG = "C" }        # optional: the environment
    timeout_s = 60              # optional: seconds a subtask may run on a node
    memory_mb = 256             # optional: memory cap of the program
    replicate = 0.2             # optional: share of subtasks run on two nodes and compared

It becomes `processdistro submit <kind> INPUTS -o OUTDIR` with the options of `submit wasm`
(all but MODULE), the values above as their defaults: `--arg` replaces `args`, `--env` adds
to (or overrides a key of) `env`, `--timeout`, `--memory` and `--replicate` override theirs.
The plugin is a `WasmKind` (the `wasm` plugin with these defaults).

A kind that needs its own splitting, checking or merging adds a `plugin.py` defining one
`TaskPlugin` subclass (the built-in kinds are written the same way). A subclass of `WasmKind`
gets the kind.toml (its module and defaults) as `self.spec`; any other plugin is built with
no arguments and `module` is optional. `plugin.py` is imported with importlib into every
process that loads the repo (the CLI, the scheduler, the aggregators, the gateways): it is
code run on the controller, so a task repo is trusted as the controller's own code is.

A broken kind directory (bad TOML, a missing or refused module, a plugin.py that raises, a
name already taken by a built-in kind) is reported by name with the reason (`Broken`) and
does not stop the others from loading. `scan` finds them; `shared.tasks.load_task_repo`
registers them, once per process.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect as pyinspect
import re
import sys
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import validation
from ..exceptions import ParamsError
from ..protocol import MAX_DEADLINE_S, MAX_MEMORY_MB
from ..wasm_module import inspect
from .base import Prepared, TaskPlugin
from .wasm import BlockSink, WasmParams, WasmPlugin
from .wasm_inputs import read_module

KIND_FILE = "kind.toml"
PLUGIN_FILE = "plugin.py"
# a subcommand name: what `submit <kind>` and the job's kind field can hold
KIND_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_SKIP = ("__pycache__",)


class KindToml(BaseModel):
    """What a `kind.toml` may hold (anything else is refused: a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1, max_length=200)
    module: str | None = Field(default=None, min_length=1, description="relative to the kind's directory")
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S)
    memory_mb: int | None = Field(default=None, ge=1, le=MAX_MEMORY_MB)
    replicate: float | None = Field(default=None, ge=0, le=1)


@dataclass(frozen=True)
class KindSpec:
    """One repo kind's `kind.toml`, its module resolved to a path."""

    name: str
    directory: Path
    description: str
    module: Path | None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    memory_mb: int | None = None
    replicate: float | None = None


@dataclass(frozen=True)
class Broken:
    """A kind directory that did not load, and why."""

    name: str
    directory: Path
    error: str


@dataclass
class RepoReport:
    """What loading a task repo found: the plugins that loaded, by kind, and what did not
    (`error` is a problem with the repo itself, e.g. a missing directory)."""

    path: Path | None = None
    plugins: dict[str, TaskPlugin[Any]] = field(default_factory=dict)
    broken: list[Broken] = field(default_factory=list)
    error: str | None = None


class _WithoutModule:
    """The parser `WasmPlugin.add_arguments` sees for a repo kind: everything but MODULE
    (the kind has its own), so the two commands keep the same flags."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._parser = parser

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action | None:
        if names == ("module",):
            return None
        return self._parser.add_argument(*names, **kwargs)

    def add_mutually_exclusive_group(self, **kwargs: Any) -> argparse._MutuallyExclusiveGroup:
        return self._parser.add_mutually_exclusive_group(**kwargs)


class WasmKind(WasmPlugin):
    """A repo kind: `submit wasm` with the module and defaults of a kind.toml (`spec`)."""

    module_path: Path

    def __init__(self, spec: KindSpec) -> None:
        if spec.module is None:
            raise ParamsError(f"{KIND_FILE} names no module")
        self.spec = spec
        self.module_path = spec.module

    def describe(self) -> str:
        return self.spec.description

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(cast(argparse.ArgumentParser, _WithoutModule(parser)))
        # kind.toml's values are the flags' defaults (ArgumentDefaultsHelpFormatter shows them)
        parser.set_defaults(run_timeout=self.spec.timeout_s, memory=self.spec.memory_mb)
        runs = " ".join([self.module_path.name, *self.spec.args])
        env = " ".join(f"{k}={v}" for k, v in self.spec.env.items())
        parser.epilog = (
            f"Runs `{runs}`{f' with {env}' if env else ''} from {self.spec.directory / KIND_FILE}:"
            " --arg replaces its arguments, --env adds to its environment."
        )

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        args.module = self.module_path
        raw = super().params_from_args(args)
        if not raw["args"]:
            del raw["args"]  # no --arg given: kind.toml's args
        return raw

    def prepare(self, raw: dict[str, Any], store_block: BlockSink | None = None) -> Prepared:
        """kind.toml's values under what the caller gave (the CLI's flags, or Python's
        keyword arguments); the module is always the kind's own."""
        given = raw.get("module")
        if given is not None and Path(str(given)).expanduser().resolve() != self.module_path.resolve():
            raise ParamsError(
                f"kind {self.kind!r} runs its own module ({self.module_path}); use `submit wasm` for another one"
            )
        merged = {**raw, "module": str(self.module_path)}
        if raw.get("args") is None:
            merged["args"] = list(self.spec.args)
        env = dict(self.spec.env)
        for item in raw.get("env") or []:
            key, sep, value = str(item).partition("=")
            if not sep or not key:
                raise ParamsError(f"bad {self.kind} parameters: env: expected KEY=VALUE, got {item!r}")
            env[key] = value
        merged["env"] = [f"{k}={v}" for k, v in env.items()]
        for key in ("timeout_s", "memory_mb"):
            if raw.get(key) is None:
                merged[key] = getattr(self.spec, key)
        return super().prepare(merged, store_block)

    def replication(self, params: WasmParams, requested: float | None, default: float) -> float:
        return super().replication(params, self.spec.replicate if requested is None else requested, default)


def read_kind_toml(directory: Path) -> KindSpec:
    """A kind directory's kind.toml, checked; ParamsError says what is wrong."""
    path = directory / KIND_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"no {KIND_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"cannot read {KIND_FILE}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ParamsError(f"{KIND_FILE} is not valid TOML: {exc}") from None
    try:
        toml = KindToml.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(f"{KIND_FILE}: {validation.describe(exc, root=KIND_FILE)}") from None
    for key in toml.env:
        if not key or "=" in key:
            raise ParamsError(f"{KIND_FILE}: env: a variable's name may not be empty or hold '=': {key!r}")
    return KindSpec(
        name=directory.name,
        directory=directory,
        description=toml.description,
        module=(directory / toml.module).resolve() if toml.module else None,
        args=tuple(toml.args),
        env=dict(toml.env),
        timeout_s=toml.timeout_s,
        memory_mb=toml.memory_mb,
        replicate=toml.replicate,
    )


def _check_module(spec: KindSpec) -> None:
    """ParamsError unless the kind's module is there and would run (shared.wasm_module)."""
    if spec.module is None:
        return
    if not spec.module.is_file():
        raise ParamsError(f"module {spec.module} is not there")
    inspect(read_module(spec.module), name=spec.module.name)


def _plugin_class(spec: KindSpec, path: Path) -> type[TaskPlugin[Any]]:
    """The one concrete TaskPlugin subclass that plugin.py defines (its code runs here)."""
    name = f"processdistro_task_repo.{spec.name.replace('-', '_')}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ParamsError(f"cannot import {PLUGIN_FILE}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # user code: whatever it raises is this kind's error, not ours
        sys.modules.pop(name, None)
        raise ParamsError(f"{PLUGIN_FILE} raised on import: {type(exc).__name__}: {exc}") from None
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, TaskPlugin)
        and obj.__module__ == name
        and not pyinspect.isabstract(obj)
    ]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(c.__name__ for c in found)})"
        raise ParamsError(f"{PLUGIN_FILE} defines {what} concrete TaskPlugin subclasses; expected one")
    return found[0]


def load_kind(directory: Path) -> TaskPlugin[Any]:
    """The plugin of one kind directory; ParamsError says why it cannot be loaded."""
    spec = read_kind_toml(directory)
    plugin_py = directory / PLUGIN_FILE
    if not plugin_py.is_file():
        if spec.module is None:
            raise ParamsError(f"{KIND_FILE} names no module (and there is no {PLUGIN_FILE})")
        _check_module(spec)
        kind_class: type[WasmKind] = type(f"Kind_{spec.name}", (WasmKind,), {"kind": spec.name})
        return kind_class(spec)
    _check_module(spec)
    cls = _plugin_class(spec, plugin_py)
    declared = vars(cls).get("kind")
    if declared is not None and declared != spec.name:
        raise ParamsError(f"{PLUGIN_FILE}'s plugin says kind {declared!r}; a repo kind is named by its directory")
    cls.kind = spec.name
    try:
        if issubclass(cls, WasmKind):
            return cls(spec)
        plugin = cls()
    except Exception as exc:  # user code again
        raise ParamsError(f"{PLUGIN_FILE}'s {cls.__name__}() raised: {type(exc).__name__}: {exc}") from None
    if getattr(type(plugin).describe, "__module__", None) != cls.__module__:
        # kind.toml's description, unless plugin.py itself says another (not one inherited)
        plugin.describe = lambda: spec.description  # type: ignore[method-assign]
    return plugin


def scan(path: Path, taken: Collection[str] = ()) -> RepoReport:
    """Load every kind under `path` (a directory per kind, in name order); a kind named as
    one in `taken` (the built-ins) is broken. Nothing is registered here."""
    report = RepoReport(path=path)
    if not path.is_dir():
        report.error = f"task repo {path} is not a directory"
        return report
    for directory in sorted(p for p in path.iterdir() if p.is_dir()):
        name = directory.name
        if name.startswith(".") or name in _SKIP:
            continue
        try:
            if not KIND_NAME.match(name):
                raise ParamsError("a kind's name is lowercase letters, digits, '-' and '_' (at most 64)")
            if name in taken:
                raise ParamsError("the name of a built-in kind: rename the directory")
            report.plugins[name] = load_kind(directory)
        except ParamsError as exc:
            report.broken.append(Broken(name, directory, str(exc)))
    return report


__all__ = ["Broken", "KindSpec", "KindToml", "RepoReport", "WasmKind", "load_kind", "read_kind_toml", "scan"]
