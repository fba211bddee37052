"""The interface every distillation method implements, and the parts they share.

A method owns a student (single- or multi-header), usually a generator, their
optimisers and its random streams. The loop (cdfkd/train.py) knows only:

    method = create_method(cfg, teachers, info, device, train_data)
    losses = method.step()          # one generator/student round -> {name: 0-d tensor}
    metrics = method.evaluate(loader)
    sd = method.state_dict(); method.load_state_dict(sd)   # exact resume

Every method's ``Config`` subclasses :class:`MethodConfig` (it lives here, below the
experiment config that composes it), and every loss a method returns is named from
:data:`LOSS_NAMES`, so ``loss/<name>`` means the same thing in every run and the
MLflow columns of different methods line up.
"""

from __future__ import annotations

import abc
import functools
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import nn
from torch.profiler import record_function

from cdfkd.bn_hooks import BNStatsRecorder
from cdfkd.generators import LatentGenerator
from cdfkd.losses import bn_statistics, first_layer_rescale
from cdfkd.methods.pool import ImagePool, PoolConfig
from cdfkd.models import FeatureOutput
from cdfkd.registry import Registry
from cdfkd.schema import Strict

if TYPE_CHECKING:  # the experiment config composes method configs, never the reverse
    from cdfkd.config import ExperimentConfig, OptimConfig

METHODS: Registry = Registry("method")

#: The one loss vocabulary: ``method.step()`` returns a subset of these names.
LOSS_NAMES: dict[str, str] = {
    # student side
    "student": "the student's total loss (every method)",
    "kd": "distillation to the teachers' targets, per header (KL with temperature, or L1)",
    "kd_ensemble": "distillation of the mean of the headers to the teachers' mean",
    "feature": "L1 between projected student and teacher embeddings",
    "attention": "attention transfer between student and teacher stages",
    "student_ce": "cross-entropy of the student to preset (or real) labels",
    # generator side
    "generator": "the generator's total loss (methods with a generator)",
    "adversarial": "the student-teacher discrepancy the generator maximises",
    "preset_ce": "cross-entropy of the teachers to the preset labels",
    "one_hot": "DAFL's one-hot loss (teacher confidence)",
    "information_entropy": "class balance of the teachers' predictions (negative entropy)",
    "activation": "DAFL's activation loss (negative L1 of teacher features)",
    "bn": "the teachers' BatchNorm-statistics prior",
    "total_variation": "total variation of the generated images",
    "diversity": "mode-seeking term: inverse image distance per latent distance, same labels",
}


class MethodConfig(Strict):
    """Fields every method has; each method subclasses this with its own weights."""

    name: str
    student_steps: int = Field(1, ge=1, le=100, description="student updates per generator update")


# Offset of the random stream that draws proxy batches: far from any training
# seed, so the proxy is scored on images the student never trained on.
PROXY_SEED_OFFSET = 1_000_003


def register_method(name: str):
    def decorator(cls: type[DistillMethod]) -> type[DistillMethod]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def list_methods() -> list[str]:
    return METHODS.names()


def method_config_class(name: str) -> type[MethodConfig]:
    if not name:
        raise KeyError(f"method.name is missing; choose one of: {', '.join(list_methods())}")
    return METHODS.get(name).Config


def create_method(cfg: ExperimentConfig, teachers, info, device: torch.device, train_data=None):
    return METHODS.get(cfg.method.name)(cfg, teachers, info, device, train_data=train_data)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_schedule(opt: torch.optim.Optimizer, kind: str, total_steps: int):
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def teacher_targets(teacher_logits: torch.Tensor, num_headers: int) -> torch.Tensor:
    """Per-header targets from (N, B, C) teacher logits.

    H == N: header i learns from teacher i (CDFKD); H == 1: the single header
    learns from the ensemble mean. Returns (H, B, C).
    """
    n = teacher_logits.shape[0]
    if num_headers == n:
        return teacher_logits
    if num_headers == 1:
        return teacher_logits.mean(0, keepdim=True)
    raise ValueError(
        f"a student with {num_headers} headers needs 1 or {n} (= number of teachers) headers"
    )


