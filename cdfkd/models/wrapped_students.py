"""Multi-header students on torchvision and user backbones (``WrappedClassifier``).

Both families need the backbone cut after a stage: a *trunk* that runs the model up to
there, and (``branch``) a *tail* that runs the rest. Such a model's forward is its own
code, so the cut is found, not assumed: the trunk is an ``nn.Sequential`` of the
shallowest modules that run entirely before the cut (in call order; :func:`split_modules`),
and a tail is a fresh build of the model with those modules replaced by ``nn.Identity``,
so its own forward (train/eval behaviour intact) starts from the cut map. A probe checks
``tail(trunk(x)) == model(x)`` (``branch``) or ``trunk(x) == the stage map`` (``mfs``);
a model whose forward does work between those modules (a ViT patchifies and adds its
class token in its own forward) is refused with the alternatives.

* ``branch``: stages ``[0, share_until)`` shared; each header owns a fresh build of the
  rest of the model. ``header_width`` must be 1: a published architecture has no width
  knob cdfkd could turn generically.
* ``mfs``: the trunk runs every stage; each header is a chain of ``MFSHeader`` encoders
  (``cdfkd.models.multihead``) over stages ``fuse_from..``, whose width scales.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn

from cdfkd.models.base import init_weights
from cdfkd.models.multihead import MFSHeader, MultiHeadStudent
from cdfkd.models.taps import Capture, Tap, as_map
from cdfkd.models.tracing import eval_mode
from cdfkd.models.wrapped import ModelCheckError, WrappedClassifier, probe_input


def _call_spans(model: nn.Module, x: torch.Tensor) -> dict[str, list]:
    """Per submodule name, the (start, end) event indices of each of its calls in one forward."""
    spans: dict[str, list] = {}
    clock = [0]
    handles = []

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    for name, m in model.named_modules():
        if not name:
            continue

        def pre(module, args, name=name):
            spans.setdefault(name, []).append([tick(), None])

        def post(module, args, output, name=name):
            spans[name][-1][1] = tick()

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return spans


def split_modules(model: nn.Module, cut: Tap, x: torch.Tensor, what: str) -> list[str]:
    """The shallowest modules (dotted names, in call order) that run entirely up to the end
    of the ``cut`` tap's module call: the trunk that computes the cut map."""
    spans = _call_spans(model, x)
    calls = spans.get(cut.module)
    if not calls:
        raise ModelCheckError(f"{what}: stage {cut.module!r} does not run in its forward")
    end = calls[cut.call][1]
    chosen: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        children = [(f"{prefix}{n}", c) for n, c in parent.named_children()]
        called = sorted((spans[n][0][0], n, c) for n, c in children if n in spans)
        for _, name, child in called:
            first, last = spans[name][0][0], spans[name][-1][1]
            if last <= end:
                chosen.append(name)
            elif first < end:  # runs across the cut: split it further
                if not list(child.named_children()):
                    raise ModelCheckError(
                        f"{what} cannot be cut after stage {cut.module!r}: module {name!r} runs "
                        "both before and after it"
                    )
                visit(child, f"{name}.")

    visit(model, "")
    return chosen


def _identity_out(model: nn.Module, names: list[str]) -> nn.Module:
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Identity())
    return model


def _trunk_path(stage: str, chosen: list[str], what: str) -> str:
    """The path of ``stage`` inside ``nn.Sequential(*chosen)``."""
    for i, name in enumerate(chosen):
        if stage == name or stage.startswith(name + "."):
            return f"{i}{stage[len(name) :]}"
    raise ModelCheckError(f"{what}: stage {stage!r} is not computed by the shared trunk {chosen}")


def _mismatch(run: Callable[[], torch.Tensor], want: torch.Tensor) -> str | None:
    """Why ``run()`` (the split model, eval mode) does not give ``want``; None if it does."""
    try:
        with torch.no_grad():
            got = run()
    except Exception as err:
        return f"the split model fails: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if got.shape != want.shape:
        return f"the split model gives {tuple(got.shape)}, not {tuple(want.shape)}"
    if got.device.type == "meta":  # a structure probe: shapes are all there is to compare
        return None
    diff = (got - want).abs().max().item()
    return (
        f"the split model differs by {diff:.2e}" if diff > 1e-4 * (1 + want.abs().max()) else None
    )


class _Trunk(nn.Module):
    """``nn.Sequential`` of the shared modules, reading the shared stage maps on the way."""

    def __init__(self, modules: list[nn.Module], taps: list[Tap]) -> None:
        super().__init__()
        self.body = nn.Sequential(*modules)
        self.taps = list(taps)

    def forward(self, x: torch.Tensor, return_maps: bool = False):
        if not return_maps:
            return self.body(x), []
        with Capture(self.body, self.taps) as capture:
            out = self.body(x)
        return out, [as_map(v, t.layout) for v, t in zip(capture.values(), self.taps, strict=True)]


