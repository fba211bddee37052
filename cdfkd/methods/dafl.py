"""DAFL: Chen et al., "Data-Free Learning of Student Networks", ICCV 2019.

A generator G is trained so that the (frozen) teachers find its images
confident, class-balanced and strongly activating; the student then imitates
the teachers on those images. With the ensemble's mean logits ``t = mean_i t_i``
and teacher i's penultimate embedding ``f_i``:

    L_G = w_oh * CE(t, argmax t)                     one-hot: confident predictions
        + w_ie * sum_k p_k ln p_k,  p = mean_b softmax(t)   information entropy: balance
        - w_a  * mean_i mean |f_i|                   activation: teacher features fire
        - w_adv * D(s, t)                            optional; 0 in DAFL (D: L1 or KL)
    L_S = T^2 KL(softmax(t/T) || softmax(s/T))       on detached G images

``information_entropy`` uses the natural log; the DAFL/ICME code uses log10
(``w_ie = 5`` there equals ``5 / ln 10 ~ 2.2`` here) and FDF uses the natural
log with 20. We keep 5 on the natural-log scale (between the two).

Schedule: DAFL updates G and S together, 1:1, on the same batch; here one
round is one G update followed by ``student_steps`` (default 1) student
updates. The first student update reuses the G step's images and teacher
logits, detached and taken before the G update (exactly DAFL's 1:1 scheme,
and one generator and teacher forward fewer); further ones draw new batches.
FDF's DAFL uses 5 student steps per G step: set ``method.student_steps=5``.

Multi-header students: header targets come from ``teacher_targets`` (H == 1:
the ensemble mean; H == N: header i imitates teacher i).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cdfkd.generators import LatentGenerator
from cdfkd.losses import activation, adversarial_discrepancy, information_entropy, kd_kl, one_hot
from cdfkd.methods.base import (
    DistillMethod,
    MethodConfig,
    detached,
    phase,
    register_method,
    teacher_targets,
)
from cdfkd.models import FeatureOutput


class DAFLConfig(MethodConfig):
    name: Literal["dafl"] = "dafl"
    student_steps: int = Field(1, ge=1, le=100, description="student updates per G update")
    w_oh: float = Field(1.0, ge=0.0, le=100.0, description="one-hot loss weight")
    w_ie: float = Field(5.0, ge=0.0, le=1000.0, description="information entropy weight (ln)")
    w_a: float = Field(0.1, ge=0.0, le=100.0, description="activation loss weight")
    w_adv: float = Field(0.0, ge=0.0, le=100.0, description="adversarial term weight (0 in DAFL)")
    adv_kind: Literal["l1", "kl"] = Field("l1", description="discrepancy D of the adversarial term")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="KD temperature")


def dafl_generator_terms(out: FeatureOutput, per_teacher: bool = False) -> dict[str, torch.Tensor]:
    """DAFL's generator terms on the teachers' outputs (logits (N, B, C), N embeddings):
    ``one_hot``, ``information_entropy`` and ``activation`` (the mean over teachers of
    ``-mean |f_i|``), each ``()``.

    ``per_teacher=False`` (DAFL on an ensemble): one-hot and entropy of the ensemble's
    mean logits. ``per_teacher=True`` (CDFKD): each teacher's one-hot and entropy,
    averaged over teachers.
    """
    if per_teacher:
        # one_hot's row mean over (N, B) is the mean of the per-teacher losses.
        loss_oh = one_hot(out.logits)
        loss_ie = torch.stack([information_entropy(o) for o in out.logits]).mean()
    else:
        t_mean = out.logits.mean(0)
        loss_oh, loss_ie = one_hot(t_mean), information_entropy(t_mean)
    loss_a = torch.stack([activation(f) for f in out.embedding]).mean()
    return {"one_hot": loss_oh, "information_entropy": loss_ie, "activation": loss_a}


@register_method("dafl")
class DAFL(DistillMethod):
    mcfg: DAFLConfig
    generator: LatentGenerator
    Config = DAFLConfig
    generator_kind = "dcgan"

    @phase("generator_update")
    def generator_step(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One G update. Returns the losses and the (detached) images and teacher
        logits ``(N, B, C)`` it used, taken before the update."""
        m = self.mcfg
        x, _ = self.generate(self.cfg.train.batch_size)
        out = self.teachers(x, return_features=True)
        losses = dafl_generator_terms(out)
        loss_g = (
            m.w_oh * losses["one_hot"]
            + m.w_ie * losses["information_entropy"]
            + m.w_a * losses["activation"]
        )
        if m.w_adv > 0:
            targets = teacher_targets(out.logits, self.num_headers)
            adv = adversarial_discrepancy(
                self.student_logits(x), targets, m.adv_kind, m.temperature
            )
            loss_g = loss_g - m.w_adv * adv
            losses["adversarial"] = adv
        self.keep(x, None, out.logits)
        self.update_generator(loss_g)
        losses["generator"] = loss_g
        return detached(losses), x.detach(), out.logits.detach()

    @phase("student_update")
    def student_step(
        self, x: torch.Tensor | None = None, t: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One student update on ``x`` with teacher logits ``t`` (both detached), or on a
        fresh generated batch when they are not given. Returns the KD loss (detached)."""
        if x is None or t is None:
            x, _, t = self.student_batch()
        loss = kd_kl(
            self.student_logits(x), teacher_targets(t, self.num_headers), self.mcfg.temperature
        )
        self.update_student(loss)
        return loss.detach()

    def train_step(self) -> dict[str, torch.Tensor]:
        losses, x, t = self.generator_step()
        loss_s = [self.student_step(x, t)]
        loss_s += [self.student_step() for _ in range(self.mcfg.student_steps - 1)]
        losses["student"] = torch.stack(loss_s).mean()
        return losses
