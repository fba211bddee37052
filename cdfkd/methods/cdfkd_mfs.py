"""CDFKD-MFS: Hao et al., "CDFKD-MFS: Collaborative Data-Free Knowledge Distillation via
Multi-Level Feature Sharing", IEEE Transactions on Multimedia, 2022.

N frozen teachers are distilled into one multi-header student (header i learns from
teacher i; family ``mfs`` or ``branch``; H = N, or H = 1 learning from the ensemble
mean). A generator G plays an *asymmetric* adversarial game against the student.
With s_i the logits of header i, t_i those of teacher i, f the pooled embeddings
(``FeatureOutput.embedding``) and L1 = mean |.| (``l1_logits``):

    L_S = w_s        * mean_i L1(s_i, t_i)
        + lambda_feat * mean_i mean_b || P_i(f_s,i) - f_t,i ||_1      (feature_l1)
        + lambda_ens  * L1(mean_i s_i, mean_i t_i)
    L_G = -w_adv * mean_i L1(s_i, t_i)
        + lambda_bn * mean_i sum_l r_l BN_l(teacher i)              (bn_statistics)

P_i is a learned ``Linear`` when header i's and teacher i's embedding sizes differ
(identity when equal; the reference drops the feature term instead). With H = 1 the
header's targets are the ensemble mean and its feature term averages over all
teachers, one projection each. r = [bn_first_rescale, 1, 1, ...]: the first BN of
every teacher counts x5. The teacher logits in L_G are *not* detached (gradients
reach G through both the student and the teacher paths, as in the reference), and
one backward reaches only G's parameters.

Asymmetry, as in the reference code: the student minimises L1 + ensemble + feature
terms, G maximises only the per-header L1 and adds the BN prior, and a round is
``student_steps`` (default 5) student updates followed by one G update. Defaults
are the reference's (w_s 1, lambda_feat 0.2, lambda_ens 5, w_adv 1, lambda_bn 0.1,
first-BN x5).

With the image pool (``train.pool``; default 512 images, ``default_pool``) the
``student_steps`` student updates of a round draw their batches, with the teachers'
logits and embeddings computed when the images were made, from the images of the last
G updates instead of synthesising a fresh batch each; the G update is unchanged and its
batch enters the pool. ``train.pool.size=0`` gives the reference's fresh batches.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from cdfkd.generators import LatentGenerator
from cdfkd.losses import feature_l1, l1_logits
from cdfkd.methods.base import (
    DistillMethod,
    MethodConfig,
    TeacherBNPrior,
    detached,
    mean_losses,
    phase,
    register_method,
    teacher_targets,
)
from cdfkd.methods.pool import PoolConfig
from cdfkd.models import FeatureOutput


class CDFKDMFSConfig(MethodConfig):
    name: Literal["cdfkd_mfs"] = "cdfkd_mfs"
    student_steps: int = Field(5, ge=1, le=100, description="student updates per G update")
    w_s: float = Field(1.0, ge=0.0, le=100.0, description="per-header L1 weight (student)")
    lambda_feat: float = Field(0.2, ge=0.0, le=100.0, description="feature L1 weight (student)")
    lambda_ens: float = Field(5.0, ge=0.0, le=100.0, description="ensemble L1 weight (student)")
    w_adv: float = Field(1.0, ge=0.0, le=100.0, description="adversarial L1 weight (generator)")
    lambda_bn: float = Field(0.1, ge=0.0, le=100.0, description="BN-prior weight (generator)")
    bn_first_rescale: float = Field(
        5.0, ge=0.0, le=100.0, description="weight of a teacher's first BN"
    )


def _headers(student: nn.Module) -> list[nn.Module]:
    """The modules owning each header's ``feature_dim`` (a plain model is its own header)."""
    return list(getattr(student, "heads", [student]))


