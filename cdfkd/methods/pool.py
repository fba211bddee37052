"""A memory bank of synthesised images with their teacher targets (FastDFKD, CMI, NAYER).

Without a pool, every student update draws a fresh generator batch and runs the
teachers on it; the generator's forward is by far the most expensive part of a round
(about 115 M MACs per 32 px image at width 128, against 0.4 M for a LeNet-5 teacher).
With one, the images a round synthesises anyway (the generator update's batch) and
``refresh`` extra no-grad batches go into a first-in first-out bank of ``size``
images, stored with what a student update needs: the preset labels and the teachers'
outputs. Teachers are frozen, so their outputs for a stored image never change. Each
student update then draws ``B`` distinct images uniformly from the bank. The
generator still learns every round; the student trains on images of the last few
generator states instead of only the current one (Fang et al., "Up to 100x Faster
Data-free Knowledge Distillation", AAAI 2022; "Contrastive Model Inversion", IJCAI
2021; Do et al., NAYER, CVPR 2024, all keep such a bank).

The bank is part of the method's state: it is saved in the checkpoint and restored
exactly, so ``--resume`` stays bit-for-bit on CPU.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cdfkd.models import FeatureOutput
from cdfkd.schema import Strict


class PoolConfig(Strict):
    """``train.pool``: the image pool of generator-based methods (unset: the method's default)."""

    size: int = Field(0, ge=0, le=1_000_000, description="images kept; 0: off (fresh batches)")
    refresh: int = Field(
        0,
        ge=0,
        le=100,
        description="extra no-grad generator batches added per round, beside the generator "
        "update's own batch",
    )


class ImagePool:
    """``capacity`` images ``(C, H, W)`` with optional labels and the teachers' outputs.

    ``keep_stages``: the teacher stage indices whose maps are stored (negative counts
    from the end; None: all, an empty set: none), so that a method that needs only
    logits and embeddings does not store every stage map of every image.
    """

    def __init__(self, capacity: int, keep_stages: set[int] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"an image pool needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.keep_stages = keep_stages
        self.filled = 0
        self.cursor = 0  # where the next image goes (the oldest one once full)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # (N, capacity, C)
        self.embedding: list[torch.Tensor] | None = None  # per teacher (capacity, D)
        self.stages: list[list[torch.Tensor | None]] | None = None  # per teacher, per stage

    def __len__(self) -> int:
        return self.filled

    # -- writing

    def _kept(self, k: int, count: int) -> bool:
        return self.keep_stages is None or k in self.keep_stages or k - count in self.keep_stages

    def _allocate(self, x, y, t) -> None:
        cap, logits = self.capacity, t.logits if isinstance(t, FeatureOutput) else t

        def empty_like(v: torch.Tensor, dim: int = 0) -> torch.Tensor:
            shape = list(v.shape)
            shape[dim] = cap
            return torch.empty(shape, dtype=v.dtype, device=v.device)

        self.x = empty_like(x)
        self.y = None if y is None else empty_like(y)
        self.logits = empty_like(logits, dim=1)
        if isinstance(t, FeatureOutput):
            self.embedding = [empty_like(e) for e in t.embedding]
            self.stages = [
                [empty_like(s) if self._kept(k, len(maps)) else None for k, s in enumerate(maps)]
                for maps in t.stages
            ]

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor | None, t) -> None:
        """Store a batch: images (B, C, H, W), labels (B,) or None, teacher logits (N, B, C)
        or their ``FeatureOutput``. The oldest images make room once the pool is full."""
        if self.x is None:
            self._allocate(x, y, t)
        assert self.x is not None and self.logits is not None
        b = min(x.shape[0], self.capacity)
        idx = (torch.arange(b, device=x.device) + self.cursor) % self.capacity
        self.x[idx] = x[:b].detach()
        if self.y is not None and y is not None:
            self.y[idx] = y[:b]
        logits = t.logits if isinstance(t, FeatureOutput) else t
        self.logits[:, idx] = logits[:, :b].detach()
        if self.embedding is not None:
            if not isinstance(t, FeatureOutput):
                raise ValueError("this pool stores teacher features: add a FeatureOutput")
            assert self.stages is not None
            for emb, e in zip(self.embedding, t.embedding, strict=True):
                emb[idx] = e[:b].detach()
            for kept, maps in zip(self.stages, t.stages, strict=True):
                for stage, m in zip(kept, maps, strict=True):
                    if stage is not None:
                        stage[idx] = m[:b].detach()
        self.cursor = (self.cursor + b) % self.capacity
        self.filled = min(self.capacity, self.filled + b)

    # -- reading

    def sample(self, batch_size: int, rng: torch.Generator, features: bool = False):
        """``batch_size`` distinct stored images drawn uniformly (with ``rng``, on CPU):
        ``(x, y, t)`` as a fresh batch would give them, ``t`` logits (N, B, C) or, with
        ``features``, a ``FeatureOutput`` (stages that are not kept are None)."""
        if self.x is None or self.logits is None or self.filled == 0:
            raise RuntimeError("the image pool is empty: add a batch first")
        pick = torch.randperm(self.filled, generator=rng)[:batch_size].to(self.x.device)
        x = self.x[pick]
        y = None if self.y is None else self.y[pick]
        logits = self.logits[:, pick]
        if not features:
            return x, y, logits
        if self.embedding is None or self.stages is None:
            raise ValueError("this pool stores no teacher features (it was filled with logits)")
        stages = [[None if s is None else s[pick] for s in maps] for maps in self.stages]
        return x, y, FeatureOutput(logits, stages, [e[pick] for e in self.embedding])

    # -- exact resume

    def state_dict(self) -> dict:
        return {
            "filled": self.filled,
            "cursor": self.cursor,
            "x": self.x,
            "y": self.y,
            "logits": self.logits,
            "embedding": self.embedding,
            "stages": self.stages,
        }

    def load_state_dict(self, sd: dict, device: torch.device | str = "cpu") -> None:
        def to(v):
            return None if v is None else v.to(device)

        self.filled, self.cursor = int(sd["filled"]), int(sd["cursor"])
        self.x, self.y, self.logits = to(sd["x"]), to(sd["y"]), to(sd["logits"])
        emb, stages = sd["embedding"], sd["stages"]
        self.embedding = None if emb is None else [to(e) for e in emb]
        self.stages = None if stages is None else [[to(s) for s in maps] for maps in stages]
