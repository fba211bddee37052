"""Losses against hand computations (numpy or literal numbers), plus the BN hook recorder."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cdfkd import losses
from cdfkd.bn_hooks import BNStatsRecorder, batchnorm_layers


def _t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


S = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
T = [[3.0, 2.0, 1.0], [1.0, 0.0, -2.0]]


# --- distillation losses ----------------------------------------------------------------------


def test_kd_kl_literal_value():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = losses.kd_kl(_t([[0.0, 0.0]]), _t([[math.log(3.0), 0.0]]))
    assert got.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_kl_matches_numpy_with_t_squared(temperature):
    s, t = np.array(S), np.array(T)
    p_s, p_t = _np_softmax(s / temperature), _np_softmax(t / temperature)
    expected = (p_t * (np.log(p_t) - np.log(p_s))).sum() / len(s) * temperature**2
    got = losses.kd_kl(_t(S), _t(T), temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_kd_kl_temperature_scaling_is_t_squared():
    s, t = _t(S), _t(T)
    assert losses.kd_kl(3 * s, 3 * t, temperature=3.0).item() == pytest.approx(
        9 * losses.kd_kl(s, t).item(), rel=1e-10
    )


def test_kd_kl_flattens_leading_dims():
    s, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.allclose(losses.kd_kl(s, t), losses.kd_kl(s.reshape(12, 5), t.reshape(12, 5)))


def test_l1_and_adversarial_literal():
    # |1-3| + |2-2| + |3-1| + |0.5-1| + |-1-0| + |0+2| = 7.5 over 6 entries
    assert losses.l1_logits(_t(S), _t(T)).item() == pytest.approx(7.5 / 6)
    assert losses.adversarial_discrepancy(_t(S), _t(T)).item() == pytest.approx(7.5 / 6)
    kl = losses.adversarial_discrepancy(_t(S), _t(T), kind="kl", temperature=2.0)
    assert kl.item() == pytest.approx(losses.kd_kl(_t(S), _t(T), temperature=2.0).item())
    with pytest.raises(ValueError, match="kind"):
        losses.adversarial_discrepancy(_t(S), _t(T), kind="js")


def test_preset_label_ce_matches_numpy():
    y = [2, 0]
    log_p = np.log(_np_softmax(np.array(S)))
    expected = -(log_p[0, 2] + log_p[1, 0]) / 2
    got = losses.preset_label_ce(_t(S), torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError):
        losses.preset_label_ce(_t(S), torch.tensor([0, 1, 2]))


def test_feature_l1_sums_features_and_averages_batch():
    fs = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    ft = [[0.0, 2.0, 5.0], [1.0, -1.0, 0.5]]
    # row 0: 1 + 0 + 2 = 3; row 1: 1 + 1 + 0.5 = 2.5; mean 2.75
    assert losses.feature_l1(_t(fs), _t(ft)).item() == pytest.approx(2.75)
    with pytest.raises(ValueError, match="shapes differ"):
        losses.feature_l1(torch.zeros(2, 3), torch.zeros(2, 4))


# --- generator priors -----------------------------------------------------------------------


def test_information_entropy_matches_numpy_and_bounds():
    p_bar = _np_softmax(np.array(T)).mean(axis=0)
    expected = (p_bar * np.log(p_bar)).sum()
    assert losses.information_entropy(_t(T)).item() == pytest.approx(expected, rel=1e-10)
    # uniform mean prediction: minimum value -ln C
    uniform = losses.information_entropy(torch.zeros(4, 7, dtype=torch.float64))
    assert uniform.item() == pytest.approx(-math.log(7))


def test_information_entropy_ensemble_averages_probabilities():
    logits = np.array([S, T])  # (N=2, B=2, C=3)
    p_bar = _np_softmax(logits).mean(axis=(0, 1))
    expected = (p_bar * np.log(p_bar)).sum()
    got = losses.information_entropy(_t(logits.tolist()))
    assert got.item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError):
        losses.information_entropy(torch.zeros(3))


def test_information_entropy_gradient_finite_for_saturated_logits():
    logits = _t([[200.0, -200.0, 0.0], [150.0, -300.0, 0.0]], grad=True)
    value = losses.information_entropy(logits)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12)  # all mass on class 0
    assert torch.isfinite(logits.grad).all()


def test_one_hot_and_activation():
    log_p = np.log(_np_softmax(np.array(T)))
    expected = -(log_p[0, 0] + log_p[1, 0]) / 2  # argmax of both rows is class 0
    assert losses.one_hot(_t(T)).item() == pytest.approx(expected, rel=1e-10)
    assert losses.activation(_t([[1.0, -2.0], [0.0, 3.0]])).item() == pytest.approx(-1.5)


def test_total_variation_literal():
    img = _t([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    # right: (-1, -1); down: (-2, -2); anti-diagonal: 2 - 1 = 1; diagonal: 0 - 3 = -3
    norm = math.sqrt(2) + math.sqrt(8) + 1 + 3
    assert losses.total_variation(img).item() == pytest.approx(norm)
    assert losses.total_variation(img, reduction="mean").item() == pytest.approx(1 + 4 + 1 + 9)
    assert losses.total_variation(torch.ones(2, 3, 5, 5)).item() == 0.0


# --- attention transfer ---------------------------------------------------------------------


def _np_at_map(feature, size=None):
    q = (np.abs(feature) ** 2).mean(axis=1)  # (B, H, W)
    if size is not None and q.shape[1:] != size:
        b, h, w = q.shape
        fh, fw = h // size[0], w // size[1]
        q = q.reshape(b, size[0], fh, size[1], fw).mean(axis=(2, 4))
    q = q.reshape(q.shape[0], -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_attention_map_literal():
    feat = np.array([[[[1.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    # Q = mean_c A^2 = (1, 0, 0, 0.5); ||Q|| = sqrt(1.25)
    expected = np.array([[1.0, 0.0, 0.0, 0.5]]) / math.sqrt(1.25)
    got = losses.attention_map(_t(feat.tolist()))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_attention_transfer_same_size_two_stages_summed():
    rng = np.random.default_rng(0)
    s1, t1 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))
    s2, t2 = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 6, 2, 2))
    expected = sum(((_np_at_map(s) - _np_at_map(t)) ** 2).mean() for s, t in [(s1, t1), (s2, t2)])
    got = losses.attention_transfer([_t(s1), _t(s2)], [_t(t1), _t(t2)])
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_attention_transfer_resize_pools_larger_map():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 4, 4, 4))
    expected = ((_np_at_map(s, (4, 4)) - _np_at_map(t)) ** 2).mean()
    got = losses.attention_transfer([_t(s)], [_t(t)])
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # symmetric: the teacher map is pooled when it is the larger one
    swapped = losses.attention_transfer([_t(t)], [_t(s)])
    assert swapped.item() == pytest.approx(expected, rel=1e-10)


def test_attention_transfer_validates_lists():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="pair every stage"):
        losses.attention_transfer([a, a], [a])
    with pytest.raises(ValueError, match="at least one"):
        losses.attention_transfer([], [])
    with pytest.raises(ValueError, match="batch sizes"):
        losses.attention_transfer([a], [torch.randn(3, 3, 4, 4)])


# --- BN-statistics prior --------------------------------------------------------------------


def test_first_layer_rescale():
    assert losses.first_layer_rescale(4) == [5.0, 1.0, 1.0, 1.0]
    assert losses.first_layer_rescale(1, first=10) == [10.0]
    assert losses.first_layer_rescale(0) == []


def test_bn_statistics_literal_with_rescale():
    means = [_t([1.0, 2.0]), _t([0.0, 0.0, 3.0])]
    vars_ = [_t([1.0, 1.0]), _t([2.0, 2.0, 2.0])]
    r_means = [_t([1.0, 0.0]), _t([0.0, 4.0, 0.0])]
    r_vars = [_t([4.0, 5.0]), _t([2.0, 2.0, 2.0])]
    # layer 0: ||(3, 4)|| + ||(0, -2)|| = 5 + 2 = 7; layer 1: 0 + ||(0, 4, -3)|| = 5
    assert losses.bn_statistics(means, vars_, r_means, r_vars).item() == pytest.approx(12.0)
    weighted = losses.bn_statistics(means, vars_, r_means, r_vars, rescale=[5.0, 1.0])
    assert weighted.item() == pytest.approx(5 * 7 + 5)
    with pytest.raises(ValueError, match="rescale"):
        losses.bn_statistics(means, vars_, r_means, r_vars, rescale=[1.0])
    with pytest.raises(ValueError, match="length"):
        losses.bn_statistics(means, vars_[:1], r_means, r_vars)


# --- shared properties ----------------------------------------------------------------------


def test_identical_inputs_give_zero_loss():
    x = torch.randn(4, 10)
    maps = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4)]
    stats = [torch.rand(6), torch.rand(7)]
    assert losses.kd_kl(x, x, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.l1_logits(x, x).item() == 0.0
    assert losses.feature_l1(x, x).item() == 0.0
    assert losses.attention_transfer(maps, maps).item() == 0.0
    assert losses.bn_statistics(stats, stats, stats, stats).item() == 0.0


@pytest.mark.parametrize(
    "loss",
    [
        lambda s, t: losses.kd_kl(s, t, temperature=2.0),
        losses.l1_logits,
        losses.feature_l1,
        lambda s, t: losses.preset_label_ce(s, t.argmax(-1)),
    ],
    ids=["kd_kl", "l1_logits", "feature_l1", "preset_label_ce"],
)
def test_gradient_reaches_student_logits(loss):
    s = torch.randn(4, 6, requires_grad=True)
    loss(s, torch.randn(4, 6)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_gradient_reaches_student_features_through_attention():
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    losses.attention_transfer([s], [torch.randn(2, 4, 4, 4)]).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --- BN hook recorder -----------------------------------------------------------------------


def _bn_net():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.Flatten(),
        nn.Linear(5 * 6 * 6, 8),
        nn.BatchNorm1d(8),
    )
    for bn in batchnorm_layers(net):  # non-trivial running stats
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return net.eval()


def test_recorder_captures_input_statistics():
    net = _bn_net()
    x = torch.randn(4, 3, 6, 6)
    with BNStatsRecorder(batchnorm_layers(net)) as rec:
        assert len(rec) == 3
        net(x)
        means, vars_, r_means, r_vars = rec.statistics()
    inputs = [net[0](x), net[3](net[2](net[1](net[0](x))))]
    inputs.append(net[6](net[5](net[4](inputs[1]))))
    for got_m, got_v, inp in zip(means, vars_, inputs, strict=True):
        a = inp.detach().double().numpy()
        axes = (0, 2, 3) if a.ndim == 4 else (0,)
        np.testing.assert_allclose(got_m.detach().numpy(), a.mean(axis=axes), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_v.detach().numpy(), a.var(axis=axes), rtol=1e-4, atol=1e-6)
    for got, bn in zip(r_means + r_vars, [*batchnorm_layers(net)] * 2, strict=True):
        assert got.shape == bn.running_mean.shape
    assert torch.equal(r_vars[0], net[1].running_var)


def test_recorder_gradient_flows_to_input():
    net = _bn_net()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    with BNStatsRecorder(batchnorm_layers(net)) as rec:
        net(x)
        loss = losses.bn_statistics(*rec.statistics(), rescale=losses.first_layer_rescale(len(rec)))
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_cleared_recorder_has_no_statistics():
    net = _bn_net()
    rec = BNStatsRecorder(batchnorm_layers(net))
    net(torch.randn(2, 3, 6, 6))
    assert len(rec.statistics()[0]) == 3
    rec.clear()
    with pytest.raises(RuntimeError, match="missing"):
        rec.statistics()
    rec.close()


def test_recorder_close_removes_hooks():
    net = _bn_net()
    rec = BNStatsRecorder(batchnorm_layers(net))
    assert all(len(bn._forward_hooks) == 1 for bn in batchnorm_layers(net))
    rec.close()
    assert rec.closed
    assert all(len(bn._forward_hooks) == 0 for bn in batchnorm_layers(net))
    net(torch.randn(2, 3, 6, 6))
    with pytest.raises(RuntimeError, match="missing"):  # nothing was captured
        rec.statistics()
    rec.close()  # idempotent


def test_recorder_rejects_non_bn_layers():
    with pytest.raises(TypeError):
        BNStatsRecorder([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="running"):
        BNStatsRecorder([nn.BatchNorm2d(3, track_running_stats=False)])
