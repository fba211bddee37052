"""DAFL, DFAD and KD with real data on 3 quickly trained lenet5 digit teachers
(the session's ``digits_teachers``).

Numbers, not smoke: the student loss falls, DFAD's generator really plays
against the student (non-zero gradient, ``L_G = -L1(s, t)``), DAFL's entropy
term balances the teachers' predicted classes, KD with real data reaches 80 %
test accuracy, and kd_real resumes exactly across an epoch boundary with
augmentation on.
"""

from __future__ import annotations

import math

import pytest
import torch

from cdfkd.config import build_config
from cdfkd.losses import l1_logits
from cdfkd.methods import create_method
from cdfkd.methods.base import teacher_targets

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(digits_augmented):
    return digits_augmented  # train (augmented: kd_real trains on it), test, info


@pytest.fixture(scope="module")
def teachers(digits_teachers):
    return digits_teachers


def _method(name, teachers, digits, steps, batch=32, **method):
    train, _, info = digits
    cfg = build_config(
        {
            "method": {"name": name, **method},
            "teachers": {"path": "in-memory"},
            "generator": {"nz": 32, "width": 16},
            "train": {"steps": steps, "batch_size": batch, "seed": 0, "device": "cpu"},
        }
    )
    return create_method(cfg, teachers, info, CPU, train_data=train)


def _accuracy(method, digits) -> float:
    _, test, _ = digits
    return method.evaluate(torch.utils.data.DataLoader(test, batch_size=512))["accuracy"]


def test_teachers_are_good(teachers, digits):
    _, test, _ = digits
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor(test.targets)
    with torch.no_grad():
        acc = (teachers(x).argmax(-1) == y).float().mean(1)
    assert (acc > 0.9).all(), acc


@pytest.mark.parametrize(("name", "steps"), [("dafl", 50), ("dfad", 12), ("kd_real", 30)])
def test_student_loss_falls(name, steps, teachers, digits):
    method = _method(name, teachers, digits, steps)
    losses = [method.step()["student"].item() for _ in range(steps)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, losses


def test_dfad_generator_plays_against_the_student(teachers, digits):
    method = _method("dfad", teachers, digits, steps=4, batch=32)
    for _ in range(2):  # a student that has learnt something, so s != t is not trivial
        method.student_step()
    # The generator loss is minus the student-teacher L1 on the G step's batch:
    # replay that batch from a copy of the method's random stream.
    rng = torch.Generator().set_state(method.rng.get_state())
    x, _ = method.generate(32, rng)
    t = teacher_targets(method.teachers(x), method.num_headers)
    expected = l1_logits(method.student_logits(x), t)
    before = [p.detach().clone() for p in method.generator.parameters()]
    student_grads = [p.grad.clone() for p in method.student.parameters()]
    losses = method.generator_step()
    torch.testing.assert_close(losses["generator"], -expected.detach())
    torch.testing.assert_close(losses["adversarial"], expected.detach())
    assert expected.item() > 1e-3
    # The adversarial term reaches G (the FDF bug would leave every gradient at 0) ...
    grads = [p.grad for p in method.generator.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert any(
        not torch.equal(a, p) for a, p in zip(before, method.generator.parameters(), strict=True)
    )
    # ... and only G: the generator step adds no gradient to the student.
    for g, p in zip(student_grads, method.student.parameters(), strict=True):
        assert torch.equal(g, p.grad)


def _class_entropy(method, z: torch.Tensor) -> float:
    """Entropy (nats) of the teachers' argmax histogram on G(z), in eval mode."""
    method.generator.eval()
    with torch.no_grad():
        pred = method.teachers(method.generator(z)).mean(0).argmax(-1)
    method.generator.train()
    p = pred.bincount(minlength=method.info.num_classes).float() / len(pred)
    p = p[p > 0]
    return -(p * p.log()).sum().item()


def test_dafl_information_entropy_balances_classes(teachers, digits):
    method = _method("dafl", teachers, digits, steps=25)
    z = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    before = _class_entropy(method, z)
    ie = [method.step()["information_entropy"].item() for _ in range(25)]
    after = _class_entropy(method, z)
    assert after > before + 0.5, (before, after)
    assert after > 0.8 * math.log(10)  # most of the 10 digits are generated
    assert ie[-1] < ie[0]  # sum p ln p falls towards -ln C


def test_dafl_adversarial_term_is_optional(teachers, digits):
    plain = _method("dafl", teachers, digits, steps=1)
    assert "adversarial" not in plain.step()
    adv = _method("dafl", teachers, digits, steps=1, w_adv=1.0)
    losses = adv.step()
    assert losses["adversarial"].item() > 0
    total = losses["one_hot"] + 5.0 * losses["information_entropy"] + 0.1 * losses["activation"]
    torch.testing.assert_close(losses["generator"], total - losses["adversarial"])


def test_kd_real_beats_an_untrained_student(teachers, digits):
    method = _method("kd_real", teachers, digits, steps=60)
    untrained = _accuracy(method, digits)
    for _ in range(60):
        method.step()
    trained = _accuracy(method, digits)
    assert untrained < 0.3
    assert trained >= 0.8, trained


def test_kd_real_resumes_exactly(teachers, digits, roundtrip):
    # 1437 training images at batch 200: the 8th batch crosses an epoch boundary.
    a = _method("kd_real", teachers, digits, steps=10, batch=200, beta=0.5)
    for _ in range(5):
        a.step()
    sd = roundtrip(a.state_dict())
    torch.manual_seed(123)  # the global stream must not matter
    straight = [a.step() for _ in range(5)]
    b = _method("kd_real", teachers, digits, steps=10, batch=200, beta=0.5)
    b.load_state_dict(sd)
    resumed = [b.step() for _ in range(5)]
    for x, y in zip(straight, resumed, strict=True):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    for (k, p), q in zip(
        a.student.state_dict().items(), b.student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=k)


def test_kd_real_has_no_generator_and_proxies_with_real_images(teachers, digits):
    method = _method("kd_real", teachers, digits, steps=1, batch=32)
    assert method.generator is None
    images, _ = method.sample_images()
    assert images.numel() == 0
    batches = list(method.proxy_batches(2, 16))
    again = list(method.proxy_batches(2, 16))
    assert [x.shape for x, _ in batches] == [(16, 1, 32, 32)] * 2
    assert all(y is None for _, y in batches)
    for (x, _), (x2, _) in zip(batches, again, strict=True):
        assert torch.equal(x, x2)  # the same held-out draw at every evaluation
