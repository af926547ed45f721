"""`diffmpm info`: versions, Warp devices and whether CUDA is usable."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from .common import JsonFlag, handle_errors, out, print_json

EPILOG = """[bold]Examples[/]

  diffmpm info

  diffmpm info --json
"""


def collect_info() -> dict:
    """The versions a run's summary records (provenance.versions), Warp's devices and CUDA availability."""
    import torch

    from ..provenance import versions
    from ..warp_runtime import INIT_MESSAGES, warp

    wp = warp()
    return {
        **versions(),
        "warp_devices": [d.alias for d in wp.get_devices()],
        "torch_cuda": torch.cuda.is_available(),
        "warp_cuda": wp.is_cuda_available(),
        "cuda_usable": bool(torch.cuda.is_available() and wp.is_cuda_available()),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "warp_notices": list(INIT_MESSAGES),
    }


@handle_errors
def info(as_json: JsonFlag = False) -> None:
    """Show versions, Warp devices and whether CUDA is usable."""
    data = collect_info()
    if as_json:
        print_json(data, indent=2)
        return
    table = Table(show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    for key in ("diffmpm", "python", "torch", "warp"):
        table.add_row(key, data[key])
    table.add_row("warp devices", ", ".join(data["warp_devices"]))
    table.add_row("CUDA usable", escape("yes: " + ", ".join(data["cuda_devices"])) if data["cuda_usable"] else "no")
    for notice in data["warp_notices"]:
        table.add_row("warp notice", escape(notice))  # library text: brackets in it are not markup
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("info", epilog=EPILOG)(info)
