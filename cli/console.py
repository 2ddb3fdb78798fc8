"""The CLI's two consoles (results on stdout, errors on stderr) and the parser type the
command modules add their subcommands to."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeAlias

from rich.console import Console

# the top-level parser's `add_subparsers()`: each command module adds its commands to it
# (generic only in the type stubs, so subscripted only for the type checker)
if TYPE_CHECKING:
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = argparse._SubParsersAction

# soft_wrap: links and paths stay on one line, so they can be copied whole
console = Console(stderr=False, soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
