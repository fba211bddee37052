"""Any classifier module behind the zoo's interface: ``WrappedClassifier``.

Methods read a model through three things: ``forward(x)`` -> logits (B, C),
``forward(x, return_features=True)`` -> ``FeatureOutput(logits, stages, embedding)`` and
the attributes ``num_classes``/``feature_dim``. A torchvision network or a user's module
gets them from a :class:`FeaturePlan`, found once per arch by :func:`plan_features` with
eval-mode probe forwards on zeros:

* **stages**: taps on the modules the automatic rule picks (``cdfkd.models.tracing``),
  or on the modules the config names (``stages: [layer2, layer3, layer4]``);
* **embedding**: the input of the last ``nn.Linear`` the forward calls, read before a
  Dropout that directly feeds it (the train-mode input would be the dropped-out one);
  a model without a Linear (SqueezeNet) gets its last stage, globally average-pooled.

The same probe refuses what cannot work, each with its fix: an input size the module
cannot take, logits of the wrong shape for the dataset's classes, stage names that are
not modules or give no map. The wrapped module keeps its own ``state_dict`` keys under
``model.`` and its own forward; features are read with scoped hooks (``taps.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cdfkd.models.base import FeatureOutput, bn_layers
from cdfkd.models.taps import Capture, Layout, Tap, as_map
from cdfkd.models.tracing import auto_stages, eval_mode

Shape = tuple[int, ...]


class ModelCheckError(ValueError):
    """A module that cannot serve as a cdfkd model; the message names the fix."""


@dataclass(frozen=True)
class FeaturePlan:
    """Where a wrapped model's features are read, and what they look like.

    ``stages``: one tap per stage, shallow to deep; ``stage_shapes``: (C, H, W) of each
    for inputs of ``in_channels`` x ``image_size`` x ``image_size``; ``embedding``: the tap
    of the (B, D) embedding, None when it is the last stage pooled; ``feature_dim``: D.
    """

    in_channels: int
    image_size: int
    stages: tuple[Tap, ...]
    stage_shapes: tuple[Shape, ...]
    embedding: Tap | None
    feature_dim: int

    def select(self, indices: Sequence[int], rename: Callable[[str], str] = str) -> FeaturePlan:
        """The plan of stages ``indices`` only, their modules renamed by ``rename``."""
        return dataclasses.replace(
            self,
            stages=tuple(
                dataclasses.replace(self.stages[i], module=rename(self.stages[i].module))
                for i in indices
            ),
            stage_shapes=tuple(self.stage_shapes[i] for i in indices),
        )


class WrappedClassifier(nn.Module):
    """``model`` (any (B, C, H, W) -> (B, num_classes) module) with the cdfkd interface.

    ``forward(x)`` is ``model(x)``; with ``return_features`` the same forward also returns
    the plan's stage maps (each (B, C_k, H_k, W_k)) and embedding (B, feature_dim).
    ``arch`` is the name it was built from (``torchvision:resnet18``), for messages.
    """

    stem_stages = 0  # no stage is a bare input stem: multi-header students may fuse from any

    def __init__(self, model: nn.Module, num_classes: int, plan: FeaturePlan, arch: str = ""):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.plan = plan
        self.feature_dim = plan.feature_dim
        self.arch = arch

    @property
    def stage_names(self) -> list[str]:
        return [tap.module for tap in self.plan.stages]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if not return_features:
            return self.model(x)
        plan = self.plan
        taps = [*plan.stages, *([plan.embedding] if plan.embedding is not None else [])]
        with Capture(self.model, taps) as capture:
            logits = self.model(x)
        values = capture.values()
        maps = [as_map(v, tap.layout) for v, tap in zip(values, plan.stages, strict=False)]
        # Without a Linear (SqueezeNet) the embedding is the last stage, globally pooled.
        embedding = values[-1].flatten(1) if plan.embedding is not None else maps[-1].mean((2, 3))
        return FeatureOutput(logits, maps, embedding)

    def bn_layers(self) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        """Every BatchNorm layer in registration order (BN-statistics hooks attach here)."""
        return bn_layers(self)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, stages={self.stage_names}"


# ----------------------------------------------------------------------------- the probe


def probe_input(model: nn.Module, in_channels: int, image_size: int, batch: int = 2):
    """Zeros (batch, C, S, S) on the model's device and dtype (meta for a meta-device build)."""
    p = next(model.parameters(), None)
    device, dtype = (None, None) if p is None else (p.device, p.dtype)
    return torch.zeros(batch, in_channels, image_size, image_size, device=device, dtype=dtype)


def _call_log(model: nn.Module) -> tuple[list, list]:
    """Hooks logging every Linear / Dropout call as (name, module, input, output)."""
    log: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.modules.dropout._DropoutNd):

            def hook(module, args, output, name=name):
                log.append((name, module, args[0] if args else None, output))

            handles.append(m.register_forward_hook(hook))
    return log, handles