def phase(name: str):
    """Label a method's ``student_step``/``generator_step`` for ``torch.profiler``
    (``cdfkd.student_update``, ``cdfkd.generator_update``): ``benchmarks/throughput.py``
    splits a round's time by these ranges; outside a profiler they cost nothing."""

    def decorate(fn):
        @functools.wraps(fn)
        def labelled(*args, **kwargs):
            with record_function(f"cdfkd.{name}"):
                return fn(*args, **kwargs)

        return labelled

    return decorate


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype of autocast regions for ``train.precision`` on ``device`` (None: fp32).

    ``auto`` picks bf16 on CUDA devices with bf16 support and fp32 elsewhere: on CPU,
    bf16 autocast was slower than fp32 here (BENCHMARKS.md).
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class TeacherBNPrior:
    """The BN-statistics prior over a teacher ensemble (DeepInversion; CDFKD-MFS):

        (1/N) sum_i sum_l s_l (||rv_il - var_il||_2 + ||rm_il - mean_il||_2)

    over teacher i's BatchNorm layers l, with ``s = [first_rescale, 1, 1, ...]`` per
    teacher (:func:`cdfkd.losses.first_layer_rescale`). Built once by a method;
    ``enabled=False`` (its weight is 0) skips the check and the hooks.
    ``weight_name`` is the config field the refusal tells the user to set to 0.
    """

    def __init__(
        self, teachers, first_rescale: float, weight_name: str, enabled: bool = True
    ) -> None:
        self.teachers = teachers
        self.enabled = enabled
        per_teacher = [[bn for _, bn in layers] for layers in teachers.bn_layers()]
        if enabled and any(len(layers) == 0 for layers in per_teacher):
            raise ValueError(
                f"{weight_name} > 0 but a teacher has no BatchNorm layers: "
                f"set method.{weight_name}=0"
            )
        self.layers = [bn for layers in per_teacher for bn in layers]
        self.rescale = [
            s for layers in per_teacher for s in first_layer_rescale(len(layers), first_rescale)
        ]

    def __call__(self, x: torch.Tensor, features: bool = False):
        """Teacher logits (N, B, C) on ``x`` (their ``FeatureOutput`` with ``features``) and
        the prior () on that batch (None when disabled). Both keep their graph to ``x``."""
        if not self.enabled:
            return self.teachers(x, return_features=features), None
        # Hooks live only for this forward: every other teacher pass (the student
        # steps') computes no statistics and stays hook-free.
        with BNStatsRecorder(self.layers) as rec:
            t = self.teachers(x, return_features=features)
            prior = bn_statistics(*rec.statistics(), rescale=self.rescale)
        return t, prior / self.teachers.num_teachers


