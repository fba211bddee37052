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


def add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="MODULE",
        help="import and run the model builders of MODULE (and its submodules) that an "
        "`arch: package.module:function` names (repeatable); nothing else runs such code",
    )


def apply_trust(args: argparse.Namespace, *archs: str | None) -> None:
    """Trust the ``--trust`` modules, and the modules of ``archs`` given on this command line."""
    from cdfkd.models import is_user_arch, trust_modules

    named = [a.partition(":")[0] for a in archs if a and is_user_arch(a)]
    trust_modules(*getattr(args, "trust", []), *named)


def add_model_kwargs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-kwargs",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="arguments for the model builder, values read as YAML (width=8 dropout=0.1)",
    )
    p.add_argument(
        "--stages",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="torchvision/user archs: modules whose outputs are the stage maps (default: found "
        "automatically)",
    )


def model_kwargs(args: argparse.Namespace) -> dict:
    """``--model-kwargs`` and ``--stages`` as ``create_model`` keyword arguments."""
    import yaml

    from cdfkd.errors import ConfigError

    out: dict = {}
    for item in args.model_kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-kwargs {item!r} is not KEY=VALUE (example: width=8)")
        out[key.strip()] = yaml.safe_load(value)
    if args.stages:
        out["stages"] = list(args.stages)
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
