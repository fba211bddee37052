"""Teacher ensembles: storage round-trips, every refusal, the fused path, freezing, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cdfkd.bn_hooks import BNStatsRecorder, batchnorm_layers
from cdfkd.cli import main
from cdfkd.data import DatasetInfo
from cdfkd.models import create_model, list_models
from cdfkd.teachers import (
    MANIFEST,
    EnsembleError,
    EnsembleIntegrityError,
    EnsembleMismatchError,
    TeacherEnsemble,
    TeacherTrainConfig,
    UnsafeCheckpointError,
    ensemble_from_numpy,
    ensemble_to_numpy,
    load_ensemble,
    save_ensemble,
    sha256_file,
)

INFO = DatasetInfo("digits", 10, 1, 32, (0.3,), (0.3,))


def _models(archs: list[str], seed: int = 0) -> list[torch.nn.Module]:
    """Untrained teachers with non-trivial BN buffers (so buffer round-trips are tested)."""
    out = []
    for i, arch in enumerate(archs):
        torch.manual_seed(seed + i)
        m = create_model(arch, INFO.num_classes, INFO.channels, INFO.image_size)
        for name, buf in m.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7 + i)
        out.append(m.eval())
    return out


@pytest.fixture
def ens_dir(tmp_path: Path) -> Path:
    out = tmp_path / "ens"
    save_ensemble(
        _models(["lenet5"] * 3),
        out,
        INFO,
        "lenet5",
        seeds=[0, 1, 2],
        test_accuracies=[0.9, 0.91, 0.92],
        ensemble_accuracy=0.95,
        config={"epochs": 0},
    )
    return out


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, INFO.channels, INFO.image_size, INFO.image_size)


# ----------------------------------------------------------------------------- storage


def test_checkpoint_roundtrip_is_exact(ens_dir: Path) -> None:
    originals = _models(["lenet5"] * 3)
    ens = load_ensemble(ens_dir, "cpu", expect_arch="lenet5", expect_num_classes=10)
    assert (ens.num_teachers, ens.num_classes, ens.archs) == (3, 10, ("lenet5",) * 3)
    assert ens.info == INFO
    for original, loaded in zip(originals, ens.teachers, strict=True):
        a, b = original.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        assert any(k.endswith("running_var") for k in a) and any(
            k.endswith("num_batches_tracked") for k in a
        )
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # The files are plain safetensors holding every state_dict tensor.
    stored = load_file(ens_dir / "teacher_0.safetensors")
    assert stored.keys() == originals[0].state_dict().keys()
    manifest = json.loads((ens_dir / MANIFEST).read_text())
    assert manifest["teachers"][1]["seed"] == 1
    assert manifest["teachers"][1]["sha256"] == sha256_file(ens_dir / "teacher_1.safetensors")
    assert manifest["input"]["channels"] == 1 and manifest["ensemble_accuracy"] == 0.95
    assert manifest["arch"] == "lenet5" and manifest["cdfkd_version"] and manifest["created"]


def test_same_weights_give_the_same_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        save_ensemble(_models(["lenet5"] * 2), tmp_path / name, INFO, "lenet5")
    for i in range(2):
        file = f"teacher_{i}.safetensors"
        assert sha256_file(tmp_path / "a" / file) == sha256_file(tmp_path / "b" / file)


def test_save_refuses_to_overwrite(ens_dir: Path) -> None:
    with pytest.raises(EnsembleError, match="already holds an ensemble"):
        save_ensemble(_models(["lenet5"]), ens_dir, INFO, "lenet5")
    save_ensemble(_models(["lenet5"]), ens_dir, INFO, "lenet5", overwrite=True)
    assert load_ensemble(ens_dir).num_teachers == 1


def test_wrong_arch_is_refused(ens_dir: Path) -> None:
    with pytest.raises(EnsembleMismatchError, match=r"resnet18.*were expected"):
        load_ensemble(ens_dir, expect_arch="resnet18")


def test_wrong_class_count_is_refused(ens_dir: Path) -> None:
    with pytest.raises(EnsembleMismatchError, match="10 classes but 100 were expected"):
        load_ensemble(ens_dir, expect_num_classes=100)


def test_missing_file_is_refused(ens_dir: Path) -> None:
    (ens_dir / "teacher_1.safetensors").unlink()
    with pytest.raises(EnsembleIntegrityError, match="teacher_1.safetensors is missing"):
        load_ensemble(ens_dir)


def test_truncated_file_is_refused(ens_dir: Path) -> None:
    path = ens_dir / "teacher_2.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(EnsembleIntegrityError, match="truncated or altered"):
        load_ensemble(ens_dir)


def test_altered_byte_is_refused(ens_dir: Path) -> None:
    path = ens_dir / "teacher_0.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(EnsembleIntegrityError, match=r"sha256 .* manifest records"):
        load_ensemble(ens_dir)


def test_missing_or_invalid_manifest_is_refused(ens_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EnsembleError, match="not an ensemble directory"):
        load_ensemble(tmp_path / "nowhere")
    manifest = ens_dir / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[:40])
    with pytest.raises(EnsembleError, match="not valid JSON"):
        load_ensemble(ens_dir)
    raw = json.loads(text)
    raw["teachers"][0]["file"] = "../escape.safetensors"
    raw["unexpected"] = 1
    manifest.write_text(json.dumps(raw))
    with pytest.raises(EnsembleError, match=r"(?s)teachers\.0\.file.*unexpected"):
        load_ensemble(ens_dir)


def test_weights_that_do_not_fit_the_arch_are_refused(ens_dir: Path) -> None:
    raw = json.loads((ens_dir / MANIFEST).read_text())
    raw["teachers"][0]["arch"] = "lenet5_half"
    (ens_dir / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(EnsembleMismatchError, match="do not fit arch 'lenet5_half'"):
        load_ensemble(ens_dir)


_EXECUTED: list[str] = []


def _record_execution() -> dict:
    _EXECUTED.append("ran")
    return {}


class _CodeOnLoad:
    """Unpickling this would call _record_execution: a stand-in for arbitrary code."""

    def __reduce__(self):
        return (_record_execution, ())


def test_pickle_needing_code_execution_is_refused(ens_dir: Path) -> None:
    bad = ens_dir / "teacher_0.pt"
    torch.save({"state_dict": _models(["lenet5"])[0].state_dict(), "extra": _CodeOnLoad()}, bad)
    # Pointing at the .pt itself ...
    with pytest.raises(UnsafeCheckpointError, match=r"code execution .*_record_execution"):
        load_ensemble(bad)
    # ... or listing it (with its correct hash) in a manifest.
    raw = json.loads((ens_dir / MANIFEST).read_text())
    raw["teachers"][0] |= {"file": bad.name, "sha256": sha256_file(bad)}
    (ens_dir / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(UnsafeCheckpointError, match=r"weights_only=True"):
        load_ensemble(ens_dir)
    assert _EXECUTED == []


def test_plain_pt_state_dict_is_accepted(ens_dir: Path) -> None:
    model = _models(["lenet5"], seed=5)[0]
    pt = ens_dir / "teacher_0.pt"
    torch.save(model.state_dict(), pt)
    raw = json.loads((ens_dir / MANIFEST).read_text())
    raw["teachers"][0] |= {"file": pt.name, "sha256": sha256_file(pt)}
    (ens_dir / MANIFEST).write_text(json.dumps(raw))
    ens = load_ensemble(ens_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(ens.teachers[0].state_dict()[k], v)


def test_numpy_roundtrip_is_exact(ens_dir: Path) -> None:
    ens = load_ensemble(ens_dir)
    payload = ensemble_to_numpy(ens)
    assert all(isinstance(a, np.ndarray) for w in payload["weights"] for a in w.values())
    json.dumps(payload["manifest"])  # JSON-able
    for w in payload["weights"]:  # the object store hands out read-only arrays
        for a in w.values():
            a.flags.writeable = False
    back = ensemble_from_numpy(payload, "cpu")
    assert back.archs == ens.archs and back.info == ens.info and back.manifest == ens.manifest
    for a, b in zip(ens.teachers, back.teachers, strict=True):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    x = _x()
    assert torch.equal(ens(x), back(x))


def test_numpy_roundtrip_of_in_memory_ensemble() -> None:
    ens = TeacherEnsemble(_models(["lenet5", "lenet5_half"]), INFO, ["lenet5", "lenet5_half"])
    back = ensemble_from_numpy(ensemble_to_numpy(ens))
    assert back.archs == ("lenet5", "lenet5_half")
    x = _x()
    assert torch.equal(ens(x), back(x))


# ----------------------------------------------------------------------------- the module


def test_teachers_are_frozen_and_inputs_get_gradients(ens_dir: Path) -> None:
    ens = load_ensemble(ens_dir)
    x = _x().requires_grad_(True)
    out = ens(x, return_features=True)
    (out.logits.square().sum() + sum(e.sum() for e in out.embedding)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in ens.parameters():
        assert not p.requires_grad and p.grad is None


def test_teachers_stay_in_eval_mode(ens_dir: Path) -> None:
    ens = load_ensemble(ens_dir)
    ens.train()
    assert not any(m.training for m in ens.modules())
    before = [b.clone() for b in ens.buffers()]
    ens(_x(8))
    assert all(torch.equal(a, b) for a, b in zip(before, ens.buffers(), strict=True))


def test_shapes_and_bn_layers(ens_dir: Path) -> None:
    ens = load_ensemble(ens_dir, mode="loop")
    x = _x(5)
    assert ens(x).shape == (3, 5, 10)
    feats = ens(x, return_features=True)
    assert feats.logits.shape == (3, 5, 10)
    assert len(feats.stages) == 3 and [s.shape[0] for s in feats.stages[0]] == [5, 5, 5]
    assert [e.shape for e in feats.embedding] == [(5, 84)] * 3
    bns = ens.bn_layers()
    assert len(bns) == 3 and [n for n, _ in bns[0]] == [n for n, _ in bns[1]]
    assert all(isinstance(m, torch.nn.BatchNorm2d) for _, m in bns[0])


# resnet18 (BasicBlocks, downsampling shortcuts) once, with features: that covers logits too.
_FUSED_CASES = [("lenet5", False), ("lenet5", True)]
_FUSED_CASES += [("resnet18", True)] if "resnet18" in list_models() else []


@pytest.mark.parametrize(("arch", "features"), _FUSED_CASES)
def test_vmap_matches_loop(arch: str, features: bool) -> None:
    teachers = _models([arch] * 3)
    loop = TeacherEnsemble(teachers, INFO, [arch] * 3, mode="loop")
    fused = TeacherEnsemble(teachers, INFO, [arch] * 3, mode="vmap")
    assert fused.uses_fused() and not loop.uses_fused()
    x = _x(3)
    results = []
    for ens in (loop, fused):
        xi = x.clone().requires_grad_(True)
        out = ens(xi, return_features=features)
        if features:
            flat = [out.logits, *[s for per in out.stages for s in per], *out.embedding]
        else:
            flat = [out]
        sum(t.square().mean() for t in flat).backward()
        results.append(([t.detach() for t in flat], xi.grad))
    (outs_loop, grad_loop), (outs_fused, grad_fused) = results
    assert len(outs_loop) == len(outs_fused)
    # vmap runs other float32 kernels (other summation orders) than the loop: after
    # resnet18's 18 layers single elements differ by ~1e-5; a wrong weight mapping
    # would differ by O(1).
    for a, b in zip(outs_loop, outs_fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_fused, grad_loop, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in fused.parameters())


def test_hooks_force_the_loop() -> None:
    ens = TeacherEnsemble(_models(["lenet5"] * 2), INFO, ["lenet5"] * 2, mode="vmap")
    assert ens.uses_fused()
    with BNStatsRecorder(batchnorm_layers(ens)) as rec:
        assert not ens.uses_fused()  # hooks present: the loop runs them
        ens(_x())
        means, _, _, _ = rec.statistics()
        assert len(means) == 6
    assert ens.uses_fused()


def test_mixed_architectures() -> None:
    archs = ["lenet5", "lenet5_half", "lenet5"]
    ens = TeacherEnsemble(_models(archs), INFO, archs, mode="auto")
    assert not ens.fusable and not ens.uses_fused()
    out = ens(_x(2), return_features=True)
    assert out.logits.shape == (3, 2, 10)
    assert [e.shape[1] for e in out.embedding] == [84, 42, 84]
    with pytest.raises(ValueError, match="one architecture"):
        TeacherEnsemble(_models(archs), INFO, archs, mode="vmap")


def test_mixed_ensemble_saves_and_loads(tmp_path: Path) -> None:
    archs = ["lenet5_half", "lenet5"]
    manifest = save_ensemble(_models(archs), tmp_path / "mix", INFO, archs)
    assert manifest["arch"] == "mixed" and [t["arch"] for t in manifest["teachers"]] == archs
    ens = load_ensemble(tmp_path / "mix", expect_arch=archs)
    assert ens.archs == tuple(archs)
    with pytest.raises(EnsembleMismatchError):
        load_ensemble(tmp_path / "mix", expect_arch="lenet5")


def test_to_device_rebuilds_fused_state() -> None:
    ens = TeacherEnsemble(_models(["lenet5"] * 2), INFO, ["lenet5"] * 2, mode="vmap")
    x = _x()
    ens(x)
    assert ens._fused is not None
    ens.to(torch.float64)
    assert ens._fused is None
    assert ens(x.double()).dtype == torch.float64


# ----------------------------------------------------------------------------- training


def test_train_config_recipe_and_validation() -> None:
    cfg = TeacherTrainConfig.for_dataset("digits", "lenet5", epochs=None, lr=0.2)
    assert cfg.epochs == 15 and cfg.batch_size == 64 and cfg.lr == 0.2
    with pytest.raises(ValueError, match="count=0"):
        TeacherTrainConfig.for_dataset("digits", "lenet5", count=0)


def test_cli_train_then_eval_then_tamper(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t"
    common = ["--data-root", str(tmp_path / "data"), "--device", "cpu", "--threads", "1"]
    argv = [
        "teachers",
        "train",
        "--dataset",
        "digits",
        "--arch",
        "lenet5",
        "--epochs",
        "1",
        "--count",
        "2",
        "--out",
        str(out),
        "--no-progress",
        *common,
    ]
    assert main(argv) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert [t["seed"] for t in manifest["teachers"]] == [0, 1]
    assert manifest["config"]["epochs"] == 1 and manifest["dataset"] == "digits"
    assert all(0.5 < t["test_accuracy"] <= 1 for t in manifest["teachers"])
    assert 0.5 < manifest["ensemble_accuracy"] <= 1
    # Different seeds give different teachers.
    a, b = (load_file(out / t["file"]) for t in manifest["teachers"])
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])
    capsys.readouterr()

    assert main(["teachers", "eval", str(out), *common]) == 0
    assert "OK" in capsys.readouterr().out

    path = out / "teacher_1.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["teachers", "eval", str(out), *common]) == 1
    captured = capsys.readouterr()
    assert "truncated or altered" in captured.out and "FAILED" in captured.err

    assert main(["teachers", "eval", str(tmp_path / "nothing"), *common]) == 1
    assert "not an ensemble directory" in capsys.readouterr().err


def test_cli_help_lists_commands() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    res = subprocess.run(
        [sys.executable, "-m", "cdfkd", "teachers", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "train" in res.stdout and "eval" in res.stdout
