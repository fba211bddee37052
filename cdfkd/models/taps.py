"""Taps: read a module's intermediate maps during its own forward, with scoped hooks.

A model that is not a zoo ``StagedClassifier`` (a torchvision network, a user's module)
exposes its stage maps and its embedding through *taps*: "the output (or the input) of
submodule ``name``, at its ``call``-th call in a forward". :class:`Capture` puts one hook
on each tapped submodule for one forward only, so

* the tapped forward is the model's own forward: train/eval behaviour, BatchNorm
  statistics and autograd are exactly those of ``model(x)``, at no extra cost;
* nothing is stored on the model: ``deepcopy``, ``state_dict``, ``load_state_dict(assign=
  True)``, ``.to()`` and ``torch.func.functional_call`` see a plain module, and
  ``TeacherEnsemble``'s fused path, which refuses modules that carry hooks, stays open.

Stage maps are returned as (B, C, H, W) whatever layout the module uses: Swin keeps
(B, H, W, C) maps (``layout="nhwc"``), ViT encoder layers emit (B, 1 + h*w, D) tokens
(``layout="tokens"``: class token dropped, tokens laid out on their h x w grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Layout = Literal["nchw", "nhwc", "tokens"]
LAYOUTS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class Tap:
    """Where one tensor is read: submodule ``module`` (dotted path, as in ``named_modules``).

    ``call``: which call of that submodule in one forward (0 = the first, -1 = the last; a
    module may run several times, e.g. a shared ReLU). ``read_input``: its first input
    instead of its output (the classifier's input is the embedding). ``layout``: how the
    tensor holds a map (see the module docstring).
    """

    module: str
    call: int = -1
    read_input: bool = False
    layout: Layout = "nchw"

    def to_json(self) -> dict:
        return {"module": self.module, "call": self.call, "layout": self.layout}


def as_map(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A tapped tensor as a (B, C, H, W) map."""
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    if layout == "tokens":
        b, n, d = t.shape
        side = math.isqrt(n - 1)
        return t[:, 1:].transpose(1, 2).reshape(b, d, side, side)
    return t


class Capture:
    """Hooks on ``root``'s submodules for the taps, for the length of a ``with`` block.

    ``values()`` returns the tapped tensors in tap order (raw, as the module produced
    them). A tap whose submodule did not run raises ``RuntimeError`` naming it.
    """

    def __init__(self, root: nn.Module, taps: list[Tap] | tuple[Tap, ...]) -> None:
        self.root = root
        self.taps = list(taps)
        self._seen: list[list[torch.Tensor]] = [[] for _ in self.taps]
        self._handles: list = []

    def __enter__(self) -> Capture:
        for i, tap in enumerate(self.taps):
            module = self.root.get_submodule(tap.module)
            if tap.read_input:
                hook = module.register_forward_pre_hook(self._keep_input(i))
            else:
                hook = module.register_forward_hook(self._keep_output(i))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep_input(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._seen[i].append(args[0])

        return hook

    def _keep_output(self, i: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            self._seen[i].append(output)

        return hook

    def values(self) -> list[torch.Tensor]:
        out = []
        for tap, seen in zip(self.taps, self._seen, strict=True):
            if not seen or not (-len(seen) <= tap.call < len(seen)):
                raise RuntimeError(
                    f"{tap.module!r} ran {len(seen)} time(s) in this forward, so call "
                    f"{tap.call} of it cannot be read; name stages the forward runs"
                )
            out.append(seen[tap.call])
        return out
