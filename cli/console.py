"""The CLI's two consoles (results on stdout, errors on stderr), `literal` for text the CLI
did not write itself, and the parser type the command modules add their subcommands to."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeAlias

from rich.console import Console
from rich.text import Text

from .shared.logs import escape_control

# the top-level parser's `add_subparsers()`: each command module adds its commands to it
# (generic only in the type stubs, so subscripted only for the type checker)
if TYPE_CHECKING:
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = argparse._SubParsersAction

# soft_wrap: links and paths stay on one line, so they can be copied whole
console = Console(stderr=False, soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def literal(value: object, style: str = "") -> Text:
    """Text a node (or anyone but this CLI) wrote, shown exactly as written: never read as
    rich markup (`[bold red]x[/]` and a stray `[/]` print as they are, with no MarkupError),
    and control characters written as escapes (`\\x1b[31m` cannot colour or move the
    operator's terminal; issue 9.8)."""
    return Text(escape_control(value if isinstance(value, str) else str(value)), style=style)
