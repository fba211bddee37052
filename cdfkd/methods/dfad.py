"""DFAD: Fang et al., "Data-Free Adversarial Distillation", arXiv:1912.11006, 2019.

A min-max game on generated images ``x = G(z)``: the student imitates the
(frozen) teachers, the generator seeks the images where they disagree most.
With ``s`` the student's logits and ``t`` the teachers' (per header:
``teacher_targets``, the ensemble mean for a single-header student):

    L_S =  L1(s, t) = mean |s - t|      on detached x,    ``student_steps`` (5) updates
    L_G = -L1(s, t)                     gradient through student *and* teachers into G

Each round follows the paper's Algorithm 1: the imitation stage (5 student
updates, each on a fresh batch) then the generation stage (1 G update).

The adversarial term really is computed against the student: FDF's DFAD
passes ``student=teacher`` to its synthesiser, so there ``L_G`` is identically
0 and G never learns (FDF issue #11). The student sits in train mode during the
G step, as in the reference code (its BN uses, and tracks, the batch
statistics); only G's parameters receive gradients there.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cdfkd.generators import LatentGenerator
from cdfkd.losses import l1_logits
from cdfkd.methods.base import DistillMethod, MethodConfig, phase, register_method, teacher_targets


class DFADConfig(MethodConfig):
    name: Literal["dfad"] = "dfad"
    student_steps: int = Field(5, ge=1, le=100, description="student updates per G update (DFAD 5)")
    w_adv: float = Field(1.0, gt=0.0, le=100.0, description="weight of the generator's -L1 term")


@register_method("dfad")
class DFAD(DistillMethod):
    mcfg: DFADConfig
    generator: LatentGenerator
    Config = DFADConfig
    generator_kind = "dcgan"

    @phase("student_update")
    def student_step(self) -> torch.Tensor:
        """One student update on a fresh detached batch; returns L1(s, t) (detached)."""
        x, _, t = self.student_batch()
        loss = l1_logits(self.student_logits(x), teacher_targets(t, self.num_headers))
        self.update_student(loss)
        return loss.detach()

    @phase("generator_update")
    def generator_step(self) -> dict[str, torch.Tensor]:
        """One G update maximising the student-teacher L1; returns
        ``{"generator": -w_adv * L1, "discrepancy": L1}`` (detached)."""
        x, _ = self.generate(self.cfg.train.batch_size)
        t = self.teachers(x)
        self.keep(x, None, t)
        discrepancy = l1_logits(self.student_logits(x), teacher_targets(t, self.num_headers))
        loss_g = -self.mcfg.w_adv * discrepancy
        self.update_generator(loss_g)
        return {"generator": loss_g.detach(), "adversarial": discrepancy.detach()}

    def train_step(self) -> dict[str, torch.Tensor]:
        loss_s = torch.stack([self.student_step() for _ in range(self.mcfg.student_steps)])
        return {"student": loss_s.mean(), **self.generator_step()}
