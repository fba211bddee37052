"""The faults README promises to survive, each made to happen on purpose, end to end.

Storage that cannot be written, or fills up mid-run; teachers replaced while a sweep
runs; MLflow's default sqlite store locked under concurrent trials. (A worker node
lost mid-trial and token authentication live in test_cluster_faults.py.)
"""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from cdfkd.cli import main
from cdfkd.errors import ConfigError, StorageError
from cdfkd.runs import CHECKPOINT, RunDir, load_checkpoint


def _raw(teachers: Path, root: Path, **train) -> dict:
    return {
        "method": {"name": "cgdd"},
        "data": {"name": "digits", "root": str(root / "data")},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 12, "batch_size": 16, "eval_every": 6, "checkpoint_every": 4, **train},
        "tracking": {"enabled": False},
    }


def _config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _distill(config: Path, out: Path, *extra: str) -> int:
    return main(["distill", "--config", str(config), "--out", str(out), "--no-progress", *extra])


# ----------------------------------------------------------------------------- storage


def test_unwritable_run_folder_is_refused_before_any_work(digits_ensemble, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root can write anywhere, but not below a file
    cfg = _config(tmp_path / "c.yaml", _raw(digits_ensemble, tmp_path))
    assert _distill(cfg, blocker / "run") == 1
    err = capsys.readouterr().err
    assert "cannot be written" in err and "--out" in err
    assert not (tmp_path / "data").exists()  # refused before the data was even loaded


def test_full_disk_is_refused_before_any_work_and_leaves_nothing(
    digits_ensemble, tmp_path, capsys, monkeypatch
):
    import cdfkd.runs

    class _Usage:
        free = 5 * 2**20  # 5 MiB left

    monkeypatch.setattr(cdfkd.runs.shutil, "disk_usage", lambda _path: _Usage())
    cfg = _config(tmp_path / "c.yaml", _raw(digits_ensemble, tmp_path))
    out = tmp_path / "runs" / "full"
    assert _distill(cfg, out) == 1
    assert "5 MiB free" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing a later --resume could trip over
    monkeypatch.undo()
    assert _distill(cfg, out) == 0  # space freed: the same command runs


def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_resume_finishes(
    digits_ensemble, tmp_path, capsys, monkeypatch
):
    save = torch.save
    calls = []

    def fills_the_disk_at_the_second_checkpoint(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "step" in obj:
            calls.append(obj["step"])
            if len(calls) == 2:
                Path(f).write_bytes(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk_at_the_second_checkpoint)
    cfg = _config(tmp_path / "c.yaml", _raw(digits_ensemble, tmp_path))
    out = tmp_path / "run"
    assert _distill(cfg, out) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous checkpoint.pt is intact" in err
    assert load_checkpoint(out / CHECKPOINT)["step"] == 4  # the first one, whole
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    assert _distill(cfg, out, "--resume") == 0
    assert RunDir(out).read_result()["steps"] == 12


@pytest.mark.ray
def test_unwritable_storage_path_fails_before_ray_and_resume_finds_nothing(
    ray_env, digits_ensemble
):
    import ray

    from cdfkd.tune import run_sweep

    blocker = ray_env / "a-file"
    blocker.write_text("not a folder")
    spec = ray_env / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "nowhere",
                "base_config": _raw(digits_ensemble, ray_env),
                "num_samples": 1,
                "storage_path": str(blocker / "sweeps"),
                "mlflow": {"enabled": False},
            }
        )
    )
    with pytest.raises(StorageError, match="cannot be written"):
        run_sweep(spec, write=lambda _: None)
    assert not ray.is_initialized()  # refused before Ray started
    with pytest.raises(ConfigError, match="no sweep to resume"):
        run_sweep(spec, resume=True, write=lambda _: None)


# ----------------------------------------------------------------------------- teachers


def _retrain_one_teacher(folder: Path) -> None:
    """What `cdfkd teachers train --overwrite` into the same folder does: new weights, and a
    manifest whose hashes match them."""
    from cdfkd.teachers import load_ensemble, read_manifest, save_ensemble

    ens = load_ensemble(folder, "cpu")
    m = read_manifest(folder)
    models = list(ens.teachers)
    with torch.no_grad():
        next(models[1].parameters()).add_(0.01)
    save_ensemble(models, folder, m.info(), list(ens.archs), dataset=m.dataset, overwrite=True)


