"""Attention-based aggregation of a multi-header student's predictions (CDFKD-MFS, Hao et al.,
IEEE TMM 2022; ICME 2021 "adaptive outputs aggregation").

When a few real labelled samples are available, the headers' logits s_h (h = 1..H) are
combined per sample with learned weights instead of a plain mean:

    score_{b,h} = w . s_h[b] + c              one Linear(C -> 1) shared by the headers
    alpha_{b,.} = softmax_h(score_{b,.})
    y_hat[b]    = sum_h alpha_{b,h} s_h[b]

It is trained with cross-entropy on M samples per class (student frozen, its logits
computed once). The checkpoint (the epoch with the best accuracy, ties to the lower
loss; epoch 0 is the untrained module, which equals plain averaging) is chosen on a
held-out part of those samples: floor(M/3) per class, at least 1 when M >= 2. For
M = 1 there is nothing to hold out and the lowest training loss decides (the result
says ``"selection": "train_loss"``). The test set is used only for the final report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cdfkd.config import AggregationConfig
from cdfkd.data import class_balanced_subset
from cdfkd.device import resolve_device
from cdfkd.files import torch_save_atomic
from cdfkd.runs import AGGREGATOR, RunDir

log = logging.getLogger(__name__)


class HeaderAttention(nn.Module):
    """Per-sample softmax weights over headers from one shared ``Linear(C -> 1)``.

    ``forward(logits (H, B, C)) -> (B, C)``; :meth:`weights` gives ``alpha`` as (B, H).
    The scorer starts at zero, so an untrained module is the plain mean of the headers.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.score = nn.Linear(num_classes, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3:
            raise ValueError(f"HeaderAttention expects (H, B, C) logits, got {tuple(logits.shape)}")
        return torch.softmax(self.score(logits).squeeze(-1), dim=0).T  # (B, H)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bh,hbc->bc", self.weights(logits), logits)


@torch.no_grad()
def _precompute(logits_fn: Callable, dataset: Dataset, device, batch_size: int = 256):
    """Logits (H, n, C) and labels (n,) of a whole (small) dataset, on ``device``."""
    chunks, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out = logits_fn(x.to(device))
        chunks.append(out if out.dim() == 3 else out.unsqueeze(0))
        labels.append(torch.as_tensor(y, device=device))
    return torch.cat(chunks, dim=1).float(), torch.cat(labels).long()


def holdout_split(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, hold out floor(m/3) samples (at least 1 when m >= 2, none when m = 1).

    ``labels`` (n,). Returns (train indices, holdout indices), each sorted; deterministic in seed.
    """
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    train, hold = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        m = len(members)
        k = 0 if m < 2 else max(1, m // 3)
        hold.extend(members[:k].tolist())
        train.extend(members[k:].tolist())
    train_idx, hold_idx = (torch.tensor(sorted(idx), dtype=torch.long) for idx in (train, hold))
    return train_idx, hold_idx


def train_aggregator(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    few_shot_dataset: Dataset,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 100,
) -> tuple[HeaderAttention, dict]:
    """Fit a :class:`HeaderAttention` on a few labelled samples; select it on held-out ones.

    ``logits_fn(x (B, ...)) -> (H, B, C)``, called once per sample under no_grad (the
    caller puts the student in eval mode). ``few_shot_dataset`` yields ``(x, y)``: the
    M-per-class set, split here with :func:`holdout_split`. Adam(lr), ``epochs`` passes
    of shuffled ``batch_size`` batches (torch generator seeded with ``seed``).

    Returns the selected module (on ``device``) and ``{"selection": "holdout" |
    "train_loss", "holdout_accuracy": float | None, "best_epoch": int,
    "samples_used": n, "train_samples": n_train, "holdout_samples": n_hold}``.
    """
    device = torch.device(device)
    logits, labels = _precompute(logits_fn, few_shot_dataset, device)
    train_idx, hold_idx = holdout_split(labels, seed)
    train_idx, hold_idx = train_idx.to(device), hold_idx.to(device)
    use_holdout = len(hold_idx) > 0
    sel_logits, sel_labels = (
        (logits[:, hold_idx], labels[hold_idx])
        if use_holdout
        else (logits[:, train_idx], labels[train_idx])
    )

    gen = torch.Generator().manual_seed(seed)
    model = HeaderAttention(num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    @torch.no_grad()
    def score() -> tuple[float, float]:
        out = model(sel_logits)
        accuracy = (out.argmax(-1) == sel_labels).float().mean().item()
        return accuracy, F.cross_entropy(out, sel_labels).item()

    def better(cand: tuple[float, float], best: tuple[float, float]) -> bool:
        if use_holdout:  # higher accuracy, then lower loss
            return cand[0] > best[0] or (cand[0] == best[0] and cand[1] < best[1])
        return cand[1] < best[1]

    best = score()
    best_epoch, best_state = 0, {k: v.clone() for k, v in model.state_dict().items()}
    n = len(train_idx)
    for epoch in range(1, epochs + 1):
        order = train_idx[torch.randperm(n, generator=gen).to(device)]
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(logits[:, idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        cand = score()
        if better(cand, best):
            best, best_epoch = cand, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    info = {
        "selection": "holdout" if use_holdout else "train_loss",
        "holdout_accuracy": best[0] if use_holdout else None,
        "best_epoch": best_epoch,
        "samples_used": len(labels),
        "train_samples": len(train_idx),
        "holdout_samples": len(hold_idx),
    }
    return model, info


@torch.no_grad()
def _test_accuracies(
    logits_fn: Callable, model: HeaderAttention, loader, device
) -> tuple[float, float]:
    """(averaging accuracy, aggregated accuracy) over ``loader`` in one pass."""
    correct_avg = correct_agg = seen = 0
    for x, y in loader:
        logits = logits_fn(x.to(device))
        logits = logits if logits.dim() == 3 else logits.unsqueeze(0)
        y = y.to(device)
        correct_avg += (logits.mean(0).argmax(-1) == y).sum().item()
        correct_agg += (model(logits.float()).argmax(-1) == y).sum().item()
        seen += len(y)
    if seen == 0:
        raise ValueError("the test set is empty")
    return correct_avg / seen, correct_agg / seen


def _aggregate(
    logits_fn, train_ds, test_loader, agg_cfg: AggregationConfig, num_classes, device, out_dir
):
    m = agg_cfg.few_shot
    if m < 1:
        raise ValueError("aggregation needs few_shot >= 1 real samples per class")
    subset = class_balanced_subset(train_ds, m, seed=agg_cfg.seed)
    model, info = train_aggregator(
        logits_fn,
        subset,
        num_classes,
        epochs=agg_cfg.epochs,
        lr=agg_cfg.lr,
        seed=agg_cfg.seed,
        device=device,
    )
    # The test set is read here, after selection, and only to report.
    avg_acc, agg_acc = _test_accuracies(logits_fn, model, test_loader, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(model.state_dict(), out / AGGREGATOR)
    log.info("aggregation (M=%d): averaging %.4f -> aggregated %.4f", m, avg_acc, agg_acc)
    return {
        "few_shot": m,
        "averaging_accuracy": avg_acc,
        "aggregated_accuracy": agg_acc,
        "selection": info["selection"],
        "holdout_accuracy": info["holdout_accuracy"],
        "samples_used": info["samples_used"],
        "best_epoch": info["best_epoch"],
    }


def _frozen_logits_fn(student: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    student.eval()

    @torch.no_grad()
    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        out = student(x)
        return out if out.dim() == 3 else out.unsqueeze(0)

    return logits_fn


def run_aggregation(
    method, train_ds, test_loader, agg_cfg: AggregationConfig, device, out_dir
) -> dict:
    """Train the aggregator for a finished method's student; save ``out_dir/aggregator.pt``.

    ``train_ds`` supplies the ``agg_cfg.few_shot`` samples per class (pass it without
    augmentation). Returns ``{"few_shot", "averaging_accuracy", "aggregated_accuracy",
    "selection", "holdout_accuracy", "samples_used", "best_epoch"}`` (accuracies in [0, 1]
    on ``test_loader``; ``holdout_accuracy`` is None when selection is "train_loss").
    """
    was_training = method.student.training
    try:
        return _aggregate(
            _frozen_logits_fn(method.student),
            train_ds,
            test_loader,
            agg_cfg,
            method.info.num_classes,
            device,
            out_dir,
        )
    finally:
        method.student.train(was_training)


def aggregate_run(run_dir, few_shot: int, device=None, data_root=None) -> dict:
    """Aggregate a finished run's headers: ``cdfkd aggregate RUN_DIR --few-shot M``.

    Rebuilds the student from ``run_dir/config.yaml`` and ``run_dir/student.pt``, trains
    the aggregator (settings from the run's ``aggregation`` section, ``few_shot`` from
    the argument), saves ``aggregator.pt`` and writes the result into the ``aggregation``
    entry of ``run_dir/result.json`` (created if the run has none). ``data_root``
    overrides the config's ``data.root``; ``device`` None picks cuda when available.
    """
    run = RunDir(run_dir)
    cfg = run.read_config([f"aggregation.few_shot={few_shot}"])
    if data_root is not None:
        cfg.data.root = str(data_root)
    device = resolve_device(device or "auto")
    train_ds, test_ds, info = cfg.data.load(augment=False)
    student, _ = run.load_student(device, info)
    test_loader = DataLoader(test_ds, batch_size=cfg.train.eval_batch_size, shuffle=False)
    agg = _aggregate(
        _frozen_logits_fn(student),
        train_ds,
        test_loader,
        cfg.aggregation,
        info.num_classes,
        device,
        run.path,
    )
    run.update_result("aggregation", agg)
    return agg
