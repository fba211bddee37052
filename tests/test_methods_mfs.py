"""CDFKD-MFS and its predecessor CDFKD on quickly trained lenet5 digit teachers (the
session's ``digits_teachers``) and one lenet5_half teacher trained here.

Numbers, not smoke: the student loss and the generator's BN term fall, a round is
exactly ``student_steps`` student updates and one generator update, resume is
exact, H = 1 and heterogeneous teachers (with learned feature projections) work,
header i follows teacher i, and the CDFKD baseline's loss falls.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cdfkd.config import build_config
from cdfkd.methods import create_method
from cdfkd.models import create_model
from cdfkd.teachers import TeacherEnsemble

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(digits_data):
    return digits_data  # train, test, info


def _train(arch: str, seed: int, digits, epochs: int = 2):
    """A lenet-family digits classifier: Adam, a couple of epochs (~1 s)."""
    train, _, info = digits
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor(train.targets)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = create_model(arch, info.num_classes, info.channels, info.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def lenets(digits_teachers, digits):
    """The three shared lenet5 teachers and one lenet5_half, trained once for the module."""
    return list(digits_teachers.teachers), _train("lenet5_half", 3, digits)


def _ensemble(models, archs, digits):
    # Copies: the shared teachers stay untouched whatever a test does to its ensemble.
    return TeacherEnsemble([copy.deepcopy(m) for m in models], digits[2], archs, mode="loop")


@pytest.fixture(scope="module")
def teachers(digits_teachers):
    return digits_teachers


def _method(
    name,
    teachers,
    digits,
    steps=10,
    family="mfs",
    headers=3,
    seed=0,
    optim=None,
    pool=None,
    **method,
):
    train = {"steps": steps, "batch_size": 32, "seed": seed, "device": "cpu"}
    if pool is not None:
        train["pool"] = pool
    cfg = build_config(
        {
            "method": {"name": name, **method},
            "optim": optim or {},
            "teachers": {"path": "in-memory"},
            "student": {"arch": "lenet5_half", "family": family, "headers": headers},
            "generator": {"nz": 32, "width": 16},
            "train": train,
        }
    )
    return create_method(cfg, teachers, digits[2], CPU)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_student_loss_falls(teachers, digits):
    method = _method("cdfkd_mfs", teachers, digits, steps=8, student_steps=3)
    losses = [method.step() for _ in range(8)]
    student = [loss["student"].item() for loss in losses]
    assert _mean(student[-2:]) < 0.7 * _mean(student[:2])
    # each term of the student objective falls, not just the sum
    for key in ("kd", "kd_ensemble", "feature"):
        assert losses[-1][key] < losses[0][key]


def test_generator_bn_term_falls(teachers, digits):
    method = _method("cdfkd_mfs", teachers, digits, steps=12, student_steps=1, lambda_bn=1.0)
    bn = [method.step()["bn"].item() for _ in range(12)]
    assert bn[0] > 0
    assert _mean(bn[-3:]) < 0.8 * _mean(bn[:3])


def test_bn_prior_is_the_mean_over_teachers_with_first_layer_rescaled(teachers, digits):
    from cdfkd.bn_hooks import BNStatsRecorder
    from cdfkd.losses import bn_statistics

    method = _method("cdfkd_mfs", teachers, digits, bn_first_rescale=3.0)
    layers = [[bn for _, bn in t] for t in teachers.bn_layers()]
    x = torch.randn(16, 1, 32, 32)
    _, got = method.bn_prior(x)
    expected = 0.0
    for i, teacher in enumerate(teachers.teachers):
        with BNStatsRecorder(layers[i]) as one:
            teacher(x)
            expected += bn_statistics(
                *one.statistics(), rescale=[3.0] + [1.0] * (len(layers[i]) - 1)
            )
    torch.testing.assert_close(got, expected / 3)


def test_exactly_student_steps_updates_per_round(teachers, digits):
    method = _method("cdfkd_mfs", teachers, digits, student_steps=4)
    counts = {"s": 0, "g": 0}
    method.opt_s.register_step_post_hook(lambda *_: counts.__setitem__("s", counts["s"] + 1))
    method.opt_g.register_step_post_hook(lambda *_: counts.__setitem__("g", counts["g"] + 1))
    method.step()
    method.step()
    assert counts == {"s": 8, "g": 2}


def test_generator_step_reaches_only_the_generator(teachers, digits):
    method = _method("cdfkd_mfs", teachers, digits)
    method.generator_step()
    assert all(p.grad is None for p in method.student.parameters())
    assert all(p.grad is None for p in method.teachers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.generator.parameters())


def test_bn_hooks_live_only_inside_the_generator_step(teachers, digits):
    method = _method("cdfkd_mfs", teachers, digits, student_steps=1)
    assert "bn" in method.step()
    assert not any(m._forward_hooks for m in teachers.modules())
    off = _method("cdfkd_mfs", teachers, digits, student_steps=1, lambda_bn=0.0)
    assert "bn" not in off.step()


@pytest.mark.parametrize("name", ["cdfkd_mfs", "cdfkd"])
def test_resume_equals_uninterrupted(name, teachers, digits, roundtrip):
    kw = {"student_steps": 2} if name == "cdfkd_mfs" else {"family": "branch"}
    full = _method(name, teachers, digits, steps=4, **kw)
    full_losses = [full.step() for _ in range(4)]

    first = _method(name, teachers, digits, steps=4, **kw)
    first.step()
    first.step()
    sd = roundtrip(first.state_dict())
    resumed = _method(name, teachers, digits, steps=4, seed=123, **kw)  # different init on purpose
    resumed.load_state_dict(sd)
    resumed_losses = [resumed.step() for _ in range(2)]

    for a, b in zip(full_losses[2:], resumed_losses, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for mod in ("student", "generator", "extra"):
        for (n, p), (_, q) in zip(
            getattr(full, mod).state_dict().items(),
            getattr(resumed, mod).state_dict().items(),
            strict=True,
        ):
            assert torch.equal(p, q), f"{mod}.{n}"


def test_single_header_single_teacher(lenets, digits):
    one = _ensemble(lenets[0][:1], ["lenet5"], digits)
    method = _method("cdfkd_mfs", one, digits, headers=1, steps=3, student_steps=2)
    # lenet5 teacher embedding 84, mfs header 60: a projection
    assert set(method.extra.keys()) == {"proj_0_0"}
    losses = [method.step() for _ in range(3)]
    assert all(torch.isfinite(v) for loss in losses for v in loss.values())
    assert losses[-1]["student"] < losses[0]["student"]
    # a plain single-header student (no family) works too
    plain = _method("cdfkd_mfs", one, digits, family=None, headers=1, steps=2, student_steps=1)
    assert torch.isfinite(plain.step()["student"])


def test_single_header_learns_the_ensemble_mean(teachers, digits):
    method = _method("cdfkd_mfs", teachers, digits, headers=1, steps=2, student_steps=1)
    # one projection per teacher: the feature term averages over all of them
    assert set(method.extra.keys()) == {"proj_0_0", "proj_0_1", "proj_0_2"}
    assert method.feature_pairs() == [(0, 0), (0, 1), (0, 2)]
    assert torch.isfinite(method.step()["student"])


def test_heterogeneous_teachers_use_projections(lenets, digits):
    models = [lenets[0][0], lenets[1]]  # lenet5 (embedding 84) + lenet5_half (42)
    mixed = _ensemble(models, ["lenet5", "lenet5_half"], digits)
    # branch headers of lenet5_half embed in 42 dims: identity for teacher 1, a projection for 0
    method = _method(
        "cdfkd_mfs", mixed, digits, family="branch", headers=2, steps=4, student_steps=2
    )
    assert set(method.extra.keys()) == {"proj_0_0"}
    assert tuple(method.extra["proj_0_0"].weight.shape) == (84, 42)
    before = method.extra["proj_0_0"].weight.detach().clone()
    losses = [method.step() for _ in range(4)]
    assert not torch.equal(before, method.extra["proj_0_0"].weight)  # trained with the student
    assert losses[-1]["feature"] < losses[0]["feature"]
    # mfs headers embed in 60 dims: projections for both
    mfs = _method("cdfkd_mfs", mixed, digits, headers=2, steps=2, student_steps=1)
    assert set(mfs.extra.keys()) == {"proj_0_0", "proj_1_1"}
    assert torch.isfinite(mfs.step()["bn"])


def test_header_i_follows_teacher_i(lenets, digits):
    # Teachers that disagree: teacher j's class scores are rolled by j places, so on
    # any image the three teachers name three different classes.
    rolled = []
    for j, model in enumerate(lenets[0]):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.classifier.weight.copy_(m.classifier.weight.roll(j, dims=0))
            m.classifier.bias.copy_(m.classifier.bias.roll(j, dims=0))
        rolled.append(m)
    ens = _ensemble(rolled, ["lenet5"] * 3, digits)
    # lambda_ens = 0 isolates the per-header pairing (the ensemble term pulls every
    # header towards the teachers' mean). 12 rounds: with the shared 3-epoch teachers the
    # smallest margin agree[i, i] - agree[i, j] is 0.42 (0.07 after 8 rounds). Fresh
    # batches (pool off): with the default pool the headers spend these few rounds on the
    # first generator states' images.
    method = _method(
        "cdfkd_mfs", ens, digits, steps=12, student_steps=3, lambda_ens=0.0, pool={"size": 0}
    )
    for _ in range(12):
        method.step()
    method.student.eval()
    method.generator.eval()
    with torch.no_grad():
        x, _ = method.generate(128, torch.Generator().manual_seed(99))
        s, t = method.student_logits(x).argmax(-1), ens(x).argmax(-1)
    agree = (s[:, None] == t[None, :]).float().mean(-1)  # [i, j]: header i vs teacher j
    for i in range(3):
        for j in range(3):
            if j != i:
                assert agree[i, i] > agree[i, j] + 0.1, (i, j, agree)


def test_cdfkd_baseline_loss_falls(teachers, digits):
    method = _method("cdfkd", teachers, digits, steps=20, family="branch")
    losses = [method.step() for _ in range(20)]
    student = [loss["student"].item() for loss in losses]
    assert _mean(student[-4:]) < 0.8 * _mean(student[:4])
    assert set(losses[0]) >= {"one_hot", "information_entropy", "activation", "generator"}


def test_cdfkd_generator_loss_is_the_per_teacher_dafl_mean(teachers, digits):
    from cdfkd.losses import activation, information_entropy, one_hot

    method = _method("cdfkd", teachers, digits, family="branch", w_oh=1.0, w_ie=2.0, w_a=0.5)
    losses, x, t = method.generator_step()
    out = teachers(x, return_features=True)
    per_teacher = [
        one_hot(out.logits[j])
        + 2.0 * information_entropy(out.logits[j])
        + 0.5 * activation(out.embedding[j])
        for j in range(3)
    ]
    torch.testing.assert_close(losses["generator"], torch.stack(per_teacher).mean())
    torch.testing.assert_close(t, out.logits)
