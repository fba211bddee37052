"""Attention-based aggregation of header predictions (CDFKD-MFS), on synthetic headers.

The "student" here is a fixed function whose headers are known: one informative
header and two that emit random noise, so the learned weighting has something real
to find. Selection uses held-out few-shot samples, never the test set.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cdfkd import aggregation
from cdfkd.aggregation import (
    HeaderAttention,
    aggregate_run,
    holdout_split,
    run_aggregation,
    train_aggregator,
)
from cdfkd.config import AggregationConfig, build_config
from cdfkd.models import create_student

C, H = 10, 3


def test_header_attention_matches_a_hand_computation():
    att = HeaderAttention(C)
    with torch.no_grad():
        att.score.weight.copy_(torch.linspace(-1, 1, C).view(1, C))
        att.score.bias.fill_(0.3)
    logits = torch.randn(H, 4, C, generator=torch.Generator().manual_seed(0))
    w, c = att.score.weight[0].detach(), 0.3
    expected = torch.zeros(4, C)
    for b in range(4):
        scores = torch.tensor([float(logits[h, b] @ w + c) for h in range(H)])
        alpha = scores.exp() / scores.exp().sum()
        for h in range(H):
            expected[b] += alpha[h] * logits[h, b]
    torch.testing.assert_close(att(logits), expected)
    torch.testing.assert_close(att.weights(logits).sum(1), torch.ones(4))


def test_untrained_attention_is_plain_averaging():
    logits = torch.randn(H, 5, C)
    torch.testing.assert_close(HeaderAttention(C)(logits), logits.mean(0))


class _Synthetic(Dataset):
    """Items ``(x, y)`` with ``x`` the (H, C) header logits themselves.

    Header 0 is informative (a margin on the true class); headers 1 and 2 are noise
    with a different logit level, which a linear score can tell apart.
    """

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = (torch.arange(n) % C).tolist()
        y = torch.tensor(self.targets)
        good = 3.0 * nn.functional.one_hot(y, C).float() + 0.7 * torch.randn(n, C, generator=g)
        noise = 3.0 * torch.randn(2, n, C, generator=g) - 1.0
        self.x = torch.cat([good[None], noise]).permute(1, 0, 2).contiguous()  # (n, H, C)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


class _FixedHeaders(nn.Module):
    """A frozen "student": (B, H, C) inputs -> (H, B, C) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # so .eval()/.parameters() behave

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(1, 0, 2) + self.anchor


def _logits_fn(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def test_learned_aggregation_beats_averaging_on_held_out_data():
    few_shot = _Synthetic(10 * C, seed=1)  # M = 10 per class
    model, info = train_aggregator(_logits_fn, few_shot, C, epochs=60, lr=0.05, seed=0)
    assert info["selection"] == "holdout"
    assert info["samples_used"] == 10 * C
    assert info["holdout_samples"] == 3 * C  # floor(10 / 3) per class
    test = _Synthetic(2000, seed=2)
    logits, y = test.x.permute(1, 0, 2), torch.tensor(test.targets)
    averaging = _accuracy(logits.mean(0), y)
    with torch.no_grad():
        aggregated = _accuracy(model(logits), y)
        weights = model.weights(logits).mean(0)
    assert aggregated > averaging + 0.15, (averaging, aggregated)
    assert weights[0] > 0.5  # it learned to trust the informative header (uniform: 1/3)


@pytest.mark.parametrize(("m", "held"), [(1, 0), (2, 1), (3, 1), (5, 1), (6, 2), (9, 3)])
def test_holdout_is_a_third_per_class_at_least_one(m, held):
    labels = torch.arange(C).repeat(m)
    train, hold = holdout_split(labels, seed=0)
    assert len(hold) == held * C and len(train) == (m - held) * C
    assert set(train.tolist()).isdisjoint(hold.tolist())
    if held:
        assert torch.bincount(labels[hold], minlength=C).tolist() == [held] * C


class _GuardedLoader:
    """A test loader that refuses to be read until selection is over, and counts reads."""

    def __init__(self, dataset: Dataset) -> None:
        self.loader = DataLoader(dataset, batch_size=256)
        self.open = False
        self.reads = 0

    def __iter__(self):
        if not self.open:
            raise AssertionError("the test set was read before the aggregator was selected")
        self.reads += 1
        return iter(self.loader)


def _run(monkeypatch, tmp_path, few_shot: int):
    test_loader = _GuardedLoader(_Synthetic(500, seed=3))
    real_train = aggregation.train_aggregator

    def train_then_open(*args, **kwargs):
        out = real_train(*args, **kwargs)
        test_loader.open = True  # selection is done: only now may the report read the test set
        return out

    monkeypatch.setattr(aggregation, "train_aggregator", train_then_open)
    method = SimpleNamespace(student=_FixedHeaders().train(), info=SimpleNamespace(num_classes=C))
    cfg = AggregationConfig(few_shot=few_shot, epochs=30, lr=0.05)
    result = run_aggregation(method, _Synthetic(40 * C, seed=4), test_loader, cfg, "cpu", tmp_path)
    assert test_loader.reads == 1  # the final report, once
    assert method.student.training  # the caller's mode is restored
    return result


def test_run_aggregation_selects_without_the_test_set(monkeypatch, tmp_path):
    result = _run(monkeypatch, tmp_path, few_shot=6)
    assert result["few_shot"] == 6
    assert result["selection"] == "holdout"
    assert result["samples_used"] == 6 * C
    assert 0.0 <= result["holdout_accuracy"] <= 1.0
    assert result["aggregated_accuracy"] > result["averaging_accuracy"]
    state = torch.load(tmp_path / "aggregator.pt", weights_only=True)
    assert set(state) == {"score.weight", "score.bias"}


def test_one_shot_selects_on_training_loss(monkeypatch, tmp_path):
    result = _run(monkeypatch, tmp_path, few_shot=1)
    assert result["selection"] == "train_loss"
    assert result["holdout_accuracy"] is None
    assert result["samples_used"] == C
    assert (tmp_path / "aggregator.pt").is_file()


def test_aggregate_run_updates_a_finished_run(tmp_path):
    raw = {
        "method": {"name": "cdfkd_mfs"},
        "teachers": {"path": "unused"},
        "data": {"name": "digits", "root": str(tmp_path / "data")},
        "student": {"arch": "lenet5_half", "family": "mfs", "headers": 3},
        "aggregation": {"epochs": 5},
    }
    cfg = build_config(raw)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.manual_seed(0)
    student = create_student("lenet5_half", 10, 1, 32, family="mfs", headers=3)
    torch.save(student.state_dict(), tmp_path / "student.pt")
    (tmp_path / "result.json").write_text(json.dumps({"student_accuracy": 0.1}))

    agg = aggregate_run(tmp_path, few_shot=2, device="cpu")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["student_accuracy"] == 0.1  # the rest of the result is kept
    assert result["aggregation"] == agg
    assert agg["few_shot"] == 2 and agg["selection"] == "holdout" and agg["samples_used"] == 20
    assert (tmp_path / "aggregator.pt").is_file()


def test_aggregate_run_refuses_an_unfinished_run(tmp_path):
    from cdfkd.config import ConfigError

    with pytest.raises(ConfigError, match="config.yaml is missing"):
        aggregate_run(tmp_path, few_shot=2)
