"""The CLI builds `submit <kind>` from the registered task plugins: the built-in kinds keep
their flags, a kind registered in-process gets its subcommand with no edit of the CLI, and
an unknown kind is refused."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processdistro import client
from processdistro.main import build_parser, main
from processdistro.shared import keys
from processdistro.shared.exceptions import ParamsError
from processdistro.shared.messages import Submit, parse_command
from processdistro.shared.store.connection import Client
from processdistro.shared.tasks import PLUGINS, JobFiles, Subtask, TaskPlugin, Verdict, register, unregister
from processdistro.shared.tasks.crack import CrackPlugin
from processdistro.submit import cmd_submit, main_output
from pydantic import BaseModel, ConfigDict, Field

BUILT_IN = ("mandelbrot", "matmul", "hash", "crack")


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# ------------------------------------------------------------------ the built-in kinds


@pytest.mark.parametrize(
    ("argv", "params", "outputs"),
    [
        pytest.param(
            ["submit", "mandelbrot"],
            {"width": 1024, "height": 1024, "xmin": -2.0, "xmax": 1.0, "ymin": -1.5, "ymax": 1.5}
            | {"max_iter": 500, "tile": 128},
            {"image": None, "raw": None},
            id="mandelbrot-defaults",
        ),
        pytest.param(
            [
                "submit",
                "mandelbrot",
                "--width",
                "64",
                "--max-iter",
                "9",
                "--xmin",
                "-1",
                "-o",
                "m.png",
                "--raw",
                "m.npy",
            ],
            {"width": 64, "height": 1024, "xmin": -1.0, "xmax": 1.0, "ymin": -1.5, "ymax": 1.5}
            | {"max_iter": 9, "tile": 128},
            {"image": Path("m.png"), "raw": Path("m.npy")},
            id="mandelbrot-flags",
        ),
        pytest.param(
            ["submit", "matmul", "--a", "A.npy", "--b", "B.npy"],
            {"a": "A.npy", "b": "B.npy", "tile": 256},
            {"c": None},
            id="matmul-defaults",
        ),
        pytest.param(
            ["submit", "matmul", "--a", "A.npy", "--b", "B.npy", "--tile", "64", "-o", "C.npy"],
            {"a": "A.npy", "b": "B.npy", "tile": 64},
            {"c": Path("C.npy")},
            id="matmul-flags",
        ),
        pytest.param(
            ["submit", "hash", "--input", "rows.csv"],
            {"input": "rows.csv", "iterations": 100_000, "dklen": 32, "batch": None},
            {"csv": None},
            id="hash-defaults",
        ),
        pytest.param(
            ["submit", "hash", "--input", "rows.csv", "--iterations", "5", "--dklen", "16", "--batch", "7", "-o", "o"],
            {"input": "rows.csv", "iterations": 5, "dklen": 16, "batch": 7},
            {"csv": Path("o")},
            id="hash-flags",
        ),
        pytest.param(
            ["submit", "crack", "--target", "ab", "--salt", "s", "--wordlist", "w.txt"],
            {"target": "ab", "salt": "s", "iterations": 100_000, "wordlist": "w.txt", "chunk": None},
            {"json": None},
            id="crack-defaults",
        ),
        pytest.param(
            ["submit", "crack", "--target", "ab", "--salt", "s", "--wordlist", "w.txt", "--chunk", "99", "-o", "r"],
            {"target": "ab", "salt": "s", "iterations": 100_000, "wordlist": "w.txt", "chunk": 99},
            {"json": Path("r")},
            id="crack-flags",
        ),
    ],
)
def test_built_in_kinds_parse_to_params(argv: list[str], params: dict[str, Any], outputs: dict[str, Any]) -> None:
    args = parse(*argv)
    plugin = PLUGINS[args.kind]
    assert args.func is cmd_submit
    assert plugin.params_from_args(args) == params
    assert plugin.outputs_from_args(args) == outputs
    # the flags every job has, with their defaults
    assert (args.priority, args.replicate, args.wait, args.timeout, args.quiet) == (0, None, False, None, False)


def test_job_flags_apply_to_every_kind() -> None:
    args = parse("submit", "mandelbrot", "--priority", "3", "--replicate", "0.5", "--wait", "--timeout", "9", "-q")
    assert (args.priority, args.replicate, args.wait, args.timeout, args.quiet) == (3, 0.5, True, 9.0, True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["submit", "matmul", "--a", "A.npy"], "the following arguments are required: --b", id="required"),
        pytest.param(["submit", "mandelbrot", "--width", "wide"], "invalid int value: 'wide'", id="bad-int"),
        pytest.param(["submit", "mandelbrot", "--replicate", "1.5"], "expected a number from 0 to 1", id="share"),
    ],
)
def test_bad_flags_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "outputs", "role"),
    [
        pytest.param("mandelbrot", {"raw": "c.npy", "image": "m.png"}, "image", id="mandelbrot-image"),
        pytest.param("matmul", {"c": "C.npy"}, "c", id="matmul-first"),
        pytest.param("vanished-kind", {"json": "r.json"}, "json", id="unknown-kind-first"),
    ],
)
def test_result_copies_the_main_output(kind: str, outputs: dict[str, str], role: str) -> None:
    assert main_output(kind, outputs) == role


@pytest.mark.parametrize(
    ("summary", "lines"),
    [
        pytest.param(
            {"found": True, "password": "[red]x", "candidates_hashed": 12, "hashed_after_hit": 2},
            ["password found: [red]x", "12 candidates hashed, 2 of them after the hit"],
            id="found",
        ),
        pytest.param(
            {"found": False, "password": None, "candidates_hashed": 40, "hashed_after_hit": 0},
            ["not found: no word of the list matches", "40 candidates hashed, 0 of them after the hit"],
            id="not-found",
        ),
    ],
)
def test_crack_summary(summary: dict[str, Any], lines: list[str], tmp_path: Path) -> None:
    (tmp_path / "crack.json").write_text(json.dumps(summary))
    assert CrackPlugin().summary({"json": str(tmp_path / "crack.json")}) == lines


# ------------------------------------------------------------------ a kind the CLI never heard of


class EchoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    times: int = Field(default=1, ge=1)


class EchoPlugin(TaskPlugin[EchoParams]):
    """Repeat a text (a test kind)."""

    kind = "echo"
    module = "mandelbrot"
    params_model = EchoParams

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--text", required=True, help="what to repeat")
        parser.add_argument("--times", type=int, default=1, help="how many subtasks")

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"text": args.text, "times": args.times}

    def count(self, params: EchoParams) -> int:
        return params.times

    def split(self, params: EchoParams, start: int = 0) -> Iterator[Subtask]:
        for _ in range(start, params.times):
            yield Subtask(params.text.encode())

    def verify(self, params: EchoParams, index: int, task_input: bytes, output: bytes, rng: random.Random) -> Verdict:
        return Verdict.ACCEPT if output == task_input else Verdict.REJECT

    def merge(self, files: JobFiles, params: EchoParams, index: int, output: bytes) -> None:
        pass

    def finalize(self, files: JobFiles, params: EchoParams) -> dict[str, str]:
        return {}


@pytest.fixture
def echo() -> Iterator[EchoPlugin]:
    plugin = EchoPlugin()
    register(plugin)
    try:
        yield plugin
    finally:
        unregister(plugin.kind)


def test_a_registered_kind_is_listed_under_submit(echo: EchoPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("submit", "--help")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for kind in (*BUILT_IN, "echo"):
        assert kind in out
    assert "Repeat a text (a test kind)." in out  # describe(): the docstring's first line


def test_a_registered_kind_has_its_own_flags(echo: EchoPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("submit", "echo", "--help")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--text TEXT" in out and "what to repeat" in out
    assert "how many subtasks (default: 1)" in out
    assert "--priority" in out and "--wait" in out  # and the flags every job has
    args = parse("submit", "echo", "--text", "hi", "--times", "3", "--priority", "2")
    assert args.func is cmd_submit
    assert echo.params_from_args(args) == {"text": "hi", "times": 3}
    assert args.priority == 2


def test_a_registered_kind_is_submitted(echo: EchoPlugin, redis_url: str, r: Client) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--redis-url", redis_url, "submit", "echo", "--text", "hi", "--times", "3", "--priority", "2"])
    assert exit_.value.code == 0
    [(_id, fields)] = r.xrange(keys.COMMANDS)
    raw = json.loads(fields[b"command"])
    assert "replicate" not in raw  # unset: the scheduler's default share
    command = parse_command(fields[b"command"])
    assert isinstance(command, Submit)
    assert (command.kind, command.params, command.priority) == ("echo", {"text": "hi", "times": 3}, 2)


def test_a_registered_kind_is_validated_before_it_is_sent(echo: EchoPlugin, r: Client) -> None:
    with pytest.raises(ParamsError, match=r"bad echo parameters: times: Input should be greater than or equal to 1"):
        client.submit(r, "echo", {"text": "hi", "times": 0})
    assert r.xlen(keys.COMMANDS) == 0


def test_a_kind_is_registered_once(echo: EchoPlugin) -> None:
    with pytest.raises(ValueError, match="'echo' is registered already"):
        register(EchoPlugin())


def test_an_unknown_kind_is_refused(capsys: pytest.CaptureFixture[str], r: Client) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["submit", "nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err
    for kind in BUILT_IN:
        assert kind in err
    with pytest.raises(ParamsError, match=r"unknown task kind 'nope'; known: crack, hash, mandelbrot, matmul"):
        client.submit(r, "nope", {})
    assert r.xlen(keys.COMMANDS) == 0
