"""KD with the real training data: Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015. Not data-free: the upper bound every report shows next to the
data-free methods (reference ``kd_real`` of relative accuracy).

On real training images x with labels y (augmented as the dataset's train split
is), with ``t`` the teachers' logits (per header: ``teacher_targets``, the
ensemble mean for a single-header student):

    L_S = alpha * T^2 KL(softmax(t/T) || softmax(s/T)) + beta * CE(s, y)

Defaults alpha 1, beta 0, T 1: the MFS ``KD.py`` and FDF ``vanilla_kd.py``
recipe (pure KD; the real labels are unused unless beta > 0).

Batches: the training set is visited epoch by epoch in an order drawn from
``self.rng`` (a permutation per epoch). The dataset's augmentations draw from
the global torch stream; they run on a private copy of it (forked, seeded from
``train.seed``), so evaluation or anything else touching the global stream
(a DataLoader draws its seed there) cannot change the batches. Order, cursor
and augmentation stream are saved in the checkpoint: resume is exact. Samples
are read in this process (no loader workers): exact, and cheap for in-memory
datasets.

There is no generator: ``proxy_batches`` yields real *training* images
(unlabelled, from a held-out draw) instead, so this method's data-free proxy
scores agreement on data the student trained on, an optimistic value;
``sample_images`` gives an empty grid (base behaviour when the generator is None).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cdfkd.losses import kd_kl, preset_label_ce
from cdfkd.methods.base import (
    PROXY_SEED_OFFSET,
    DistillMethod,
    MethodConfig,
    mean_losses,
    phase,
    register_method,
    teacher_targets,
)

# Seed offset of the augmentation stream (any value apart from the proxy's).
_AUG_SEED_OFFSET = 2_000_003


def _rng_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


class KDRealConfig(MethodConfig):
    name: Literal["kd_real"] = "kd_real"
    alpha: float = Field(1.0, ge=0.0, le=100.0, description="weight of KD to the teachers")
    beta: float = Field(0.0, ge=0.0, le=100.0, description="weight of CE to the real labels")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="KD temperature")


@register_method("kd_real")
class KDReal(DistillMethod):
    mcfg: KDRealConfig
    Config = KDRealConfig
    generator_kind = None
    needs_real_data = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.train_data) == 0:
            raise ValueError("kd_real: the training set is empty")
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._aug_state = _rng_state(self.cfg.train.seed + _AUG_SEED_OFFSET)

    def _load(self, indices: torch.Tensor, aug_state: torch.Tensor):
        """Samples ``indices`` as ``(x, y, aug_state')``: the dataset's augmentations draw
        from ``aug_state`` (a torch CPU RNG state), not from the global stream."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(aug_state)
            xs, ys = zip(*(self.train_data[int(i)] for i in indices), strict=True)
            aug_state = torch.get_rng_state()
        return torch.stack(xs).to(self.device), torch.as_tensor(ys).to(self.device), aug_state

    def _next_indices(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` indices of the epoch order (a new permutation per epoch)."""
        parts, need = [], batch_size
        while need > 0:
            if self._cursor >= len(self._order):
                self._order = torch.randperm(len(self.train_data), generator=self.rng)
                self._cursor = 0
            take = self._order[self._cursor : self._cursor + need]
            self._cursor += len(take)
            need -= len(take)
            parts.append(take)
        return torch.cat(parts)

    @phase("student_update")
    def student_step(self) -> dict[str, torch.Tensor]:
        m = self.mcfg
        idx = self._next_indices(self.cfg.train.batch_size)
        x, y, self._aug_state = self._load(idx, self._aug_state)
        with torch.no_grad():
            t = teacher_targets(self.teachers(x), self.num_headers)
        s = self.student_logits(x)
        loss_kd = kd_kl(s, t, m.temperature)
        loss_ce = preset_label_ce(s, y.expand(s.shape[0], -1))
        loss = m.alpha * loss_kd + m.beta * loss_ce
        self.update_student(loss)
        return {"student": loss.detach(), "kd": loss_kd.detach(), "student_ce": loss_ce.detach()}

    def train_step(self) -> dict[str, torch.Tensor]:
        return mean_losses([self.student_step() for _ in range(self.mcfg.student_steps)])

    @torch.no_grad()
    def proxy_batches(self, num_batches: int, batch_size: int):
        """Unlabelled real training images ``(x, None)`` from a held-out draw (indices and
        augmentations), the same at every evaluation; training streams are untouched."""
        rng = torch.Generator().manual_seed(self.cfg.train.seed + PROXY_SEED_OFFSET)
        aug_state = _rng_state(self.cfg.train.seed + PROXY_SEED_OFFSET + 1)
        for _ in range(num_batches):
            idx = torch.randint(len(self.train_data), (batch_size,), generator=rng)
            x, _, aug_state = self._load(idx, aug_state)
            yield x, None

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "data_order": self._order.clone(),
            "data_cursor": self._cursor,
            "aug_rng": self._aug_state.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self._order = sd["data_order"].clone()
        self._cursor = int(sd["data_cursor"])
        self._aug_state = sd["aug_rng"].clone()
