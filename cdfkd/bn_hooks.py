"""Capture the batch statistics that reach BatchNorm layers (the BN-statistics prior's input).

The loss itself is pure (:func:`cdfkd.losses.bn_statistics`); this module is
the stateful part. A :class:`BNStatsRecorder` puts one forward hook on each
given BN layer; every forward through a layer stores the per-channel mean and
biased variance of that layer's *input*, with their autograd graph so the
generator receives gradients. The hooks live only inside the ``with`` block of
the generator step, so every other teacher pass (the student steps', no-grad)
runs hook-free and costs nothing extra (the reference computed and discarded the
statistics there).

The generator step (``cdfkd.methods.base.TeacherBNPrior``)::

    with BNStatsRecorder(batchnorm_layers(teacher)) as rec:   # hooks live here
        logits = teacher(generator(z))                        # captured
        loss = bn_statistics(*rec.statistics(), rescale=first_layer_rescale(len(rec)))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BNStatsRecorder", "batchnorm_layers"]


def batchnorm_layers(*modules: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``modules``, in registration (usually forward) order."""
    return [m for module in modules for m in module.modules() if isinstance(m, _BatchNorm)]


class BNStatsRecorder:
    """Forward hooks that record the per-channel statistics of each BN layer's input.

    ``layers``: BatchNorm modules (1d/2d/3d) with running statistics. For an input
    ``x`` of shape ``(N, C, *)`` the recorded ``mean`` and ``var`` are ``(C,)``
    vectors over every dimension but C; ``var`` is biased (``correction=0``), the
    estimator BN normalises with. A layer called twice keeps the latest call.
    :meth:`close` (or leaving the ``with`` block) removes the hooks and drops the
    stored tensors.
    """

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        self.layers: list[_BatchNorm] = list(layers)  # type: ignore[arg-type]  # checked below
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, _BatchNorm):
                raise TypeError(
                    f"layer {i} is {type(layer).__name__}, not a BatchNorm layer; pass BN modules "
                    "(e.g. batchnorm_layers(model)), not (name, module) pairs"
                )
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError(
                    f"layer {i} has no running statistics (track_running_stats=False), so there is "
                    "nothing to match; leave it out of the recorder"
                )
        self._means: list[torch.Tensor | None] = [None] * len(self.layers)
        self._vars: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [
            layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)
        ]
        self._closed = False

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            self._means[index] = mean
            self._vars[index] = var

        return hook

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def closed(self) -> bool:
        return self._closed

    def clear(self) -> None:
        """Forget recorded statistics (and the graphs they keep alive)."""
        self._means = [None] * len(self.layers)
        self._vars = [None] * len(self.layers)

    def statistics(
        self,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(batch_means, batch_vars, running_means, running_vars)``, ready for
        :func:`cdfkd.losses.bn_statistics`. Each is a list of ``(C_l,)`` tensors in
        layer order; the running statistics are detached views of the layers' buffers.

        Raises ``RuntimeError`` if a layer has recorded nothing since :meth:`clear`.
        """
        means = [m for m in self._means if m is not None]
        variances = [v for v in self._vars if v is not None]
        missing = [i for i, m in enumerate(self._means) if m is None]
        if missing:
            raise RuntimeError(
                f"BN statistics missing for layers {missing}: run a forward through them "
                "after clear() and before close()"
            )
        # Every layer has running statistics (checked in __init__).
        running_means = [layer.running_mean.detach() for layer in self.layers]  # type: ignore[union-attr]
        running_vars = [layer.running_var.detach() for layer in self.layers]  # type: ignore[union-attr]
        return means, variances, running_means, running_vars

    def close(self) -> None:
        """Remove every hook and drop recorded statistics. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._closed = True
        self.clear()

    def __enter__(self) -> BNStatsRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
