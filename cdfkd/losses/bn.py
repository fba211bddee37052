"""BatchNorm-statistics prior (DeepInversion, Yin et al. CVPR 2020; CDFKD-MFS generator step).

Synthetic images should produce, at the input of every teacher BN layer, the
per-channel mean and variance that the layer recorded on real data. The batch
statistics are captured by :class:`cdfkd.bn_hooks.BNStatsRecorder`; this
module only turns them into a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["bn_statistics", "first_layer_rescale"]


def first_layer_rescale(n_layers: int, first: float = 5.0) -> list[float]:
    """Per-layer weights ``[first, 1, 1, ...]`` of length ``n_layers``.

    CDFKD-MFS weights the first BN layer x5; DeepInversion on large images x10.
    """
    if n_layers < 0:
        raise ValueError(f"first_layer_rescale: n_layers must be >= 0, got {n_layers}")
    return [float(first)] + [1.0] * (n_layers - 1) if n_layers else []


def bn_statistics(
    batch_means: Sequence[torch.Tensor],
    batch_vars: Sequence[torch.Tensor],
    running_means: Sequence[torch.Tensor],
    running_vars: Sequence[torch.Tensor],
    rescale: Sequence[float] | None = None,
) -> torch.Tensor:
    """``sum_l s_l * ( ||rv_l - var_l||_2 + ||rm_l - mean_l||_2 )``.

    Plain (not squared) L2 norms of the per-channel difference vectors, as in
    DeepInversion and CDFKD-MFS; ``s_l`` = ``rescale[l]`` (all ones if None;
    see :func:`first_layer_rescale`). ``var_l`` is the *biased* batch variance
    of the BN input. Callers combining several teachers divide by their count
    themselves (CDFKD-MFS uses ``w_bns * sum / N``).

    Shapes: four sequences of L tensors; layer l holds ``(C_l,)`` vectors.
    Returns ``()``. Raises ``ValueError`` on mismatched lengths or no layers.
    """
    n = len(batch_means)
    lengths = {len(batch_vars), len(running_means), len(running_vars), n}
    if len(lengths) != 1:
        raise ValueError(
            "bn_statistics: the four statistic lists differ in length "
            f"({n}, {len(batch_vars)}, {len(running_means)}, {len(running_vars)}); give one entry "
            "per layer in each"
        )
    if n == 0:
        raise ValueError(
            "bn_statistics: no BatchNorm layers given; the teachers have no BN, so drop "
            "the BN prior (set its weight to 0)"
        )
    if rescale is None:
        rescale = [1.0] * n
    elif len(rescale) != n:
        raise ValueError(
            f"bn_statistics: rescale has {len(rescale)} weights for {n} layers; "
            "give one per layer, e.g. first_layer_rescale(n_layers)"
        )
    total = None
    for mean, var, rmean, rvar, s in zip(
        batch_means, batch_vars, running_means, running_vars, rescale, strict=True
    ):
        r = torch.linalg.vector_norm(rvar - var) + torch.linalg.vector_norm(rmean - mean)
        term = s * r
        total = term if total is None else total + term
    assert total is not None  # n >= 1 layers (checked above)
    return total
