"""``TeacherEnsemble``: N frozen teachers run on one batch, in a loop or fused with ``vmap``.

Teachers are frozen (``requires_grad_(False)``) and always in eval mode: a
generator step back-propagates into the *input* only, never into teacher
weights, and BatchNorm uses the running statistics the BN prior matches.

Two execution paths give the same numbers (to float rounding):

* ``"loop"``: one forward per teacher. Works for any mix of architectures and
  is the only path that runs forward hooks (``cdfkd.bn_hooks.BNStatsRecorder``).
* ``"vmap"``: for teachers of one architecture, their weights are stacked
  (``torch.func.stack_module_state``) and one ``vmap``-ed ``functional_call``
  runs them all (convolutions become grouped convolutions). The stacked copy is
  built on first use and dropped when the module moves (``.to()``), so it costs
  one extra copy of the weights only while used. Hooks do not fire inside it:
  whenever any teacher module carries a hook (or a global module hook is set)
  the ensemble falls back to the loop, so BN statistics are never silently lost.

``mode="auto"`` picks per device type from ``AUTO_FUSED`` (set from
``benchmarks/ensemble.py``; on a 2-core CPU the loop was as fast or faster).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from cdfkd.data import DatasetInfo
from cdfkd.models import FeatureOutput

log = logging.getLogger(__name__)

MODES = ("auto", "loop", "vmap")

#: device type -> whether ``mode="auto"`` uses the fused path for one-architecture
#: ensembles. Measured with benchmarks/ensemble.py; CUDA is unmeasured so far and
#: keeps the loop, the path every method is tested with.
AUTO_FUSED: dict[str, bool] = {"cpu": False, "cuda": False}


def _has_hooks(modules: nn.Module) -> bool:
    """Whether any forward/backward hook could fire in ``modules`` (or globally)."""
    global_hooks = (
        _module._global_forward_hooks,
        _module._global_forward_pre_hooks,
        _module._global_backward_hooks,
        _module._global_backward_pre_hooks,
    )
    if any(global_hooks):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules.modules()
    )


def _same_structure(teachers: Sequence[nn.Module]) -> bool:
    """Same class and same parameter/buffer names, shapes and dtypes: vmap-able."""
    first = teachers[0]

    def signature(m: nn.Module) -> tuple:
        tensors = [*m.named_parameters(), *m.named_buffers()]
        return (type(m), tuple((n, t.shape, t.dtype) for n, t in tensors))

    ref = signature(first)
    return all(signature(t) == ref for t in teachers[1:])


class TeacherEnsemble(nn.Module):
    """N frozen teachers evaluated on one batch.

    ``teachers``: classifiers with ``forward(x, return_features=False)`` (zoo
    ``StagedClassifier`` models, or torchvision/user models in a ``WrappedClassifier``). ``info`` describes their common input.
    ``archs``: the arch name of each teacher. ``manifest``: the ``ensemble.json``
    content it was loaded from (``{}`` if built in memory).

    Attributes: ``num_teachers``, ``num_classes``, ``info``, ``archs``,
    ``manifest``, ``mode`` (as requested) and ``fusable`` (one architecture).
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        info: DatasetInfo,
        archs: Sequence[str],
        manifest: dict | None = None,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("a TeacherEnsemble needs at least one teacher")
        if len(archs) != len(teachers):
            raise ValueError(f"{len(teachers)} teachers but {len(archs)} arch names")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {', '.join(MODES)}")
        classes = {getattr(t, "num_classes", None) for t in teachers}
        if len(classes) != 1 or None in classes:
            raise ValueError(
                f"teachers must share a known num_classes, got {sorted(map(str, classes))}"
            )
        self.teachers = nn.ModuleList(teachers)
        self.teachers.requires_grad_(False)
        self.info = info
        self.archs = tuple(archs)
        self.manifest = manifest or {}
        self.num_classes = classes.pop()
        self.fusable = len(set(self.archs)) == 1 and _same_structure(list(self.teachers))
        if mode == "vmap" and not self.fusable:
            raise ValueError(
                f"mode='vmap' needs teachers of one architecture, got {list(self.archs)}: "
                "use mode='loop' or 'auto'"
            )
        self.mode = mode
        self._fused: tuple | None = None  # (template, params, buffers), built lazily
        self.train(False)

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers stay in eval mode whatever is asked (BN uses running statistics)."""
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):
        # The stacked weights are a derived copy: rebuild them after .to()/.half().
        self._fused = None
        return super()._apply(fn, recurse)

    def uses_fused(self, device: torch.device | None = None) -> bool:
        """Whether the next forward takes the fused (vmap) path on ``device``."""
        if not self.fusable or self.mode == "loop" or _has_hooks(self.teachers):
            return False
        if self.mode == "vmap":
            return True
        device = device or next(self.teachers.parameters()).device
        return AUTO_FUSED.get(device.type, False)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Run every teacher on ``x`` (B, C, H, W).

        Returns logits (N, B, C), or with ``return_features`` a ``FeatureOutput``:
        logits (N, B, C), stages (one list of (B, C_k, H_k, W_k) maps per teacher)
        and embedding (one (B, D_i) tensor per teacher). Gradients flow to ``x``.
        """
        if self.uses_fused(x.device):
            return self._forward_fused(x, return_features)
        if self.mode == "vmap" and _has_hooks(self.teachers):
            log.debug("hooks present on teachers: the vmap path falls back to the loop")
        outs = [t(x, return_features=return_features) for t in self.teachers]
        if not return_features:
            return torch.stack(outs)
        return FeatureOutput(
            torch.stack([o.logits for o in outs]),
            [list(o.stages) for o in outs],
            [o.embedding for o in outs],
        )

    def _fused_state(self) -> tuple:
        if self._fused is None:
            params, buffers = torch.func.stack_module_state(list(self.teachers))
            template = copy.deepcopy(self.teachers[0]).to("meta")
            self._fused = (template, params, buffers)
        return self._fused

    def _forward_fused(self, x: torch.Tensor, return_features: bool):
        template, params, buffers = self._fused_state()

        def one(p: dict, b: dict, inp: torch.Tensor):
            return torch.func.functional_call(
                template, (p, b), (inp,), {"return_features": return_features}
            )

        out = torch.vmap(one, in_dims=(0, 0, None), randomness="error")(params, buffers, x)
        if not return_features:
            return out
        n = self.num_teachers
        stages = [[s[i] for s in out.stages] for i in range(n)]
        return FeatureOutput(out.logits, stages, list(out.embedding.unbind(0)))

    def bn_layers(self) -> list[list[tuple[str, nn.modules.batchnorm._BatchNorm]]]:
        """Per teacher, every BatchNorm layer in forward order with its name."""
        return [
            [(n, m) for n, m in t.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for t in self.teachers
        ]

    def extra_repr(self) -> str:
        return f"archs={list(self.archs)}, num_classes={self.num_classes}, mode={self.mode!r}"
