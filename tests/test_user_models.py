"""Your own modules as teachers and students: ``arch: package.module:function``, trusted
explicitly, imported into a verified ensemble folder by ``cdfkd teachers import``; one test
per refusal."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cdfkd.cli import main
from cdfkd.errors import ConfigError
from cdfkd.models import ModelCheckError, UntrustedCodeError, create_model, trusting
from cdfkd.teachers import (
    MANIFEST,
    EnsembleError,
    EnsembleMismatchError,
    UnsafeCheckpointError,
    import_ensemble,
    load_ensemble,
)

PKG = "cdfkd_test_pkg"
ARCH = f"{PKG}.models:build_net"
MODELS_PY = '''
from torch import nn


def _block(c_in, c_out, bn):
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(c_out)] if bn else []), nn.ReLU(), nn.MaxPool2d(2))


def build_net(num_classes, in_channels=3, width=16):
    """A small CNN for 32 px inputs: three conv blocks halving the map, a linear classifier."""
    return nn.Sequential(
        _block(in_channels, width, True), _block(width, 2 * width, True),
        _block(2 * width, 2 * width, True), nn.Flatten(), nn.Linear(2 * width * 16, num_classes),
    )


def build_no_bn(num_classes, in_channels=3):
    return nn.Sequential(
        _block(in_channels, 8, False), _block(8, 8, False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def build_five_classes(num_classes, in_channels=3):
    return build_net(5, in_channels)


def build_for_16px(num_classes, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(4 * 8 * 8, num_classes),
    )


def build_not_a_module(num_classes):
    return "a model"


def build_without_classes(width=8):
    return build_net(10, 1, width)
'''


@pytest.fixture(scope="session")
def package_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("userpkg")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "models.py").write_text(textwrap.dedent(MODELS_PY))
    (root / PKG / "broken.py").write_text("raise RuntimeError('broken at import')\n")
    return root


@pytest.fixture(autouse=True)
def user_package(package_root, monkeypatch):
    """The package importable (on sys.path) and the trust list restored after each test."""
    monkeypatch.syspath_prepend(str(package_root))
    with trusting():
        yield package_root


def _train(model: torch.nn.Module, data, epochs: int = 2, seed: int = 0) -> torch.nn.Module:
    train, _, _ = data
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([train[i][1] for i in range(len(train))])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory, package_root, digits_data) -> dict:
    """Two build_net(width=8) teachers trained on digits, saved as a user would: one as
    safetensors, one as a DataParallel-style ``.pt`` checkpoint."""
    import sys

    sys.path.insert(0, str(package_root))
    try:
        from cdfkd_test_pkg.models import build_net
    finally:
        sys.path.remove(str(package_root))
    folder = tmp_path_factory.mktemp("weights")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(_train(build_net(10, 1, width=8), digits_data, seed=seed))
    save_file(
        {k: v.contiguous() for k, v in models[0].state_dict().items()}, folder / "a.safetensors"
    )
    state = {f"module.{k}": v for k, v in models[1].state_dict().items()}
    torch.save({"state_dict": state, "epoch": 2}, folder / "b.pt")
    return {"files": [folder / "a.safetensors", folder / "b.pt"], "models": models}


# ----------------------------------------------------------------------------- building


def test_a_user_module_is_built_once_trusted():
    with pytest.raises(UntrustedCodeError, match=rf"add --trust {PKG}\.models"):
        create_model(ARCH, 10, 1, 32)
    with trusting(PKG):  # a package trusts its submodules
        model = create_model(ARCH, 10, 1, 32, width=8)
    # Per resolution the output of the shallowest module ending there: at 32 px the ReLU
    # inside block 0 (the block itself ends after its pooling, at 16 px).
    assert model.stage_names == ["0.2", "0", "1", "2"] and model.feature_dim == 16 * 4 * 4
    out = model(torch.randn(2, 1, 32, 32), return_features=True)
    shapes = [(8, 32, 32), (8, 16, 16), (16, 8, 8), (16, 4, 4)]
    assert [tuple(m.shape[1:]) for m in out.stages] == shapes
    with pytest.raises(UntrustedCodeError):  # trusting() was scoped
        create_model(ARCH, 10, 1, 32)


@pytest.mark.parametrize(
    ("arch", "error", "match"),
    [
        ("no_such_pkg_xyz.models:build", ConfigError, r"cannot be imported .*pip install -e"),
        (
            f"{PKG}.broken:build",
            ConfigError,
            r"importing cdfkd_test_pkg.broken failed .*broken at import",
        ),
        (
            f"{PKG}.models:build_nett",
            ConfigError,
            r"no callable 'build_nett' \(its callables: .*build_net",
        ),
        (f"{PKG}.models:build_not_a_module", ConfigError, r"returned a str, not a torch.nn.Module"),
        (f"{PKG}.models:build_without_classes", ConfigError, r"must take num_classes"),
        (f"{PKG}.models:build_five_classes", ModelCheckError, r"returns \(2, 5\) .*num_classes=10"),
        (
            f"{PKG}.models:build_for_16px",
            ModelCheckError,
            r"cannot take 1x32x32 inputs .*image-size",
        ),
    ],
)
def test_user_arch_refusals(arch, error, match):
    with trusting(arch.partition(":")[0]), pytest.raises(error, match=match):
        create_model(arch, 10, 1, 32)


# ----------------------------------------------------------------------------- teachers import


def test_teachers_import_writes_a_verified_ensemble(tmp_path, trained_weights, digits_data, capsys):
    out = tmp_path / "imported"
    a, b = trained_weights["files"]
    with trusting():  # the command trusts its --arch for itself, not for what follows
        code = main(
            ["teachers", "import", "--arch", ARCH, "--weights", str(a), str(b)]
            + ["--dataset", "digits", "--out", str(out), "--model-kwargs", "width=8"]
            + ["--threads", "1"]
        )
    assert code == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and "teacher_1.safetensors" in printed
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["arch"] == ARCH and manifest["dataset"] == "digits"
    assert all(t["model_kwargs"] == {"width": 8} for t in manifest["teachers"])
    assert all(
        t["test_accuracy"] > 0.5 for t in manifest["teachers"]
    )  # measured on digits' test split
    assert [s["file"] for s in manifest["config"]["imported_from"]] == [str(a), str(b)]

    # Loading the folder again runs the builder: it needs the same explicit trust.
    with pytest.raises(EnsembleError, match=rf"--trust {PKG}\.models"):
        load_ensemble(out)
    with trusting(f"{PKG}.models"):
        ens = load_ensemble(out, expect_arch=ARCH)
    _, test, _ = digits_data
    x = torch.stack([test[i][0] for i in range(8)])
    for teacher, original in zip(ens.teachers, trained_weights["models"], strict=True):
        torch.testing.assert_close(teacher(x), original(x))
    assert main(["teachers", "eval", str(out), "--trust", PKG, "--threads", "1"]) == 0


def test_import_refuses_weights_that_do_not_fit(tmp_path, trained_weights):
    with (
        trusting(PKG),
        pytest.raises(
            EnsembleMismatchError, match=r"a.safetensors does not fit .*resized: .*--model-kwargs"
        ),
    ):
        import_ensemble(
            ARCH, trained_weights["files"][:1], "digits", tmp_path / "x", model_kwargs={"width": 16}
        )
    assert not (tmp_path / "x" / MANIFEST).exists()


def test_import_refuses_pickles_that_run_code(tmp_path, trained_weights):
    bad = tmp_path / "whole_model.pt"
    torch.save(trained_weights["models"][0], bad)  # the module object, not its state dict
    with trusting(PKG), pytest.raises(UnsafeCheckpointError, match="needs code execution"):
        import_ensemble(ARCH, [bad], "digits", tmp_path / "x", model_kwargs={"width": 8})


def test_teachers_without_batchnorm_and_a_bn_prior(tmp_path, digits_data, caplog):
    from cdfkd.config import build_config
    from cdfkd.methods import create_method

    with trusting(PKG):
        torch.manual_seed(0)
        model = create_model(f"{PKG}.models:build_no_bn", 10, 1, 32)
        save_file(
            {k[len("model.") :]: v for k, v in model.state_dict().items()},
            tmp_path / "w.safetensors",
        )
        with caplog.at_level(logging.WARNING):
            import_ensemble(
                f"{PKG}.models:build_no_bn",
                [tmp_path / "w.safetensors"],
                "digits",
                tmp_path / "nobn",
            )
        assert "no BatchNorm layers" in caplog.text and "method.w_bn=0" in caplog.text
        teachers = load_ensemble(tmp_path / "nobn")
        raw = {"method": {"name": "cgdd"}, "teachers": {"path": str(tmp_path / "nobn")}}
        cfg = build_config(raw | {"tracking": {"enabled": False}})
        info = digits_data[2]
        with pytest.raises(
            ValueError, match=r"w_bn > 0 but a teacher has no BatchNorm layers: set method.w_bn=0"
        ):
            create_method(cfg, teachers, info, torch.device("cpu"))
        cfg = build_config(raw | {"method": {"name": "cgdd", "w_bn": 0.0}})
        create_method(cfg, teachers, info, torch.device("cpu"))  # the fix works


def test_import_without_the_data(tmp_path, trained_weights):
    args = (ARCH, trained_weights["files"][:1], "mnist")  # MNIST is not on this machine
    kw = {"data_root": tmp_path / "nodata", "download": False, "model_kwargs": {"width": 8}}
    with trusting(PKG):
        with pytest.raises(
            EnsembleError, match=r"mnist cannot be loaded here.*pass --mean and --std"
        ):
            import_ensemble(*args, tmp_path / "a", **kw)
        manifest = import_ensemble(*args, tmp_path / "b", mean=[0.13], std=[0.31], **kw)
    assert manifest["teachers"][0]["test_accuracy"] is None and manifest["input"]["mean"] == [0.13]


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_trusts_a_user_module_student_in_every_trial(
    ray_env, digits_ensemble, package_root, monkeypatch
):
    import yaml

    from cdfkd.tune import run_sweep

    # Ray workers find the package as a user's would: on PYTHONPATH, set before Ray starts.
    monkeypatch.setenv("PYTHONPATH", str(package_root))
    base = {
        "method": {"name": "cgdd", "gamma": 0.0},
        "data": {"name": "digits", "root": str(ray_env / "data")},
        "teachers": {"path": str(digits_ensemble)},
        "student": {"arch": ARCH},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 4, "batch_size": 16, "eval_every": 4},
    }
    spec = ray_env / "user.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "user",
                "base_config": base,
                "num_samples": 1,
                "storage_path": str(ray_env / "sweeps"),
                "mlflow": {"enabled": False},
            }
        )
    )
    with pytest.raises(ConfigError, match="add --trust"):  # refused before Ray starts
        run_sweep(spec, write=lambda _: None)
    summary = run_sweep(spec, write=lambda _: None, trust=[PKG])
    assert [r["status"] for r in summary["rows"]] == ["COMPLETE"]
