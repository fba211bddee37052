"""What every subcommand module shares: the registration decorator and small printing helpers."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it
COMMANDS: list[Callable[[Subparsers], None]] = []


def command(add: Callable[[Subparsers], None]) -> Callable[[Subparsers], None]:
    """Register a function that adds one subcommand to the top-level parser."""
    COMMANDS.append(add)
    return add


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )


def setup_device(args: argparse.Namespace):
    import torch

    from cdfkd.device import resolve_device

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    return resolve_device(args.device)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