def _embedding_tap(log: list) -> Tap | None:
    """The input of the last Linear called, stepping back over Dropouts feeding it."""
    linears = [i for i, (_, m, _, _) in enumerate(log) if isinstance(m, nn.Linear)]
    if not linears:
        return None
    i = linears[-1]
    calls = sum(1 for name, _, _, _ in log[:i] if name == log[i][0])
    while i > 0:
        prev_name, prev, _, prev_out = log[i - 1]
        # Eval-mode dropout returns its input itself, so identity tells "feeds it".
        if not (isinstance(prev, nn.modules.dropout._DropoutNd) and prev_out is log[i][2]):
            break
        i -= 1
        calls = sum(1 for name, _, _, _ in log[:i] if name == prev_name)
    return Tap(log[i][0], call=calls, read_input=True)


def _explicit_taps(model: nn.Module, names: Sequence[str], what: str) -> list[Tap]:
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        top = ", ".join(n for n, _ in model.named_children())
        raise ModelCheckError(
            f"{what}: stages {unknown} are not modules of {type(model).__name__}; name modules "
            f"by their dotted path as in model.named_modules() (its top-level ones: {top})"
        )
    return [Tap(n) for n in names]


def _layout_of(t: torch.Tensor) -> Layout | None:
    """How a tapped tensor holds a square map: NCHW, NHWC or ViT tokens (None: no map)."""
    if t.dim() == 4:
        if t.shape[2] == t.shape[3]:
            return "nchw"
        return "nhwc" if t.shape[1] == t.shape[2] else None
    if t.dim() == 3:
        n = t.shape[1] - 1
        return "tokens" if n > 0 and int(n**0.5) ** 2 == n else None
    return None


def plan_features(
    model: nn.Module,
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    stages: Sequence[str] | None = None,
    default_stages: Callable[[nn.Module], list[Tap] | None] | None = None,
    what: str = "model",
    size_hint: str = "",
) -> FeaturePlan:
    """Find (and check) where ``model``'s features are read, with eval-mode probe forwards.

    ``stages``: module names chosen by the user (default: the automatic rule, after
    ``default_stages(model)`` for families with their own rule, e.g. ViT). ``what`` names
    the model in messages, ``size_hint`` says which input sizes it takes.
    """
    x = probe_input(model, in_channels, image_size)
    if stages is not None:
        if len(stages) == 0:
            raise ModelCheckError(f"{what}: stages is empty; name at least one module")
        taps = _explicit_taps(model, stages, what)
    else:
        taps = (default_stages(model) if default_stages else None) or []
    log, handles = _call_log(model)
    try:
        with eval_mode(model), torch.no_grad(), Capture(model, taps) as capture:
            logits = model(x)
    except Exception as err:
        hint = f"; {size_hint}" if size_hint else ""
        raise ModelCheckError(
            f"{what} cannot take {in_channels}x{image_size}x{image_size} inputs "
            f"({type(err).__name__}: {str(err).splitlines()[0][:300]}){hint}: set data.image_size "
            "(or --image-size) to a size it takes, or build it for this one"
        ) from None
    finally:
        for h in handles:
            h.remove()
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelCheckError(
            f"{what} returns {got} for a batch of 2 images, not logits (2, {num_classes}): the "
            f"dataset has {num_classes} classes, so the model must be built with num_classes="
            f"{num_classes} and return one (B, {num_classes}) tensor"
        )
    if stages is not None:
        try:
            layouts = [_layout_of(v) for v in capture.values()]
        except RuntimeError as err:  # a named module the forward never runs
            raise ModelCheckError(f"{what}: {err}") from None
        bad = [n for n, lay in zip(stages, layouts, strict=True) if lay is None]
        if bad:
            raise ModelCheckError(
                f"{what}: stages {bad} give no square feature map (need (B, C, H, W), "
                "(B, H, W, C) or ViT tokens); name modules that output maps"
            )
        taps = [
            dataclasses.replace(t, layout=lay)
            for t, lay in zip(taps, layouts, strict=True)
            if lay is not None
        ]
    elif not taps:
        taps = auto_stages(model, x[:1])
        if not taps:
            raise ModelCheckError(
                f"{what}: no stage maps found (the automatic rule keeps square 4-D maps "
                "before global pooling); name them: stages: [module names]"
            )
    embedding = _embedding_tap(log)
    # One more forward reads every stage and the embedding as the wrapped model will.
    with (
        eval_mode(model),
        torch.no_grad(),
        Capture(model, [*taps, *filter(None, [embedding])]) as cap,
    ):
        model(x)
    values = cap.values()
    shapes = tuple(tuple(as_map(v, t.layout).shape[1:]) for v, t in zip(values, taps, strict=False))
    feature_dim = values[-1].flatten(1).shape[1] if embedding is not None else shapes[-1][0]
    return FeaturePlan(in_channels, image_size, tuple(taps), shapes, embedding, int(feature_dim))