class DistillMethod(abc.ABC):
    """Base class: builds student, generator and optimisers from the typed config."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: the registered generator this method trains (cdfkd.generators), None for none.
    generator_kind: ClassVar[str | None] = "dcgan"
    #: kd_real trains on the real training set.
    needs_real_data: ClassVar[bool] = False
    #: the config field weighting the teachers' BN-statistics prior (with the config's
    #: ``bn_first_rescale``): the method gets ``self.bn_prior``; None: no prior.
    bn_prior_weight: ClassVar[str | None] = None
    #: the image pool when ``train.pool`` is unset (chosen by measurement, BENCHMARKS.md)
    default_pool: ClassVar[PoolConfig] = PoolConfig()

    def __init__(
        self, cfg: ExperimentConfig, teachers, info, device: torch.device, train_data=None
    ):
        from cdfkd.generators import create_generator

        self.cfg = cfg
        self.mcfg = cfg.method
        self.info = info
        self.device = device
        self.teachers = teachers.to(device)
        self.train_data = train_data
        if self.needs_real_data and train_data is None:
            raise ValueError(f"method {self.name} trains on real data: pass train_data")
        self.rng = torch.Generator().manual_seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        s = cfg.student
        self.student = s.build(info.num_classes, info.channels, info.image_size).to(device)
        self.num_headers = s.headers
        teacher_targets(torch.zeros(teachers.num_teachers, 1, 1), self.num_headers)  # validates H
        # Training-only trainable parts (e.g. feature projections) live here so
        # the exported student stays the pure classifier.
        self.extra = nn.ModuleDict(self.build_extra()).to(device)
        params = list(self.student.parameters()) + list(self.extra.parameters())
        self.opt_s = build_optimizer(params, cfg.optim)
        self.sched_s = build_schedule(self.opt_s, cfg.optim.schedule, cfg.train.steps)
        self.generator = None
        self.opt_g = None
        self.sched_g = None
        if self.generator_kind is not None:
            g = cfg.generator
            generator = create_generator(self.generator_kind, info, nz=g.nz, width=g.width)
            self.generator = generator.to(device)
            self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=g.lr, betas=g.betas)
            self.sched_g = build_schedule(self.opt_g, cfg.optim.schedule, cfg.train.steps)
        self.bn_prior: TeacherBNPrior | None = None
        if self.bn_prior_weight is not None:
            weight = getattr(self.mcfg, self.bn_prior_weight)
            first = getattr(self.mcfg, "bn_first_rescale")  # noqa: B009 (every BN-prior config has it)
            self.bn_prior = TeacherBNPrior(
                self.teachers, first, self.bn_prior_weight, enabled=weight > 0
            )
        self.pool_cfg = cfg.train.pool or self.default_pool
        self.pooling = self.generator is not None and self.pool_cfg.size > 0
        self._pool: ImagePool | None = None  # built at first use: subclasses set up first
        self._pool_refreshed = False
        self.autocast_dtype = autocast_dtype(cfg.train.precision, device)
        self._fast_path(cfg.train)
        self.step_count = 0

    def _fast_path(self, tc) -> None:
        """channels_last memory format, cuDNN autotuning and ``torch.compile``, as configured.

        ``channels_last`` unset: every model on CUDA; on CPU the generator and the student
        only (measured with benchmarks/throughput.py: 1.75x per round with LeNet-5
        teachers, while CIFAR ResNet teachers ran slower in it).
        """
        if tc.channels_last is None:
            cuda = self.device.type == "cuda"
            modules = [self.student, self.generator] + ([self.teachers] if cuda else [])
        else:
            modules = [self.teachers, self.student, self.generator] if tc.channels_last else []
        for module in modules:
            if module is not None:
                module.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune once per shape
        if tc.compile:
            # In place (nn.Module.compile): state_dict keys, checkpoints and exports stay as they are.
            self.student.compile()
            for teacher in self.teachers.teachers:
                teacher.compile()

    # -- hooks for subclasses -------------------------------------------------
    def build_extra(self) -> dict[str, nn.Module]:
        return {}

    @property
    def pool(self) -> ImagePool | None:
        """The image pool (``train.pool``), or None when off or for methods without a generator."""
        if self.pooling and self._pool is None:
            self._pool = ImagePool(self.pool_cfg.size, keep_stages=self.pool_stages())
        return self._pool

    @property
    def pool_features(self) -> bool:
        """Whether student updates need the teachers' features (not just logits)."""
        return False

    def pool_stages(self) -> set[int]:
        """Teacher stage indices whose maps the pool keeps (for attention transfer)."""
        return set()

    @abc.abstractmethod
    def train_step(self) -> dict[str, torch.Tensor]:
        """One generator/student round; returns named 0-d loss tensors (detached)."""

    # -- the interface the loop uses -------------------------------------------
    def step(self) -> dict[str, torch.Tensor]:
        self.student.train()
        if self.generator is not None:
            self.generator.train()
        self._pool_refreshed = False
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            losses = self.train_step()
        self.sched_s.step()
        if self.sched_g is not None:
            self.sched_g.step()
        self.step_count += 1
        return losses

    @property
    def gen(self) -> LatentGenerator:
        """The generator; methods without one (``generator_kind = None``) never ask."""
        if self.generator is None:
            raise RuntimeError(f"method {self.name} trains no generator")
        return self.generator

    #: preset labels: each class equally often in every batch (True) or i.i.d. uniform
    balanced_labels: bool = False

    def sample_latent(self, batch_size: int, rng: torch.Generator | None = None):
        """Draw z (and class labels y for conditional generators) from the method's own stream."""
        return self.gen.sample(
            batch_size, self.device, rng or self.rng, balanced=self.balanced_labels
        )

    def generate(self, batch_size: int, rng: torch.Generator | None = None):
        """Generated images (with grad to the generator) and their preset labels (or None)."""
        z, y = self.sample_latent(batch_size, rng)
        x = self.gen(z, y) if y is not None else self.gen(z)
        return x, y

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Student logits as (H, B, C), also for single-header students."""
        out = self.student(x)
        return out if out.dim() == 3 else out.unsqueeze(0)

    def student_features(self, x: torch.Tensor) -> FeatureOutput:
        """Student features in per-header form, also for single-header students:
        logits (H, B, C), stages (one list of maps per header), embedding (one (B, D_h)
        tensor per header)."""
        out = self.student(x, return_features=True)
        if out.logits.dim() == 2:  # a plain model is its own single header
            return FeatureOutput(out.logits.unsqueeze(0), [out.stages], [out.embedding])
        return out

    @torch.no_grad()
    def fresh_batch(self, features: bool = False):
        """A new generated batch for a student update, without gradients: ``(x, y, t)``,
        images (B, C, H, W), preset labels (B,) or None, and the teachers' logits
        (N, B, C) (their ``FeatureOutput`` when ``features``)."""
        with record_function("cdfkd.synthesis"):
            x, y = self.generate(self.cfg.train.batch_size)
        with record_function("cdfkd.teacher_forward"):
            t = self.teachers(x, return_features=features)
        return x, y, t

    def student_batch(self, features: bool = False):
        """The batch of a student update, ``(x, y, t)`` as :meth:`fresh_batch` gives it:
        drawn from the image pool when there is one (after this round's ``refresh``
        fresh batches went in), else a fresh batch."""
        pool = self.pool
        if pool is None:
            return self.fresh_batch(features)
        if not self._pool_refreshed or len(pool) == 0:
            self._pool_refreshed = True
            for _ in range(max(self.pool_cfg.refresh, 1 if len(pool) == 0 else 0)):
                pool.add(*self.fresh_batch(self.pool_features))
        with record_function("cdfkd.pool_sample"):
            return pool.sample(self.cfg.train.batch_size, self.rng, features)

    def keep(self, x: torch.Tensor, y: torch.Tensor | None, t) -> None:
        """Put a generator update's batch (detached) in the pool, when there is one: its
        images and teacher outputs were computed anyway, so they cost nothing more."""
        pool = self.pool
        if pool is not None:
            pool.add(x.detach(), y, t)

    def update_student(self, loss: torch.Tensor) -> None:
        """One optimiser step of the student (and ``extra``) on ``loss``."""
        zero_grad(self.opt_s)
        loss.backward()
        self.opt_s.step()

    def update_generator(self, loss: torch.Tensor) -> None:
        """One optimiser step of G on ``loss``. The backward reaches only G's parameters:
        teachers are frozen, and student weight gradients would be thrown away."""
        assert self.opt_g is not None, "update_generator() of a method without a generator"
        zero_grad(self.opt_g)
        loss.backward(inputs=list(self.gen.parameters()))
        self.opt_g.step()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble-of-headers logits (B, C) in eval mode: the mean over headers.

        Eval mode, because a prediction must neither use batch statistics nor
        move the student's BatchNorm running statistics.
        """
        was_training = self.student.training
        self.student.eval()
        try:
            return self.student_logits(x).mean(0)
        finally:
            self.student.train(was_training)

    @torch.no_grad()
    def evaluate(self, loader, max_samples: int | None = None) -> dict:
        """Accuracy of the mean of headers and of each header on ``loader``."""
        from cdfkd.metrics import evaluate_headers

        was_training = self.student.training
        self.student.eval()
        try:
            return evaluate_headers(self.student_logits, loader, self.device, max_samples)
        finally:
            self.student.train(was_training)

    @torch.no_grad()
    def proxy_batches(self, num_batches: int, batch_size: int):
        """Unlabelled batches for the data-free proxy: generated from a held-out seed."""
        rng = torch.Generator().manual_seed(self.cfg.train.seed + PROXY_SEED_OFFSET)
        was_training = self.gen.training
        self.gen.eval()
        try:
            for _ in range(num_batches):
                yield self.generate(batch_size, rng)
        finally:
            self.gen.train(was_training)

    @torch.no_grad()
    def sample_images(self, per_class: int = 8) -> tuple[torch.Tensor, int]:
        """Images for the sample grid: (rows * cols, C, H, W) and the number of columns.

        Conditional generators give one row per class; others one block of 8 x 8.
        """
        if self.generator is None:
            return torch.empty(0), 1
        rng = torch.Generator().manual_seed(self.cfg.train.seed + 7)
        was_training = self.generator.training
        self.generator.eval()
        try:
            if self.generator.conditional:
                c = self.info.num_classes
                y = torch.arange(c).repeat_interleave(per_class).to(self.device)
                z = torch.randn(len(y), self.cfg.generator.nz, generator=rng).to(self.device)
                return self.generator(z, y), per_class
            z = torch.randn(64, self.cfg.generator.nz, generator=rng).to(self.device)
            return self.generator(z), 8
        finally:
            self.generator.train(was_training)

    @torch.no_grad()
    def sample_diversity(self, per_class: int = 32) -> float | None:
        """How varied a conditional generator's images are within each preset class:
        :func:`cdfkd.metrics.within_class_diversity` of the teachers' embeddings (all
        teachers', concatenated) of ``per_class`` images per class drawn from a fixed
        seed in eval mode. 0: one image per class (mode collapse). None without a
        conditional generator."""
        from cdfkd.metrics import within_class_diversity

        if self.generator is None or not self.generator.conditional:
            return None
        rng = torch.Generator().manual_seed(self.cfg.train.seed + 11)
        y = torch.arange(self.info.num_classes).repeat_interleave(per_class).to(self.device)
        z = torch.randn(len(y), self.cfg.generator.nz, generator=rng).to(self.device)
        was_training = self.generator.training
        self.generator.eval()
        embeddings = []
        try:
            # In training-sized chunks (eval mode: per-image, so the value does not depend
            # on the chunking, to rounding): one batch of classes x 32 images is about
            # twice as slow on CPU, and this runs at the end of every sweep trial.
            for zc, yc in zip(
                z.split(self.cfg.train.batch_size), y.split(self.cfg.train.batch_size), strict=True
            ):
                out = self.teachers(self.generator(zc, yc), return_features=True)
                embeddings.append(torch.cat(list(out.embedding), dim=1))
        finally:
            self.generator.train(was_training)
        return within_class_diversity(torch.cat(embeddings), y)

    # -- exact resume ---------------------------------------------------------
    def state_dict(self) -> dict:
        sd = {
            "method": self.name,
            "step": self.step_count,
            "student": self.student.state_dict(),
            "extra": self.extra.state_dict(),
            "opt_s": self.opt_s.state_dict(),
            "sched_s": self.sched_s.state_dict(),
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.generator is not None:
            assert self.opt_g is not None and self.sched_g is not None
            sd["generator"] = self.generator.state_dict()
            sd["opt_g"] = self.opt_g.state_dict()
            sd["sched_g"] = self.sched_g.state_dict()
        pool = self.pool
        if pool is not None:
            sd["pool"] = pool.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("method") != self.name:
            raise ValueError(
                f"checkpoint was written by method {sd.get('method')!r}, not {self.name!r}: "
                "resume with the config that wrote it, or start a fresh --out folder"
            )
        self.student.load_state_dict(sd["student"])
        self.extra.load_state_dict(sd["extra"])
        self.opt_s.load_state_dict(sd["opt_s"])
        self.sched_s.load_state_dict(sd["sched_s"])
        pool = self.pool
        if (pool is None) != ("pool" not in sd):
            raise ValueError(
                "this checkpoint and the config disagree on the image pool (train.pool): "
                "resume with the config that wrote it"
            )
        if pool is not None:
            pool.load_state_dict(sd["pool"], self.device)
        if self.generator is not None:
            assert self.opt_g is not None and self.sched_g is not None
            self.generator.load_state_dict(sd["generator"])
            self.opt_g.load_state_dict(sd["opt_g"])
            self.sched_g.load_state_dict(sd["sched_g"])
        self.rng.set_state(sd["rng"])
        torch.set_rng_state(sd["torch_rng"])
        self.step_count = int(sd["step"])


def zero_grad(*optimizers: torch.optim.Optimizer | None) -> None:
    for opt in optimizers:
        if opt is not None:
            opt.zero_grad(set_to_none=True)


def detached(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in losses.items()}


def mean_losses(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per key, the mean over several updates' losses (keys of the first update)."""
    return {k: torch.stack([step[k] for step in steps]).mean() for k in steps[0]}
