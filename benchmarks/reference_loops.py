"""The baseline of ``benchmarks/throughput.py``: the distillation rounds of cdfkd_mfs and cgdd
written with the structure of the published DFAD / CDFKD-MFS / DAFL code.

Teachers left trainable (their weight gradients are computed), one forward and
``backward(retain_graph=True)`` per teacher for the per-teacher terms (the ensemble
terms get one more backward), the generator's backward reaching student and teacher
weights (no ``inputs=``), ``.item()`` on every loss at every step, a fresh generator
batch for every student update. Same models, optimisers and loss terms as the engine
(``cdfkd.losses``, BN statistics from ``cdfkd.bn_hooks``): only the structure differs.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict

import torch
from torch import nn

from cdfkd.bn_hooks import BNStatsRecorder, batchnorm_layers
from cdfkd.generators import create_generator
from cdfkd.losses import (
    adversarial_discrepancy,
    attention_transfer,
    bn_statistics,
    feature_l1,
    first_layer_rescale,
    information_entropy,
    kd_kl,
    l1_logits,
    preset_label_ce,
)
from cdfkd.methods.base import build_optimizer, build_schedule, teacher_targets
from cdfkd.models import FeatureOutput


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Exclusive wall seconds per phase name (a nested phase's time leaves its parent's);
    on CUDA every edge waits for the device. Disabled: costs one generator call."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.rounds = 0
        self._inner: list[float] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        sync(self.device)
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            sync(self.device)
            dt = time.perf_counter() - t0
            self.totals[name] += dt - self._inner.pop()
            if self._inner:
                self._inner[-1] += dt


def _per_header(out) -> FeatureOutput:
    """A student's features with logits (H, B, C), as the engine's ``student_features``."""
    if out.logits.dim() == 2:
        return FeatureOutput(out.logits.unsqueeze(0), [out.stages], [out.embedding])
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class Reference:
    """The baseline: copies of the engine's initial weights, trainable teachers, the same
    optimisers and latent stream. ``round(phases)`` -> {loss name: float}, the engine's names."""

    generator_first = False

    def __init__(self, cfg, teachers: list[nn.Module], engine, device: torch.device) -> None:
        self.cfg, self.m, self.device = cfg, cfg.method, device
        info = engine.info
        # Left trainable, as in the reference code: autograd records every teacher forward
        # and the generator's backward computes the teachers' weight gradients.
        self.teachers = [copy.deepcopy(t).to(device).eval().requires_grad_(True) for t in teachers]
        self.student = cfg.student.build(info.num_classes, info.channels, info.image_size)
        self.student.to(device).load_state_dict(engine.student.state_dict())
        self.extra = copy.deepcopy(engine.extra).to(device)
        g = cfg.generator
        self.gen = create_generator(type(engine).generator_kind, info, nz=g.nz, width=g.width)
        self.gen.to(device).load_state_dict(engine.generator.state_dict())
        params = list(self.student.parameters()) + list(self.extra.parameters())
        self.opt_s = build_optimizer(params, cfg.optim)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=g.lr, betas=g.betas)
        self.scheds = [
            build_schedule(o, cfg.optim.schedule, cfg.train.steps) for o in (self.opt_s, self.opt_g)
        ]
        self.rng = torch.Generator().manual_seed(cfg.train.seed)  # the engine's latent stream
        self.bn = [batchnorm_layers(t) for t in self.teachers]
        first = self.m.bn_first_rescale
        self.rescale = [first_layer_rescale(len(layers), first) for layers in self.bn]
        self.n = len(self.teachers)
        self.totals: dict[str, list[float]] = {"student": [], "generator": []}  # per update

    def synthesise(self):
        z, y = self.gen.sample(self.cfg.train.batch_size, self.device, self.rng, balanced=False)
        return (self.gen(z, y) if y is not None else self.gen(z)), y

    def teacher_with_prior(self, i: int, x: torch.Tensor, weight: float):
        """Teacher i's logits and its BN prior on x (None when ``weight`` is 0)."""
        if weight == 0:
            return self.teachers[i](x), None
        with BNStatsRecorder(self.bn[i]) as rec:
            t = self.teachers[i](x)
            prior = bn_statistics(*rec.statistics(), rescale=self.rescale[i])
        return t, prior

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        s = self.student(x)
        return s if s.dim() == 3 else s.unsqueeze(0)

    def round(self, ph: Phases) -> dict[str, float]:
        """One round: the engine's order of updates, student losses averaged over updates."""
        self.student.train()
        self.gen.train()
        with ph("other"):  # what no phase below claims: schedules, bookkeeping
            g = self.generator_step(ph) if self.generator_first else {}
            steps = [self.student_step(ph) for _ in range(self.m.student_steps)]
            g = g or self.generator_step(ph)
            for sched in self.scheds:
                sched.step()
        ph.rounds += 1
        self.totals["student"] += [s["student"] for s in steps]
        self.totals["generator"].append(g["generator"])
        return {**{k: _mean([s[k] for s in steps]) for k in steps[0]}, **g}


