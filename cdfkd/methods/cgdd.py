"""CGDD: "Conditional Generative Data-Free Knowledge Distillation based on Attention
Transfer" (arXiv, December 2021; v4 August 2022).

A conditional generator G(z, y) is trained so that the frozen teachers classify
its images as the *preset* label y; the student learns from the teachers on
those images, takes y as a ground-truth label, and mimics the teachers'
spatial attention maps. With teacher logits ``t = (t_1 .. t_N)``, ensemble mean
``t_bar``, student header logits ``s_h`` and a fresh batch per update:

    L_G = w_ce  * CE(t_bar, y)                                   preset label
        + w_ie  * sum_k p_k ln p_k,  p = mean_{i,b} softmax(t_i)   class balance
        + w_bn  * (1/N) sum_i sum_l s_l (||rv_il - var_il|| + ||rm_il - mean_il||)
        - w_adv * D(mean_h s_h, t_bar)                           optional (later paper versions)
        + w_div * 1 / (|x_a - x_b| / |z_a - z_b|)                mode seeking (not in the paper)
    L_S = alpha * T^2 KL(softmax(t_h/T) || softmax(s_h/T))       t_h: teacher_targets
        + beta  * CE(s_h, y)                                     every header
        + gamma * AT(s_h stages, teacher stages at ``at_stages``)

(means over headers h). The BN prior's first layer per teacher is weighted by
``bn_first_rescale`` (default 1; CDFKD-MFS: 5). D is L1 (DFAD) or KL (``adv_kind``).
AT is the code variant of Zagoruyko & Komodakis, ``sum_j mean (a(S_j) - a(T_j))^2``
with L2-normalised channel-mean energy maps (cdfkd.losses.attention_transfer),
averaged over (header, teacher) matches (see methods/_attention_pairs.py).

``at_stages``: ``[[student_stage, teacher_stage], ...]`` (negative: from the end);
None pairs the last k stages of both (k = the smaller stage count), leaving out
pairs with a 1x1 map, whose attention is constant. Indices are checked against
the actual student and teachers when the method is built.

With the image pool (``train.pool``; default 512 images, ``default_pool``) the student
update no longer gets a fresh batch: it draws B images, with the preset labels they were
made for and the teachers' logits and stage maps computed then (exact: the teachers are
frozen), from the last generator batches; L_G and its batch are unchanged, and that
batch is what enters the pool. ``train.pool.size=0`` gives the paper's fresh batches.

The paper gives no code; nothing public implements it (docs/algorithms.md B §5).
Defaults were chosen on digits (3 LeNet-5 teachers, 99-100 % -> LeNet-5-half,
batch 64, 300 rounds; student accuracy, and the rate at which the teachers
label G(z, y) as y after 100 rounds):

    w_bn 1,  w_ce 1 (defaults)   94.4 %   preset labels kept: 96 %
    w_bn 10, w_ce 1              93.3 %   70 % (95.6 % with beta = 0: CE to wrong labels hurts)
    w_bn 10, w_ce 5              93.9 %
    w_bn 1,  w_ce 0.3            92.8 %
    w_bn 0.1, w_ce 1, first x5   90.0 %   (91.4 % at 600 rounds)

A BN prior that outweighs the preset-label CE makes G ignore y, and then the
student's CE to y teaches wrong labels. The adversarial term did not help
(w_bn 0.1: w_adv 0.3 90.3 %, w_adv 1 83.6 %).

On Fashion-MNIST the conditional generator collapses to a few images per class
(``sample_diversity`` 0.31 against 0.5-0.7 with the remedies) and the student stops at
about 71 % relative at 1000 rounds. The mode-seeking term (``w_div``, MSGAN) pays G for
images that differ when z differs under the same label; at ``w_div`` 1 it lifts the
student to 81.7 % (BENCHMARKS.md, "CGDD without mode collapse"), so it is on by default;
``w_div=0`` is the paper's generator loss.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from cdfkd.generators import LatentGenerator
from cdfkd.losses import (
    adversarial_discrepancy,
    information_entropy,
    kd_kl,
    preset_label_ce,
)
from cdfkd.methods._attention_pairs import (
    default_stage_pairs,
    ensemble_attention_transfer,
    probe_stage_shapes,
    validate_stage_pairs,
)
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

log = logging.getLogger(__name__)


class CGDDConfig(MethodConfig):
    name: Literal["cgdd"] = "cgdd"
    alpha: float = Field(1.0, ge=0.0, le=100.0, description="student KD weight")
    beta: float = Field(1.0, ge=0.0, le=100.0, description="student CE-to-preset-label weight")
    gamma: float = Field(250.0, ge=0.0, le=1e5, description="student attention-transfer weight")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="KD temperature")
    w_ce: float = Field(1.0, ge=0.0, le=100.0, description="generator: CE(teacher mean, y)")
    w_ie: float = Field(1.0, ge=0.0, le=1000.0, description="generator: information entropy")
    w_bn: float = Field(1.0, ge=0.0, le=1000.0, description="generator: BN-statistics prior")
    w_adv: float = Field(0.0, ge=0.0, le=100.0, description="generator: -D(student, teachers)")
    adv_kind: Literal["l1", "kl"] = Field(
        "l1", description="discrepancy the adversarial term maximises"
    )
    bn_first_rescale: float = Field(
        1.0, gt=0.0, le=100.0, description="weight of each teacher's first BN (CDFKD-MFS: 5)"
    )
    at_stages: list[tuple[int, int]] | None = Field(
        None, description="[[student_stage, teacher_stage], ...]; None: last k stages of both"
    )
    # Against mode collapse of G(z, y) (0/False turns each off). Defaults from the ablation in
    # BENCHMARKS.md, "CGDD without mode collapse": the mode-seeking term on (Fashion-MNIST
    # 70.9 -> 81.7 % relative at 1000 rounds, digits 92.3 -> 94.2 % over 3 seeds); balanced
    # labels and re-initialisation off (each cost accuracy there).
    balanced_labels: bool = Field(
        False,
        description="preset labels: every class equally often in each batch (arange(B) % C, "
        "shuffled) instead of i.i.d. uniform draws",
    )
    w_div: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="generator: mode-seeking term (Mao et al., MSGAN, CVPR 2019): 1 / (image "
        "distance / latent distance) for pairs with the same preset label",
    )
    reinit_every: int = Field(
        0,
        ge=0,
        le=100_000,
        description="re-draw G's label embedding (and its optimiser state) every k rounds, "
        "after NAYER's re-initialised noisy layer (Do et al., CVPR 2024); 0: never",
    )

    @model_validator(mode="after")
    def _something_to_learn(self) -> CGDDConfig:
        if self.alpha + self.beta + self.gamma == 0:
            raise ValueError("alpha, beta and gamma are all 0: the student would learn nothing")
        if self.w_ce + self.w_ie + self.w_bn + self.w_adv == 0:
            raise ValueError(
                "w_ce, w_ie, w_bn and w_adv are all 0: the generator would learn nothing"
            )
        if self.at_stages is not None and len(self.at_stages) == 0:
            raise ValueError(
                "at_stages is empty: list stage pairs, use null for the default, or set gamma=0"
            )
        return self


@register_method("cgdd")
class CGDD(DistillMethod):
    """``at_pairs``: the resolved ``(student_stage, teacher_stage)`` pairs ([] = no AT)."""

    mcfg: CGDDConfig
    generator: LatentGenerator
    bn_prior: TeacherBNPrior
    Config = CGDDConfig
    generator_kind = "conditional"
    bn_prior_weight = "w_bn"
    #: 512 images: on digits and Fashion-MNIST at equal rounds as accurate as fresh
    #: batches, at 0.8x the CPU time (BENCHMARKS.md, "Cheaper synthesis").
    default_pool = PoolConfig(size=512)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.mcfg
        self.balanced_labels = m.balanced_labels
        self.at_pairs: list[tuple[int, int]] = []
        if m.gamma > 0 or m.at_stages is not None:
            shapes = probe_stage_shapes(
                self.student, self.teachers, self.info.channels, self.info.image_size, self.device
            )
            if m.at_stages is not None:
                self.at_pairs = validate_stage_pairs(list(m.at_stages), *shapes)
            else:
                self.at_pairs = default_stage_pairs(*shapes)
                if not self.at_pairs and m.gamma > 0:
                    log.warning(
                        "cgdd: no stage pair with maps larger than 1x1; attention transfer is off"
                    )

    @property
    def pool_features(self) -> bool:
        return self.mcfg.gamma > 0 and bool(self.at_pairs)

    def _generate_pairs(self, batch_size: int):
        """A batch whose two halves share their preset labels, and the mode-seeking term
        ``1 / (mean |x_a - x_b| / mean |z_a - z_b| + eps)`` over those pairs (MSGAN)."""
        half = batch_size // 2
        z, y = self.sample_latent(batch_size)
        y = torch.cat([y[:half], y[:half], y[2 * half :]])  # an odd last image stays unpaired
        x = self.gen(z, y)
        ratio = (x[:half] - x[half : 2 * half]).abs().mean() / (
            (z[:half] - z[half : 2 * half]).abs().mean() + 1e-8
        )
        return x, y, 1.0 / (ratio + 1e-5)

    def _reinit_label_embedding(self) -> None:
        """Re-draw the label embedding (from the global stream, saved in checkpoints) and
        forget its Adam moments, so G meets new label codes and cannot settle on one
        image per code."""
        embed = getattr(self.gen, "embed", None)
        if embed is None:
            return
        embed.reset_parameters()
        assert self.opt_g is not None
        for p in embed.parameters():
            self.opt_g.state.pop(p, None)

    def pool_stages(self) -> set[int]:
        return {t for _, t in self.at_pairs}  # the teacher maps attention transfer reads

    @phase("generator_update")
    def generator_step(self) -> dict[str, torch.Tensor]:
        """One G update; returns ``generator`` (L_G) and its terms ``preset_ce``,
        ``information_entropy``, ``bn`` (if w_bn > 0), ``diversity`` (the mode-seeking term,
        if w_div > 0), ``adversarial`` (D, if w_adv > 0)."""
        m = self.mcfg
        if m.reinit_every and self.step_count % m.reinit_every == 0 and self.step_count > 0:
            self._reinit_label_embedding()
        if m.w_div > 0:
            x, y, div = self._generate_pairs(self.cfg.train.batch_size)
        else:
            (x, y), div = self.generate(self.cfg.train.batch_size), None
        t_out, bn = self.bn_prior(x, features=self.pooling and self.pool_features)
        self.keep(x, y, t_out)
        t = t_out.logits if isinstance(t_out, FeatureOutput) else t_out
        losses = {} if bn is None else {"bn": bn}
        t_bar = t.mean(0)
        losses["preset_ce"] = preset_label_ce(t_bar, y)
        losses["information_entropy"] = information_entropy(t)
        loss_g = m.w_ce * losses["preset_ce"] + m.w_ie * losses["information_entropy"]
        if bn is not None:
            loss_g = loss_g + m.w_bn * bn
        if div is not None:
            losses["diversity"] = div
            loss_g = loss_g + m.w_div * div
        if m.w_adv > 0:
            # The student stays in train mode (as in DFAD/CDFKD-MFS): its BN tracks these images.
            s_bar = self.student_logits(x).mean(0)
            losses["adversarial"] = adversarial_discrepancy(s_bar, t_bar, m.adv_kind, m.temperature)
            loss_g = loss_g - m.w_adv * losses["adversarial"]
        self.update_generator(loss_g)
        losses["generator"] = loss_g
        return detached(losses)

    @phase("student_update")
    def student_step(self) -> dict[str, torch.Tensor]:
        """One student update on a fresh batch; returns ``student`` (L_S) and its terms
        ``kd``, ``student_ce``, ``attention`` (each only when its weight is > 0)."""
        m = self.mcfg
        use_at = m.gamma > 0 and bool(self.at_pairs)
        x, y, t_out = self.student_batch(features=use_at)
        s_out = self.student_features(x) if use_at else None
        if s_out is not None:
            s, t = s_out.logits, t_out.logits
        else:
            s, t = self.student_logits(x), t_out
        losses = {}
        loss = torch.zeros((), device=x.device)
        if m.alpha > 0:
            losses["kd"] = kd_kl(s, teacher_targets(t, s.shape[0]), m.temperature)
            loss = loss + m.alpha * losses["kd"]
        if m.beta > 0:
            losses["student_ce"] = preset_label_ce(s, y.expand(s.shape[0], -1))
            loss = loss + m.beta * losses["student_ce"]
        if s_out is not None:
            losses["attention"] = ensemble_attention_transfer(
                s_out.stages, t_out.stages, self.at_pairs
            )
            loss = loss + m.gamma * losses["attention"]
        self.update_student(loss)
        losses["student"] = loss
        return detached(losses)

    def train_step(self) -> dict[str, torch.Tensor]:
        """1 G update, then ``student_steps`` student updates (their losses averaged)."""
        losses = self.generator_step()
        losses.update(mean_losses([self.student_step() for _ in range(self.mcfg.student_steps)]))
        return losses