def _trunk(body: WrappedClassifier, upto: int, x: torch.Tensor, what: str):
    """(trunk over stages [0, upto), the names of its modules in ``body.model``)."""
    plan = body.plan
    chosen = split_modules(body.model, plan.stages[upto - 1], x, what)
    taps = [
        Tap(_trunk_path(t.module, chosen, what), t.call, layout=t.layout)
        for t in plan.stages[:upto]
    ]
    trunk = _Trunk([body.model.get_submodule(n) for n in chosen], taps)
    return trunk, chosen


def _run_split(trunk: _Trunk, tail: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return tail(trunk(x)[0])


class WrappedBranchStudent(MultiHeadStudent):
    """Shared trunk (stages ``[0, share_until)``) + H private tails of the same backbone.

    ``forward(x)`` -> (H, B, C); features: per header the shared maps, then its own.
    """

    def __init__(
        self, build: Callable[[], WrappedClassifier], headers: int, share_until: int
    ) -> None:
        super().__init__()
        body = build()
        what = f"{body.arch} (branch, share_until={share_until})"
        x = probe_input(body.model, body.plan.in_channels, body.plan.image_size)
        with eval_mode(body.model), torch.no_grad():
            want = body.model(x)
        trunk, chosen = _trunk(body, share_until, x, what)
        private = range(share_until, len(body.plan.stages))
        tails = []
        for h in range(headers):
            # Header 0 takes the probed body's own tail, so the cut is checked on its weights.
            model = copy.deepcopy(body.model) if h == 0 else build().model
            tail = WrappedClassifier(
                _identity_out(model, chosen), body.num_classes, body.plan.select(private), body.arch
            )
            if h == 0:
                with eval_mode(trunk), eval_mode(tail):
                    why = _mismatch(functools.partial(_run_split, trunk, tail, x), want)
                if why is not None:
                    raise ModelCheckError(
                        f"{what}: its forward does work between the modules before and after "
                        f"stage {body.stage_names[share_until - 1]!r} ({why}), so it cannot be "
                        "split there; use another share_until, a single-header student (no family) or a "
                        "zoo backbone"
                    )
            tails.append(tail)
        self.trunk = trunk
        self.heads = nn.ModuleList(tails)
        self.feature_dim = body.feature_dim
        self.num_classes = body.num_classes

    def forward(self, x: torch.Tensor, return_features: bool = False):
        x, shared = self.trunk(x, return_maps=return_features)
        if not return_features:
            return torch.stack([head(x) for head in self.heads])
        outs = [tuple(head(x, return_features=True)) for head in self.heads]
        return self._output(outs, shared, return_features)


class WrappedMFSStudent(MultiHeadStudent):
    """The backbone up to its last stage as the shared trunk + H ``MFSHeader``s over
    stages ``fuse_from..``; the backbone's own pooling and classifier are dropped."""

    def __init__(self, body: WrappedClassifier, headers: int, fuse_from: int, width: float):
        super().__init__()
        plan = body.plan
        what = f"{body.arch} (mfs)"
        x = probe_input(body.model, body.plan.in_channels, body.plan.image_size)
        with eval_mode(body.model), torch.no_grad():
            want = body(x, return_features=True).stages[-1]
        self.trunk, _ = _trunk(body, len(plan.stages), x, what)
        trunk = self.trunk
        with eval_mode(trunk):
            why = _mismatch(lambda: trunk(x, return_maps=True)[1][-1], want)
        if why is not None:
            raise ModelCheckError(
                f"{what}: its forward does work between the modules up to stage "
                f"{body.stage_names[-1]!r} ({why}), so no trunk of whole modules computes it; "
                "name other stages, use a single-header student (no family) or a zoo backbone"
            )
        self.fuse_from = fuse_from
        channels = [shape[0] for shape in plan.stage_shapes][fuse_from:]
        self.heads = nn.ModuleList(
            MFSHeader(channels, body.num_classes, width) for _ in range(headers)
        )
        init_weights(self.heads)
        self.feature_dim = self.heads[0].feature_dim
        self.num_classes = body.num_classes

    def forward(self, x: torch.Tensor, return_features: bool = False):
        _, maps = self.trunk(x, return_maps=True)
        outs = [head(maps[self.fuse_from :]) for head in self.heads]
        return self._output(outs, None, return_features)