class MFSReference(Reference):
    """CDFKD-MFS as in its reference code (H = N headers: header i learns from teacher i)."""

    def project(self, i: int, f: torch.Tensor) -> torch.Tensor:
        key = f"proj_{i}_{i}"
        return self.extra[key](f) if key in self.extra else f

    def student_step(self, ph: Phases) -> dict[str, float]:
        m, n = self.m, self.n
        with ph("synthesis"):
            x = self.synthesise()[0].detach()
        with ph("student_update"):
            self.opt_s.zero_grad()
            s = _per_header(self.student(x, return_features=True))
            if s.logits.shape[0] != n:
                raise SystemExit(f"the cdfkd_mfs baseline needs {n} headers (one per teacher)")
            kd, feat, total, t_logits = [], [], 0.0, []
            for i, teacher in enumerate(self.teachers):
                with ph("teacher_forward"):
                    t = teacher(x, return_features=True)
                l1 = l1_logits(s.logits[i], t.logits.detach())
                loss = m.w_s * l1 / n
                kd.append(l1.item())
                if m.lambda_feat > 0:
                    f = feature_l1(self.project(i, s.embedding[i]), t.embedding.detach())
                    loss = loss + m.lambda_feat * f / n
                    feat.append(f.item())
                loss.backward(retain_graph=True)
                total += loss.item()
                t_logits.append(t.logits.detach())
            ens = l1_logits(s.logits.mean(0), torch.stack(t_logits).mean(0))
            (m.lambda_ens * ens).backward()
            self.opt_s.step()
        out = {"kd": _mean(kd), "kd_ensemble": ens.item()}
        if feat:
            out["feature"] = _mean(feat)
        out["student"] = total + m.lambda_ens * out["kd_ensemble"]
        return out

    def generator_step(self, ph: Phases) -> dict[str, float]:
        m, n = self.m, self.n
        with ph("generator_update"):
            self.opt_g.zero_grad()
            x, _ = self.synthesise()
            s = self.student_logits(x)
            adv, bn, total = [], [], 0.0
            for i in range(n):
                t, prior = self.teacher_with_prior(i, x, m.lambda_bn)
                a = l1_logits(s[i], t)
                loss = -m.w_adv * a / n
                adv.append(a.item())
                if prior is not None:
                    loss = loss + m.lambda_bn * prior / n
                    bn.append(prior.item())
                loss.backward(retain_graph=True)  # reaches G, the student and teacher i
                total += loss.item()
            self.opt_g.step()
        out = {"adversarial": _mean(adv), "generator": total}
        if bn:
            out["bn"] = _mean(bn)
        return out


class CGDDReference(Reference):
    """CGDD with DAFL's code structure (the paper has no code): per-teacher terms (BN prior,
    attention transfer) get their own backward, the ensemble terms one more."""

    generator_first = True

    def __init__(self, cfg, teachers, engine, device) -> None:
        super().__init__(cfg, teachers, engine, device)
        self.at_pairs = list(engine.at_pairs)  # resolved by the engine from the same models

    def generator_step(self, ph: Phases) -> dict[str, float]:
        m, n = self.m, self.n
        with ph("generator_update"):
            self.opt_g.zero_grad()
            x, y = self.synthesise()
            logits, bn, total = [], [], 0.0
            for i in range(n):
                t, prior = self.teacher_with_prior(i, x, m.w_bn)
                if prior is not None:
                    loss = m.w_bn * prior / n
                    loss.backward(retain_graph=True)
                    bn.append(prior.item())
                    total += loss.item()
                logits.append(t)
            t = torch.stack(logits)
            t_bar = t.mean(0)
            ce, ie = preset_label_ce(t_bar, y), information_entropy(t)
            out = {"preset_ce": ce.item(), "information_entropy": ie.item()}
            loss = m.w_ce * ce + m.w_ie * ie
            if m.w_adv > 0:
                s_bar = self.student_logits(x).mean(0)
                adv = adversarial_discrepancy(s_bar, t_bar, m.adv_kind, m.temperature)
                out["adversarial"] = adv.item()
                loss = loss - m.w_adv * adv
            loss.backward()
            self.opt_g.step()
        if bn:
            out["bn"] = _mean(bn)
        out["generator"] = total + loss.item()
        return out

    def student_step(self, ph: Phases) -> dict[str, float]:
        m, n = self.m, self.n
        use_at = m.gamma > 0 and bool(self.at_pairs)
        with ph("synthesis"):
            x, y = self.synthesise()
            x = x.detach()
        with ph("student_update"):
            self.opt_s.zero_grad()
            s_out = _per_header(self.student(x, return_features=True)) if use_at else None
            s = s_out.logits if s_out is not None else self.student_logits(x)
            h = s.shape[0]
            logits, at = [], []
            for i, teacher in enumerate(self.teachers):
                with ph("teacher_forward"):
                    t = teacher(x, return_features=use_at)
                if s_out is not None:
                    header = i if h == n else 0
                    a = attention_transfer(
                        [s_out.stages[header][j] for j, _ in self.at_pairs],
                        [t.stages[k].detach() for _, k in self.at_pairs],
                    )
                    (m.gamma * a / n).backward(retain_graph=True)
                    at.append(a.item())
                logits.append((t.logits if use_at else t).detach())
            out, loss = {}, torch.zeros((), device=x.device)
            if m.alpha > 0:
                kd = kd_kl(s, teacher_targets(torch.stack(logits), h), m.temperature)
                out["kd"] = kd.item()
                loss = loss + m.alpha * kd
            if m.beta > 0:
                ce = preset_label_ce(s, y.expand(h, -1))
                out["student_ce"] = ce.item()
                loss = loss + m.beta * ce
            if loss.requires_grad:
                loss.backward()
            self.opt_s.step()
        if at:
            out["attention"] = _mean(at)
        out["student"] = loss.item() + m.gamma * out.get("attention", 0.0)
        return out


REFERENCES = {"cdfkd_mfs": MFSReference, "cgdd": CGDDReference}