@pytest.mark.ray
def test_teachers_replaced_mid_sweep_fail_later_trials_and_resume_refuses(
    ray_env, digits_ensemble, monkeypatch
):
    from cdfkd.tune import run_sweep
    from faults.cdfkd_faults import worker_env

    teachers = ray_env / "teachers"
    shutil.copytree(digits_ensemble, teachers)
    # The first trial waits after its step-12 checkpoint while the test retrains a teacher
    # into the sweep's ensemble folder; the second trial starts after that.
    marker, release = ray_env / "held.json", ray_env / "release"
    hold = {"step": 13, "marker": str(marker), "release": str(release)}
    env = worker_env({"hold": {**hold, "when": {"method.alpha": 1.0}}})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    base = _raw(teachers, ray_env, steps=24, eval_every=12, checkpoint_every=12)
    spec = ray_env / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "swap",
                "base_config": base,
                "search": {"method.alpha": {"type": "float", "low": 0.5, "high": 4.0}},
                "points_to_evaluate": [{"method.alpha": 1.0}, {"method.alpha": 2.0}],
                "num_samples": 2,
                "max_concurrent_trials": 1,
                "storage_path": str(ray_env / "sweeps"),
                "mlflow": {"enabled": False},
            }
        )
    )

    def swap_when_held() -> None:
        deadline = time.time() + 600  # bounds a broken run only
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.1)
        _retrain_one_teacher(teachers)
        release.touch()

    swapper = threading.Thread(target=swap_when_held, daemon=True)
    swapper.start()
    summary = run_sweep(spec, write=lambda _: None)
    swapper.join(timeout=5)
    by_alpha = {float(r["param:method.alpha"]): r for r in summary["rows"]}
    assert by_alpha[1.0]["status"] == "COMPLETE"  # it had its teachers from the start
    second = by_alpha[2.0]
    assert second["status"] == "FAILED_TEACHERS_CHANGED"
    assert "teacher_1.safetensors was replaced" in second["error"]
    assert not (Path(second["path"]) / "run" / CHECKPOINT).exists()  # refused before training
    with pytest.raises(ConfigError, match="changed since sweep swap started"):
        run_sweep(spec, resume=True, write=lambda _: None)


# ----------------------------------------------------------------------------- sqlite


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
@pytest.mark.parametrize("concurrent", [2, 4])
def test_sqlite_store_locked_under_concurrent_trials_loses_no_metric(
    ray_env, digits_ensemble, monkeypatch, concurrent
):
    from mlflow import MlflowClient

    from cdfkd.tune import run_sweep
    from faults.cdfkd_faults import worker_env

    db = ray_env / "mlflow.db"
    uri = f"sqlite:///{db}"
    # Every trial waits after its step-12 evaluation; the test then locks the whole
    # database (another writer holding it, as concurrent trials do) and lets them go.
    # Their step-24 records and final metrics all meet "database is locked" for sure.
    marker, release = ray_env / "held.json", ray_env / "release"
    env = worker_env({"hold": {"step": 13, "marker": str(marker), "release": str(release)}})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = ray_env / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": f"lock{concurrent}",
                "base_config": _raw(digits_ensemble, ray_env, steps=24, eval_every=12),
                "search": {"method.alpha": {"type": "float", "low": 0.5, "high": 4.0}},
                "num_samples": concurrent,
                "max_concurrent_trials": concurrent,
                "resources": {"cpu": 2 / concurrent},
                "seed": 0,
                "storage_path": str(ray_env / "sweeps"),
                "mlflow": {"tracking_uri": uri},
            }
        )
    )
    spec_raw = yaml.safe_load(spec.read_text())
    spec_raw["base_config"].pop("tracking")
    spec.write_text(yaml.safe_dump(spec_raw))
    exp = ray_env / "sweeps" / f"lock{concurrent}"
    locked: list[float] = []

    def lock_then_release() -> None:
        deadline = time.time() + 600  # bounds a broken run only
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.1)
        conn = sqlite3.connect(db, timeout=60, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.append(time.time())
        release.touch()
        # Held until every trial has finished training (its result.json is written).
        while len(list(exp.glob("*/run/result.json"))) < concurrent and time.time() < deadline:
            time.sleep(0.2)
        pending = sum(1 for p in exp.glob("*/run/mlflow_pending.jsonl") if p.read_text().strip())
        locked.append(pending)
        conn.execute("ROLLBACK")
        conn.close()

    locker = threading.Thread(target=lock_then_release, daemon=True)
    locker.start()
    summary = run_sweep(spec, write=lambda _: None)
    locker.join(timeout=5)
    assert all(r["status"] == "COMPLETE" for r in summary["rows"])
    assert locked and locked[1] > 0  # trials really met the lock and kept their records
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"lock{concurrent}")
    children = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("run_kind") == "trial"
    ]
    assert len(children) == concurrent
    for child in children:  # after the driver's automatic replay, with no manual sync
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "student_accuracy")]
        assert steps == [12, 24, 24], steps
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss/student")] == [
            12,
            24,
        ]
        assert "student_params" in child.data.metrics
    for pending in exp.glob("*/run/mlflow_pending.jsonl"):
        sent = set((pending.parent / "mlflow_sent.txt").read_text().split())
        owed = [json.loads(line)["id"] for line in pending.read_text().splitlines()]
        assert set(owed) <= sent  # everything that waited has been sent
