"""CDFKD: Hao et al., "Model Compression via Collaborative Data-Free Knowledge Distillation
for Edge Intelligence", IEEE ICME 2021.

The predecessor of CDFKD-MFS and its baseline. N frozen teachers are distilled into a
multi-header student (header i learns from teacher i; the reference uses a "branch"
student whose headers own copies of the last stage). The generator is trained
DAFL-style on each teacher, averaged over teachers; as in the authors' code it has no
adversarial term (the paper's wording says "adversarial"; the code is DAFL). With
o_j and f_j teacher j's logits and pooled embedding:

    L_G = mean_j ( w_oh * CE(o_j, argmax o_j)                    one-hot
                 + w_ie * sum_k p_jk ln p_jk,  p_j = mean_b softmax(o_j)   information entropy
                 - w_a  * mean |f_j| )                           activation
    L_S = w_head * mean_i KL(softmax(t_i) || softmax(s_i))
        + w_ens  * KL(softmax(mean_i t_i) || softmax(mean_i s_i))       (T = 1, batchmean)

The student sees the generator's images detached. G and S are updated 1:1 on the
same batch, as in the reference (one G update and the first student update share
the images and teacher logits, taken before the G update); ``student_steps`` > 1
adds student updates on fresh batches. Reference MNIST weights: oh 1, ie 5, a 0.1,
head 1, ens 1. The reference's entropy uses log10; ours the natural log (its
w_ie = 5 equals 5 / ln 10 ~ 2.2 here); we keep 5, as the DAFL baseline does.
H = 1 students learn from the ensemble mean (``teacher_targets``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cdfkd.generators import LatentGenerator
from cdfkd.losses import kd_kl
from cdfkd.methods.base import (
    DistillMethod,
    MethodConfig,
    detached,
    mean_losses,
    phase,
    register_method,
    teacher_targets,
)
from cdfkd.methods.dafl import dafl_generator_terms


class CDFKDConfig(MethodConfig):
    name: Literal["cdfkd"] = "cdfkd"
    student_steps: int = Field(1, ge=1, le=100, description="student updates per G update (1:1)")
    w_oh: float = Field(1.0, ge=0.0, le=100.0, description="one-hot loss weight")
    w_ie: float = Field(5.0, ge=0.0, le=1000.0, description="entropy weight (natural log)")
    w_a: float = Field(0.1, ge=0.0, le=100.0, description="activation loss weight")
    w_head: float = Field(1.0, ge=0.0, le=100.0, description="per-header KD weight (student)")
    w_ens: float = Field(1.0, ge=0.0, le=100.0, description="ensemble KD weight (student)")


@register_method("cdfkd")
class CDFKD(DistillMethod):
    mcfg: CDFKDConfig
    generator: LatentGenerator
    Config = CDFKDConfig
    generator_kind = "dcgan"

    @phase("generator_update")
    def generator_step(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One G update; returns its losses and the detached images and (N, B, C) teacher
        logits it used (taken before the update) for the student step on the same batch."""
        m = self.mcfg
        x, _ = self.generate(self.cfg.train.batch_size)
        out = self.teachers(x, return_features=True)
        losses = dafl_generator_terms(out, per_teacher=True)
        loss = (
            m.w_oh * losses["one_hot"]
            + m.w_ie * losses["information_entropy"]
            + m.w_a * losses["activation"]
        )
        self.keep(x, None, out.logits)
        self.update_generator(loss)
        losses["generator"] = loss
        return detached(losses), x.detach(), out.logits.detach()

    @phase("student_update")
    def student_step(self, x: torch.Tensor | None = None, t: torch.Tensor | None = None):
        """One student update on (x, t), or on a fresh generated batch; detached losses."""
        m = self.mcfg
        if x is None or t is None:
            x, _, t = self.student_batch()
        s = self.student_logits(x)
        loss_head = kd_kl(s, teacher_targets(t, self.num_headers))
        loss_ens = kd_kl(s.mean(0), t.mean(0))
        loss = m.w_head * loss_head + m.w_ens * loss_ens
        self.update_student(loss)
        return detached({"kd": loss_head, "kd_ensemble": loss_ens, "student": loss})

    def train_step(self) -> dict[str, torch.Tensor]:
        losses, x, t = self.generator_step()
        steps = [self.student_step(x, t)]
        steps += [self.student_step() for _ in range(self.mcfg.student_steps - 1)]
        losses.update(mean_losses(steps))
        return losses
