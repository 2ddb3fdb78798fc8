"""`python -m bench [--quick] [--only NAME] [--list]`: run the benchmarks, print a table per
benchmark, write `bench/results/<name>.json`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback

from rich.console import Console
from rich.table import Table as RichTable

from . import RESULTS_DIR, Report, discover, machine


def render(console: Console, report: Report) -> None:
    for table in report.tables:
        rt = RichTable(title=f"{report.title}: {table.title}", title_justify="left")
        for i, column in enumerate(table.columns):
            rt.add_column(column, justify="left" if i == 0 else "right")
        for row in table.rows:
            rt.add_row(*(_cell(v) for v in row))
        console.print(rt)
    for note in report.notes:
        console.print(f"  - {note}")


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    available = discover()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run (results in <name>.quick.json)")
    p.add_argument("--only", action="append", choices=sorted(available), metavar="NAME", help="run only this benchmark")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or logged: room for the wide tables
        console = Console(width=132)
    if args.list:
        for name, module in available.items():
            console.print(f"{name}: {(module.__doc__ or '').strip().splitlines()[0]}")
        return 0
    selected = args.only or list(available)
    info = machine()
    console.print(f"[bold]benchmarks[/] {', '.join(selected)} on {info['nproc']} x {info['cpu_model']}")
    command = shlex.join([sys.executable, "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    RESULTS_DIR.mkdir(exist_ok=True)
    failed = []
    for name in selected:
        console.rule(name)
        started = time.monotonic()
        try:
            report: Report = available[name].run(quick=args.quick, console=console)
        except Exception:
            console.print(f"[red]{name} failed[/]\n{traceback.format_exc()}")
            failed.append(name)
            continue
        render(console, report)
        out = RESULTS_DIR / f"{name}{'.quick' if args.quick else ''}.json"
        out.write_text(json.dumps(report.to_json(quick=args.quick, command=command), indent=2) + "\n")
        console.print(f"{name}: {time.monotonic() - started:.0f}s, results in {out}")
    if failed:
        console.print(f"[red]failed:[/] {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
