"""Issue 11, goal 5: what `up` and the services import to start, and how `main` picks its
parser. The heavy libraries (numpy, wasmtime, Pillow) wait for first use; the commands that
`build_parser` defines itself parse the same with or without the job commands' parsers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from processdistro.main import CORE, _command, _needs_full_parser, build_parser

HEAVY = ("numpy", "wasmtime", "PIL")


def loaded_after(code: str) -> set[str]:
    """The top-level packages of HEAVY (and the CLI's job command modules) that a fresh
    interpreter has imported after running `code`."""
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in "
        f"{HEAVY!r} or n in ('processdistro.submit', 'processdistro.show', 'processdistro.top'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return {name.split(".")[0] if name.split(".")[0] in HEAVY else name for name in json.loads(out.stdout)}


@pytest.mark.parametrize(
    ("code", "allowed"),
    [
        pytest.param("import processdistro.main", set(), id="the-cli-entry"),
        pytest.param(
            "import processdistro.main, processdistro.up, processdistro.launch as l; l.preload()",
            set(),
            id="up-before-it-forks-the-services",
        ),
        pytest.param("import processdistro.scheduler.service", set(), id="scheduler"),
        pytest.param("import processdistro.gateway.app", {"PIL"}, id="gateway-pillow-through-qrcode"),
        pytest.param("import processdistro.shared.tasks", set(), id="task-plugins"),
    ],
)
def test_starting_does_not_import_what_waits_for_first_use(code: str, allowed: set[str]) -> None:
    assert loaded_after(code) - allowed == set()


def test_a_lazy_module_is_imported_on_first_attribute_read() -> None:
    code = (
        "from processdistro.shared.lazy import lazy\n"
        "import sys\n"
        "m = lazy('colorsys')\n"
        "before = 'colorsys' in sys.modules\n"
        "import colorsys\n"  # what the stand-in must give: the module's own attribute
        "print(before, m.rgb_to_hsv is colorsys.rgb_to_hsv)"
    )
    isolated = "import sys; sys.modules.pop('colorsys', None)\n" + code
    out = subprocess.run([sys.executable, "-c", isolated], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize(
    ("argv", "full"),
    [
        pytest.param(["up"], False, id="up"),
        pytest.param(["--home", "/tmp/x", "up", "--port", "1"], False, id="up-after-a-global-option"),
        pytest.param(["up", "--help"], False, id="up-help-is-ups-own"),
        pytest.param(["-h", "up"], True, id="help-before-the-command-lists-all"),
        pytest.param(["--help"], True, id="help"),
        pytest.param([], True, id="no-command"),
        pytest.param(["gateway"], False, id="gateway"),
        pytest.param(["worker", "http://h/agent?code=x"], False, id="worker"),
        pytest.param(["jobs"], True, id="jobs"),
        pytest.param(["submit", "mandelbrot", "-o", "m.png"], True, id="submit"),
        pytest.param(["upp"], True, id="unknown-command-lists-all"),
    ],
)
def test_which_parser_main_builds(argv: list[str], full: bool) -> None:
    assert _needs_full_parser(argv, _command(argv)) is full


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", CORE)
def test_a_core_command_parses_the_same_without_the_job_commands(command: str) -> None:
    light, whole = _subcommands(build_parser(full=False)), _subcommands(build_parser(full=True))
    assert set(light) == set(CORE) and set(CORE) < set(whole)
    assert light[command].format_help() == whole[command].format_help()