@register_method("cdfkd_mfs")
class CDFKDMFS(DistillMethod):
    mcfg: CDFKDMFSConfig
    generator: LatentGenerator
    bn_prior: TeacherBNPrior
    Config = CDFKDMFSConfig
    generator_kind = "dcgan"
    bn_prior_weight = "lambda_bn"
    #: 512 images: on digits and Fashion-MNIST at equal rounds as accurate as fresh
    #: batches, at 0.6x the CPU time (BENCHMARKS.md, "Cheaper synthesis"); a bank of 4096
    #: let the student fall behind its generator (22 %).
    default_pool = PoolConfig(size=512)

    # -- structure -------------------------------------------------------------
    def feature_pairs(self) -> list[tuple[int, int]]:
        """(header, teacher) pairs of the feature term: (i, i) for H = N, (0, j) for H = 1."""
        n = self.teachers.num_teachers
        if self.num_headers == n:
            return [(i, i) for i in range(n)]
        return [(0, j) for j in range(n)]

    def build_extra(self) -> dict[str, nn.Module]:
        """``proj_{h}_{t}``: Linear(D_header_h -> D_teacher_t) for each feature pair whose
        sizes differ (none when ``lambda_feat`` is 0); trained with the student."""
        if self.mcfg.lambda_feat == 0:
            return {}
        # Teacher embedding sizes from one no-grad probe (teachers are frozen and in
        # eval mode, so it changes no state); header sizes from the student modules.
        info = self.info
        probe = torch.zeros(2, info.channels, info.image_size, info.image_size, device=self.device)
        with torch.no_grad():
            t_dims = [f.shape[-1] for f in self.teachers(probe, return_features=True).embedding]
        s_dims = [int(getattr(h, "feature_dim")) for h in _headers(self.student)]  # noqa: B009
        extra: dict[str, nn.Module] = {}
        for h, t in self.feature_pairs():
            if s_dims[h] != t_dims[t]:
                extra[f"proj_{h}_{t}"] = nn.Linear(s_dims[h], t_dims[t])
        return extra

    def _project(self, h: int, t: int, f: torch.Tensor) -> torch.Tensor:
        key = f"proj_{h}_{t}"
        return self.extra[key](f) if key in self.extra else f

    @property
    def pool_features(self) -> bool:
        return True  # the feature term reads the teachers' embeddings

    # -- one round -------------------------------------------------------------
    @phase("student_update")
    def student_step(self) -> dict[str, torch.Tensor]:
        """One student update on a fresh no-grad batch. Returns detached ``kd``,
        ``kd_ensemble``, ``feature`` (when lambda_feat > 0) and their weighted sum
        ``student``."""
        m = self.mcfg
        x, _, t_out = self.student_batch(features=True)
        s_out = self.student_features(x)
        s_logits, s_emb = s_out.logits, s_out.embedding
        t_logits = t_out.logits
        loss_l1 = l1_logits(s_logits, teacher_targets(t_logits, self.num_headers))
        loss_ens = l1_logits(s_logits.mean(0), t_logits.mean(0))
        loss = m.w_s * loss_l1 + m.lambda_ens * loss_ens
        losses = {"kd": loss_l1, "kd_ensemble": loss_ens}
        if m.lambda_feat > 0:
            loss_feat = torch.stack(
                [
                    feature_l1(self._project(h, t, s_emb[h]), t_out.embedding[t])
                    for h, t in self.feature_pairs()
                ]
            ).mean()
            loss = loss + m.lambda_feat * loss_feat
            losses["feature"] = loss_feat
        self.update_student(loss)
        losses["student"] = loss
        return detached(losses)

    @phase("generator_update")
    def generator_step(self) -> dict[str, torch.Tensor]:
        """One G update. Returns detached ``adversarial`` (the per-header L1 it maximises),
        ``bn`` (when lambda_bn > 0) and the total ``generator`` loss."""
        m = self.mcfg
        x, _ = self.generate(self.cfg.train.batch_size)
        # Not detached: G also learns through the teachers.
        t_out, bn = self.bn_prior(x, features=self.pooling)
        self.keep(x, None, t_out)
        t_logits = t_out.logits if isinstance(t_out, FeatureOutput) else t_out
        adv = l1_logits(self.student_logits(x), teacher_targets(t_logits, self.num_headers))
        loss = -m.w_adv * adv
        losses = {"adversarial": adv}
        if bn is not None:
            loss = loss + m.lambda_bn * bn
            losses["bn"] = bn
        self.update_generator(loss)
        losses["generator"] = loss
        return detached(losses)

    def train_step(self) -> dict[str, torch.Tensor]:
        """``student_steps`` student updates (their losses averaged), then one G update."""
        losses = mean_losses([self.student_step() for _ in range(self.mcfg.student_steps)])
        losses.update(self.generator_step())
        return losses
