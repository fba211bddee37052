"""torchvision classification models by name: ``arch: torchvision:<name>``.

Any model ``torchvision.models.list_models(module=torchvision.models)`` lists, built
untrained (``weights=None``) with the dataset's class count, for its channels and size:

* 1-channel (or any non-RGB) data: the first convolution the forward calls is replaced
  by one taking that many channels (found by a probe, since registration order is not
  call order in general);
* ViT-style models get ``image_size`` (they assert it); GoogLeNet and Inception-v3 are
  built without auxiliary heads (their train-mode output would be a tuple);
* BatchNorm momentum is set to 0.1 everywhere: MobileNet-V3, EfficientNet-B5..B7 and
  MaxViT use 0.01 (MNASNet 0.0003), tuned for ImageNet-length training; after the few
  thousand steps of a distillation their running statistics are still near their
  initial values and the student scores chance in eval mode (measured: 10 % on digits).

Measured at 1x32x32: 76 of the 80 build and run. ``alexnet``, ``inception_v3``,
``maxvit_t`` and ``vit_h_14`` need other sizes (:data:`SIZE_HINTS`); the probe of
``cdfkd.models.wrapped`` refuses them with the hint.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from cdfkd.models.taps import Tap
from cdfkd.models.tracing import eval_mode

PREFIX = "torchvision"
BN_MOMENTUM = 0.1

#: the input sizes of models that cannot take 32 px (measured with a probe forward)
SIZE_HINTS = {
    "alexnet": "alexnet needs inputs of 63 px or more",
    "inception_v3": "inception_v3 needs inputs of 75 px or more",
    "maxvit_t": "maxvit_t needs 224 px inputs (its native size)",
    "vit_h_14": "vit_h_14 needs a side that is a multiple of its 14 px patches (28, 42, ...)",
}
_NO_AUX = ("googlenet", "inception_v3")


def list_torchvision_models() -> list[str]:
    """The classification models torchvision builds by name, sorted."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def size_hint(name: str) -> str:
    return SIZE_HINTS.get(name, "")


def _check_name(name: str) -> None:
    known = list_torchvision_models()
    if name not in known:
        raise KeyError(
            f"unknown torchvision model {name!r}; known classification models: {', '.join(known)}"
        )


def build_torchvision(
    name: str, num_classes: int, in_channels: int, image_size: int, **kwargs
) -> nn.Module:
    """The untrained torchvision model ``name`` for (in_channels, image_size) inputs.

    ``kwargs`` go to torchvision's builder (``dropout``, ``stochastic_depth_prob``, ...).
    """
    import torchvision

    _check_name(name)
    if "weights" in kwargs or "num_classes" in kwargs:
        raise ValueError(
            f"torchvision:{name}: weights and num_classes are set by cdfkd (untrained, the "
            "dataset's classes); bring trained weights with `cdfkd teachers import`"
        )
    builder = torchvision.models.get_model_builder(name)
    model_class = inspect.signature(builder).return_annotation
    if isinstance(model_class, type) and "image_size" in inspect.signature(model_class).parameters:
        kwargs.setdefault("image_size", image_size)
    if name in _NO_AUX:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    model = builder(weights=None, num_classes=num_classes, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = BN_MOMENTUM
    if in_channels != 3:
        adapt_in_channels(model, in_channels, image_size)
    return model


class _Found(Exception):
    pass


def first_conv(model: nn.Module, image_size: int) -> tuple[str, nn.Conv2d]:
    """The first ``Conv2d`` the forward calls, and its name.

    A pre-hook stops the probe forward right there, so it costs a stem's worth of work.
    """
    names = {m: n for n, m in model.named_modules()}

    def stop(module: nn.Module, args: tuple) -> None:
        raise _Found(module)

    hooks = [m.register_forward_pre_hook(stop) for m in model.modules() if isinstance(m, nn.Conv2d)]
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except _Found as found:
        conv = found.args[0]
        return names[conv], conv
    finally:
        for h in hooks:
            h.remove()
    raise ValueError(f"{type(model).__name__} calls no Conv2d, so its input channels cannot be set")


def adapt_in_channels(model: nn.Module, in_channels: int, image_size: int) -> nn.Module:
    """Replace the first convolution by one taking ``in_channels``, in place.

    The new one is initialised from the old one (summed over RGB for 1 channel: a grey
    image replicated three times gives the same response), so a given initialisation
    scale is kept.
    """
    name, old = first_conv(model, image_size)
    groups = old.groups if old.groups == 1 else in_channels
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]  # a tuple is what Conv2d stores
        old.stride,  # type: ignore[arg-type]
        old.padding,  # type: ignore[arg-type]
        old.dilation,  # type: ignore[arg-type]
        groups,
        old.bias is not None,
        old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        w = old.weight
        if in_channels == 1 and groups == 1:
            new.weight.copy_(w.sum(1, keepdim=True))
        elif groups == 1:
            reps = -(-in_channels // w.shape[1])
            new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels))
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return model


def default_stages(model: nn.Module) -> list[Tap] | None:
    """Stages of families the automatic rule finds none in: a ViT keeps tokens, not maps,
    so its stages are 4 evenly spaced encoder layers, read as (B, D, h, w) maps."""
    import torchvision

    if not isinstance(model, torchvision.models.VisionTransformer):
        return None
    layers = [n for n, _ in model.encoder.layers.named_children()]
    k = min(4, len(layers))
    picks = sorted({round((j + 1) * len(layers) / k) - 1 for j in range(k)})
    return [Tap(f"encoder.layers.{layers[i]}", layout="tokens") for i in picks]
