"""The contract every registered method keeps, run over ``list_methods()``.

A method registered tomorrow is tested the day it is registered: it is built
from a validated config (its own defaults), stepped on tiny CPU networks
(random lenet5 teachers on 32 px digits, single- and multi-header lenet5_half
students), and must give finite named losses, accuracies in [0, 1], resume
exactly from a checkpoint read back as the loop reads it, and train the same
whether or not it is evaluated in between.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cdfkd.config import build_config
from cdfkd.methods import LOSS_NAMES, METHODS, create_method, list_methods
from cdfkd.models import create_model
from cdfkd.teachers import TeacherEnsemble

NUM_TEACHERS = 3
BATCH = 16
STEPS = 2  # before and after the checkpoint
STUDENTS = {
    "single": {"arch": "lenet5_half"},
    "mfs": {"arch": "lenet5_half", "family": "mfs", "headers": NUM_TEACHERS},
}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(digits_augmented):
    train, test, info = digits_augmented
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test, range(64)), batch_size=32)
    return train, loader, info


@pytest.fixture(scope="module")
def teachers(digits):
    _, _, info = digits
    torch.manual_seed(0)
    models = [
        create_model("lenet5", info.num_classes, info.channels, info.image_size)
        for _ in range(NUM_TEACHERS)
    ]
    return TeacherEnsemble(models, info, ["lenet5"] * NUM_TEACHERS, mode="loop")


def _config(name: str, student: str, train: dict | None = None, **method):
    raw = {
        "method": {"name": name, **method},
        "teachers": {"path": "in-memory"},
        "student": STUDENTS[student],
        "generator": {"nz": 16, "width": 16},
        "train": {
            "steps": 2 * STEPS,
            "batch_size": BATCH,
            "seed": 3,
            "device": "cpu",
            **(train or {}),
        },
    }
    return build_config(raw, source=f"contract:{name}")


def _build(name: str, student: str, teachers, digits, train: dict | None = None, **method):
    data, _, info = digits
    cfg = _config(name, student, train, **method)
    return create_method(cfg, teachers, info, CPU, train_data=data)


def _run(method, steps: int, between=None) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(steps):
        out.append(method.step())
        if between is not None:
            between(method)
    return out


def _trainable_state(method) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in method.student.state_dict().items()}
    state |= {f"extra.{k}": v for k, v in method.extra.state_dict().items()}
    if method.generator is not None:
        state |= {f"generator.{k}": v for k, v in method.generator.state_dict().items()}
    return state


def _assert_same_run(a: list[dict], b: list[dict], state_a: dict, state_b: dict) -> None:
    assert [list(x) for x in a] == [list(x) for x in b]
    for x, y in zip(a, b, strict=True):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=f"loss {k!r} differs")
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=0, atol=0, msg=f"{k} differs")


def test_builtin_methods_are_registered():
    builtin = {"cgdd", "cdfkd_mfs", "cdfkd", "dafl", "dfad", "deepinversion", "kd_real"}
    assert builtin <= set(list_methods())
    assert {"cgdd", "cdfkd_mfs", "deepinversion"} <= set(BN_PRIOR_METHODS)


@pytest.mark.parametrize("student", sorted(STUDENTS))
@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, student, teachers, digits, roundtrip):
    _, loader, info = digits
    method = _build(name, student, teachers, digits)
    assert method.name == name and method.mcfg.name == name

    # A few steps: named from the one vocabulary, finite, detached 0-d losses; every
    # method reports its student's total, and its generator's when it trains one.
    first = _run(method, STEPS)
    for losses in first:
        assert losses and set(losses) <= set(LOSS_NAMES), set(losses) - set(LOSS_NAMES)
        assert "student" in losses
        assert ("generator" in losses) == (method.generator is not None)
        for k, v in losses.items():
            assert v.dim() == 0 and not v.requires_grad, k
            assert torch.isfinite(v), f"{name}: loss {k} = {v}"
    assert method.step_count == STEPS

    # Evaluation: accuracies are fractions, one per header.
    ev = method.evaluate(loader)
    assert 0.0 <= ev["accuracy"] <= 1.0
    headers = STUDENTS[student].get("headers", 1)
    assert len(ev["header_accuracy"]) == headers
    assert all(0.0 <= a <= 1.0 for a in ev["header_accuracy"])
    x, y = next(iter(method.proxy_batches(1, BATCH)))
    assert x.shape == (BATCH, info.channels, info.image_size, info.image_size)
    assert y is None or y.shape == (BATCH,)
    assert method.predict(x).shape == (BATCH, info.num_classes)
    images, ncol = method.sample_images()
    assert ncol >= 1 and (images.numel() == 0 or images.shape[1:] == x.shape[1:])

    # Exact resume: checkpoint -> fresh method -> load -> continue == uninterrupted.
    sd = roundtrip(method.state_dict())
    straight = _run(method, STEPS)
    resumed_method = _build(name, student, teachers, digits)
    resumed_method.load_state_dict(sd)
    assert resumed_method.step_count == STEPS
    resumed = _run(resumed_method, STEPS)
    _assert_same_run(straight, resumed, _trainable_state(method), _trainable_state(resumed_method))


def _evaluate_like_the_loop(method, loader) -> None:
    # What cdfkd.train.run does between steps: test accuracy, data-free proxy, samples.
    method.evaluate(loader)
    for x, _ in method.proxy_batches(2, BATCH):
        method.predict(x)
    method.sample_images()


@pytest.mark.parametrize("name", list_methods())
def test_evaluation_does_not_change_training(name, teachers, digits):
    _, loader, _ = digits
    plain = _build(name, "single", teachers, digits)
    watched = _build(name, "single", teachers, digits)
    a = _run(plain, STEPS)
    b = _run(watched, STEPS, between=lambda m: _evaluate_like_the_loop(m, loader))
    _assert_same_run(a, b, _trainable_state(plain), _trainable_state(watched))


@pytest.mark.parametrize("name", list_methods())
def test_checkpoint_of_another_method_is_refused(name, teachers, digits):
    method = _build(name, "single", teachers, digits)
    sd = method.state_dict()
    sd["method"] = "not-" + name
    with pytest.raises(ValueError, match="checkpoint was written by method"):
        method.load_state_dict(sd)


BN_PRIOR_METHODS = [n for n in list_methods() if METHODS.get(n).bn_prior_weight]


def _without_batchnorm(teachers) -> TeacherEnsemble:
    """A copy of the ensemble whose last teacher has every BatchNorm replaced by Identity."""
    models = [copy.deepcopy(t) for t in teachers.teachers]
    for module in list(models[-1].modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
    return TeacherEnsemble(models, teachers.info, list(teachers.archs), mode="loop")


@pytest.mark.parametrize("name", BN_PRIOR_METHODS)
def test_bn_prior_refuses_teachers_without_batchnorm(name, teachers, digits):
    weight = METHODS.get(name).bn_prior_weight
    no_bn = _without_batchnorm(teachers)
    assert len(no_bn.bn_layers()[-1]) == 0 and len(no_bn.bn_layers()[0]) > 0
    with pytest.raises(ValueError, match=f"set method.{weight}=0") as err:
        _build(name, "single", no_bn, digits)
    assert f"{weight} > 0 but a teacher has no BatchNorm layers" in str(err.value)
    # With the prior off, the same teachers train: no "bn" term, finite losses.
    losses = _build(name, "single", no_bn, digits, **{weight: 0.0}).step()
    assert "bn" not in losses
    assert all(torch.isfinite(v) for v in losses.values())


GENERATOR_METHODS = [n for n in list_methods() if METHODS.get(n).generator_kind is not None]
POOL = {"pool": {"size": 3 * BATCH, "refresh": 1}}


@pytest.mark.parametrize("name", GENERATOR_METHODS)
def test_pool_defaults_are_the_measured_ones_and_size_0_turns_it_off(name, teachers, digits):
    # BENCHMARKS.md, "Cheaper synthesis": 512 images for cgdd and cdfkd_mfs, off otherwise.
    expected = 512 if name in ("cgdd", "cdfkd_mfs") else 0
    method = _build(name, "mfs", teachers, digits)
    assert method.pool_cfg.size == expected
    assert (method.pool is not None) == (expected > 0)
    off = _build(name, "mfs", teachers, digits, {"pool": {"size": 0}})
    assert off.pool_cfg.size == 0 and off.pool is None


@pytest.mark.parametrize("name", GENERATOR_METHODS)
def test_image_pool_resumes_exactly_and_feeds_student_updates(name, teachers, digits, roundtrip):
    method = _build(name, "mfs", teachers, digits, POOL)
    first = _run(method, STEPS)
    assert all(torch.isfinite(v) for losses in first for v in losses.values())
    pool = method.pool
    assert pool is not None and len(pool) > 0  # the generator updates' batches went in
    sd = roundtrip(method.state_dict())
    assert sd["pool"]["filled"] == len(pool)
    straight = _run(method, STEPS)
    resumed_method = _build(name, "mfs", teachers, digits, POOL)
    resumed_method.load_state_dict(sd)
    resumed = _run(resumed_method, STEPS)
    _assert_same_run(straight, resumed, _trainable_state(method), _trainable_state(resumed_method))
    # A checkpoint written without a pool does not resume a config with one.
    plain = _build(name, "mfs", teachers, digits, {"pool": {"size": 0}})
    _run(plain, 1)
    with pytest.raises(ValueError, match="disagree on the image pool"):
        _build(name, "mfs", teachers, digits, POOL).load_state_dict(roundtrip(plain.state_dict()))


@pytest.mark.parametrize("name", ["cgdd", "cdfkd_mfs"])
def test_bf16_autocast_runs_on_cpu(name, teachers, digits):
    method = _build(name, "mfs", teachers, digits, {"precision": "bf16"})
    assert method.autocast_dtype is torch.bfloat16
    for losses in _run(method, STEPS):
        assert all(torch.isfinite(v.float()) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in method.student.parameters())  # weights stay fp32
