"""The image pool: first in, first out; distinct uniform draws; only the stages it is asked to keep."""

from __future__ import annotations

import pytest
import torch

from cdfkd.methods.pool import ImagePool
from cdfkd.models import FeatureOutput


def _batch(start: int, n: int = 4):
    """Images whose every pixel is their index, labels = index, logits (2, n, 3) = index."""
    idx = torch.arange(start, start + n, dtype=torch.float32)
    x = idx.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    logits = idx.view(1, n, 1).expand(2, n, 3).clone()
    return x, idx.long(), logits


def test_oldest_images_make_room_and_draws_are_distinct():
    pool = ImagePool(6)
    for start in (0, 4, 8):  # 12 images through a pool of 6: 0..5 are gone
        pool.add(*_batch(start))
    assert len(pool) == 6
    x, y, t = pool.sample(6, torch.Generator().manual_seed(0))
    assert sorted(y.tolist()) == [6, 7, 8, 9, 10, 11]
    assert torch.equal(x[:, 0, 0, 0].long(), y) and torch.equal(t[0, :, 0].long(), y)
    draws = [tuple(pool.sample(3, torch.Generator().manual_seed(s))[1].tolist()) for s in range(20)]
    assert all(len(set(d)) == 3 for d in draws) and len(set(draws)) > 1


def test_features_keep_only_the_stages_asked_for_and_round_trip():
    pool = ImagePool(8, keep_stages={-1})
    x, y, logits = _batch(0)
    stages = [[torch.ones(4, 2, 4, 4), torch.full((4, 3, 2, 2), 2.0)] for _ in range(2)]
    pool.add(x, y, FeatureOutput(logits, stages, [torch.zeros(4, 5), torch.zeros(4, 5)]))
    _, _, out = pool.sample(2, torch.Generator().manual_seed(1), features=True)
    assert [s is None for s in out.stages[0]] == [True, False]
    assert out.stages[1][-1].shape == (2, 3, 2, 2) and out.embedding[0].shape == (2, 5)
    again = ImagePool(8, keep_stages={-1})
    again.load_state_dict(pool.state_dict())
    a = pool.sample(4, torch.Generator().manual_seed(2), features=True)
    b = again.sample(4, torch.Generator().manual_seed(2), features=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2].stages[0][1], b[2].stages[0][1])


def test_a_logits_pool_refuses_feature_requests_and_an_empty_pool_refuses_draws():
    with pytest.raises(RuntimeError, match="empty"):
        ImagePool(4).sample(2, torch.Generator())
    pool = ImagePool(4)
    pool.add(*_batch(0))
    with pytest.raises(ValueError, match="no teacher features"):
        pool.sample(2, torch.Generator(), features=True)
