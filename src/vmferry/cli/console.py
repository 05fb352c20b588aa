"""The consoles every ``ferry`` command prints to, and how a command fails."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

from vmferry.errors import FerryError

out = Console()
err = Console(stderr=True)


def fail(exc: FerryError) -> NoReturn:
    """Print the error with its field and fix on stderr and exit with status 1."""
    err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    if exc.field:
        err.print(f"  field: {exc.field}", highlight=False)
    if exc.fix:
        err.print(f"  fix:   {exc.fix}", highlight=False)
    raise typer.Exit(1)
