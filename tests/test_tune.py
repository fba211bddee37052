"""The sweep layer on a real local Ray (2 CPUs): validation, trials, object store, NaN, resume, two nodes."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cdfkd.config import ConfigError

pytestmark = pytest.mark.ray


def _base(teachers: Path, data_root: Path, **train) -> dict:
    return {
        "method": {"name": "cgdd"},
        "data": {"name": "digits", "root": str(data_root)},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 24, "batch_size": 16, "eval_every": 12, "checkpoint_every": 12, **train},
    }


def _write_spec(path: Path, **fields) -> Path:
    # MLflow has its own tests (test_mlflow.py); these sweeps test the Ray layer.
    fields.setdefault("mlflow", {"enabled": False})
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


# ---------------------------------------------------------------- validation (no Ray needed)


@pytest.mark.parametrize(
    "search, message",
    [
        ({"method.alpah": {"type": "float", "low": 0.1, "high": 1}}, "alpah"),
        ({"method.alpha": {"type": "float", "low": 2, "high": 1}}, "must be below high"),
        (
            {"method.alpha": {"type": "float", "low": 0, "high": 1, "log": True}},
            "log=true needs low > 0",
        ),
        (
            {
                "student.fuse_from": {
                    "type": "int",
                    "low": 0,
                    "high": 9,
                    "when": {"student.family": "mfs"},
                },
                "student.family": {"type": "categorical", "choices": ["mfs"]},
                "student.headers": {"type": "categorical", "choices": [3]},
            },
            "fuse_from",
        ),
        (
            {"method.alpha": {"type": "float", "low": 0.1, "high": 1, "when": {"nothing.here": 1}}},
            "nothing.here",
        ),
        ({"method.alpha": {"type": "categorical", "choices": [{"a": 1}]}}, "scalars"),
    ],
)
def test_invalid_search_spaces_are_refused(tmp_path, digits_ensemble, search, message):
    from cdfkd.tune.spec import load_spec

    spec = _write_spec(
        tmp_path / "s.yaml", name="bad", base_config=_base(digits_ensemble, tmp_path), search=search
    )
    with pytest.raises(ConfigError, match=message):
        load_spec(spec)


def test_spec_refuses_unknown_key_asha_with_two_objectives_and_uri_storage(
    tmp_path, digits_ensemble
):
    from cdfkd.tune.spec import load_spec

    base = _base(digits_ensemble, tmp_path)
    with pytest.raises(ConfigError, match="num_sample"):
        load_spec(_write_spec(tmp_path / "a.yaml", name="x", base_config=base, num_sample=3))
    with pytest.raises(ConfigError, match="ASHA needs one objective"):
        load_spec(
            _write_spec(
                tmp_path / "b.yaml",
                name="x",
                base_config=base,
                scheduler={"type": "asha"},
                objective={"second_metric": "student_params"},
            )
        )
    with pytest.raises(ConfigError, match="shared filesystem"):
        load_spec(
            _write_spec(
                tmp_path / "c.yaml", name="x", base_config=base, storage_path="s3://bucket/sweeps"
            )
        )


def test_define_by_run_space_respects_conditions_and_seed():
    import optuna

    from cdfkd.tune.space import DefineByRunSpace
    from cdfkd.tune.spec import Param

    params = {
        "student.family": Param(type="categorical", choices=["mfs", "branch"]),
        "student.fuse_from": Param(type="int", low=0, high=2, when={"student.family": "mfs"}),
        "student.share_until": Param(type="int", low=1, high=2, when={"student.family": "branch"}),
    }

    def sample(seed):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        out = []
        for _ in range(8):
            t = study.ask()
            DefineByRunSpace(params, {})(t)
            out.append(dict(t.params))
            study.tell(t, 0.0)
        return out

    a = sample(3)
    assert a == sample(3)  # a seeded space proposes the same configurations again
    for p in a:
        assert ("student.fuse_from" in p) == (p["student.family"] == "mfs")
        assert ("student.share_until" in p) == (p["student.family"] == "branch")


# ---------------------------------------------------------------- sweeps on a local Ray


def _rows(exp_dir: Path) -> list[dict]:
    with (exp_dir / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_small_sweep_completes_with_distinct_trials_and_shared_teachers(ray_env, digits_ensemble):
    from cdfkd.tune import run_sweep

    spec = _write_spec(
        ray_env / "sweep.yaml",
        name="small",
        base_config=_base(digits_ensemble, ray_env),
        search={
            "method.alpha": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
            "optim.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
        },
        num_samples=3,
        max_concurrent_trials=2,
        seed=1,
        storage_path=str(ray_env / "sweeps"),
    )
    lines: list[str] = []
    summary = run_sweep(spec, write=lines.append)
    rows = _rows(Path(summary["experiment_dir"]))
    assert len(rows) == 3 and all(r["status"] == "COMPLETE" for r in rows)
    assert len({r["param:method.alpha"] for r in rows}) == 3
    assert len({r["relative_accuracy"] for r in rows}) > 1
    assert summary["best"]["relative_accuracy"] == max(float(r["relative_accuracy"]) for r in rows)
    # Teachers came through the object store, shared rather than copied into each trial.
    for row in summary["rows"]:
        assert row["teachers_shared"] == 1.0
    assert any("rel_acc" in line for line in lines)  # the progress table was shown
    # Each trial's run folder is in the experiment folder, also for the third trial,
    # which ran on a reused actor (Ray would put its own trial folder elsewhere).
    for row in summary["rows"]:
        run_dir = Path(row["path"]) / "run"
        assert run_dir.parent.parent == Path(summary["experiment_dir"]).resolve()
        assert (run_dir / "student.pt").is_file() and (run_dir / "result.json").is_file()


def test_nonfinite_trial_fails_cleanly_and_sweep_finishes(ray_env, digits_ensemble, monkeypatch):
    from cdfkd.tune import run_sweep
    from faults.cdfkd_faults import worker_env

    # In the Ray workers, the lr=0.1 trial's student turns NaN at step 7 for certain (a
    # fault injected on purpose, at learning rates that never diverge on their own); the
    # engine's check, the trial and the sweep do the rest.
    env = worker_env({"nonfinite": {"step": 7, "when": {"optim.lr": 0.1}}})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    base = _base(digits_ensemble, ray_env, steps=20, eval_every=10, checkpoint_every=10)
    base["method"] = {"name": "kd_real"}
    spec = _write_spec(
        ray_env / "nan.yaml",
        name="nan",
        base_config=base,
        search={"optim.lr": {"type": "categorical", "choices": [0.05, 0.1]}},
        points_to_evaluate=[{"optim.lr": 0.05}, {"optim.lr": 0.1}],
        num_samples=2,
        max_concurrent_trials=2,
        seed=0,
        storage_path=str(ray_env / "sweeps"),
    )
    summary = run_sweep(spec, write=lambda _: None)
    by_lr = {float(r["param:optim.lr"]): r for r in summary["rows"]}
    assert set(by_lr) == {0.05, 0.1}
    assert by_lr[0.1]["status"] == "FAILED_NONFINITE"
    assert "loss 'student' became nan at step 7" in by_lr[0.1]["error"]
    assert by_lr[0.05]["status"] == "COMPLETE"
    assert summary["best"]["param:optim.lr"] == 0.05


def _terminated_in_snapshot(exp: Path) -> set[str]:
    """Trial ids that Tune's latest experiment snapshot records as TERMINATED."""
    done: set[str] = set()
    for state in exp.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):  # being replaced right now
            continue
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def _wait_for(condition, what: str, timeout: float = 600):
    """Poll ``condition()`` until it is truthy; the timeout only bounds a broken run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_driver_sigkill_then_resume_keeps_finished_trials(ray_env, digits_ensemble):
    from faults.cdfkd_faults import worker_env

    # Trials run one at a time in the order given. The second one waits after its
    # step-12 checkpoint until the driver has been killed, so the kill finds one trial
    # finished (and in Tune's snapshot) and one half done, every time.
    marker, release = ray_env / "held.json", ray_env / "release"
    hold = {"step": 13, "marker": str(marker), "release": str(release)}
    spec = _write_spec(
        ray_env / "kill.yaml",
        name="kill",
        base_config=_base(digits_ensemble, ray_env, steps=36),
        search={"method.alpha": {"type": "float", "low": 0.1, "high": 10.0, "log": True}},
        points_to_evaluate=[{"method.alpha": 1.0}, {"method.alpha": 2.0}],
        num_samples=4,
        max_concurrent_trials=1,
        seed=2,
        storage_path=str(ray_env / "sweeps"),
    )
    exp = ray_env / "sweeps" / "kill"
    cmd = [sys.executable, "-m", "cdfkd", "sweep", str(spec)]
    env = {
        **os.environ,
        **worker_env({"hold": {**hold, "when": {"method.alpha": 2.0}}}),
        "TUNE_GLOBAL_CHECKPOINT_S": "1",  # snapshot often: the wait below is then short
    }
    driver = subprocess.Popen(
        cmd,
        cwd=ray_env,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(marker.exists, "the second trial to reach its hold")
        [first] = _wait_for(lambda: list(exp.glob("*/run/result.json")), "the first result")
        _wait_for(lambda: _terminated_in_snapshot(exp), "Tune to snapshot the finished trial")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    release.touch()
    stamp = first.stat().st_mtime_ns
    resumed = subprocess.run(
        cmd + ["--resume"], cwd=ray_env, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(exp)
    assert len(rows) == 4 and all(r["status"] == "COMPLETE" for r in rows), rows
    assert len({r["trial_id"] for r in rows}) == 4
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not run again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster_places_trials_on_both_nodes(ray_env, digits_ensemble):
    from ray_nodes import LocalCluster

    from cdfkd.tune import run_sweep

    cluster = LocalCluster(ray_env, dict(os.environ))
    try:
        cluster.start_head({"head_slot": 1})
        cluster.add_worker({"gpu_sim": 1})
        spec = _write_spec(
            ray_env / "two.yaml",
            name="two",
            base_config=_base(digits_ensemble, ray_env),
            search={"method.alpha": {"type": "float", "low": 0.1, "high": 10.0, "log": True}},
            num_samples=2,
            max_concurrent_trials=2,
            storage_path=str(ray_env / "sweeps"),
        )
        summary = run_sweep(spec, address=cluster.address, write=lambda _: None)
        assert all(r["status"] == "COMPLETE" for r in summary["rows"])
        assert len({r["node_id"] for r in summary["rows"]}) == 2
        # The remote node's trial wrote its run folder into the (shared) storage path too.
        for row in summary["rows"]:
            assert (Path(row["path"]) / "run" / "student.pt").is_file()
    finally:
        import ray

        ray.shutdown()
        cluster.stop()


def test_unreachable_cluster_is_refused_before_ray_retries(ray_env, monkeypatch):
    import ray

    from cdfkd.tune.run import connect_ray

    def never(*args, **kwargs):  # ray.init would retry an absent head for minutes
        raise AssertionError("ray.init was called for an address nothing listens at")

    monkeypatch.setattr(ray, "init", never)
    with pytest.raises(ConfigError, match="nothing answers at 127.0.0.1"):
        connect_ray(f"127.0.0.1:{_free_port()}")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        connect_ray("no-port-here")


def test_teachers_train_in_parallel_ray_tasks(ray_env):
    from cdfkd.data import load_dataset
    from cdfkd.teachers import TeacherTrainConfig, evaluate_ensemble, load_ensemble
    from cdfkd.teachers.train import eval_loader
    from cdfkd.tune.run import connect_ray
    from cdfkd.tune.teachers import train_ensemble_ray

    connect_ray(None)
    cfg = TeacherTrainConfig.for_dataset("digits", "lenet5", count=2, epochs=2)
    lines: list[str] = []
    manifest = train_ensemble_ray(
        cfg, ray_env / "ens", data_root=str(ray_env / "data"), progress=lines.append
    )
    assert len(manifest["teachers"]) == 2 and len(lines) == 2
    assert [t["seed"] for t in manifest["teachers"]] == [0, 1]
    assert all(t["test_accuracy"] > 0.8 for t in manifest["teachers"])
    ensemble = load_ensemble(ray_env / "ens", "cpu")  # hashes verified on load
    _, test, _ = load_dataset("digits", root=ray_env / "data")
    cpu = torch.device("cpu")
    report = evaluate_ensemble(ensemble, eval_loader(test, 512, cpu), cpu)
    assert report["ensemble_accuracy"] == pytest.approx(manifest["ensemble_accuracy"])
    x = torch.zeros(3, 1, 32, 32)
    assert ensemble(x).shape == (2, 3, 10)


def test_validation_accuracy_objective_needs_held_out_images(tmp_path):
    from cdfkd.tune.spec import load_spec

    spec = {
        "name": "val",
        "base_config": {"method": {"name": "cgdd"}, "teachers": {"path": str(tmp_path)}},
        "objective": {"metric": "validation_accuracy", "mode": "max"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="set data.validation_images"):
        load_spec(path)
    spec["overrides"] = {"data.validation_images": 500}
    path.write_text(yaml.safe_dump(spec))
    loaded, base = load_spec(path)
    assert loaded.objective.metric == "validation_accuracy"
    assert base["data"]["validation_images"] == 500
