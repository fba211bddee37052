"""A sweep run the way README's cluster walk-through runs it: submitted as a Ray job
(`ray job submit --working-dir ... -- cdfkd sweep ...`) to a cluster with the job server,
stopped mid-sweep with `ray job stop`, and submitted again with `--resume`.

The job server is part of the full dashboard, which needs ``ray[default]`` (in the ``test``
extra). Token authentication is on: the `ray job` commands authenticate with the token.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import RAY, LocalCluster

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.mlflow,
    pytest.mark.skipif(
        importlib.util.find_spec("aiohttp_cors") is None,
        reason="Ray Jobs need the dashboard's job server: pip install 'ray[default]==2.60.*' "
        "(it is in the test extra)",
    ),
]


def _spec(folder: Path, teachers: Path, root: Path, uri: str) -> Path:
    """Two trials, one at a time, in the order given."""
    folder.mkdir()
    base = {
        "method": {"name": "cgdd"},
        "data": {"name": "digits", "root": str(root / "data")},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 24, "batch_size": 16, "eval_every": 12},
    }
    path = folder / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "jobs",
                "base_config": base,
                "search": {"method.alpha": {"type": "float", "low": 0.5, "high": 4.0}},
                "points_to_evaluate": [{"method.alpha": 1.0}, {"method.alpha": 2.0}],
                "num_samples": 2,
                "max_concurrent_trials": 1,
                "storage_path": str(root / "sweeps"),
                "mlflow": {"tracking_uri": uri},
            }
        )
    )
    return path


def _wait_for(condition, what: str, timeout: float = 600):
    deadline = time.time() + timeout  # bounds a broken run only
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _snapshot_has(exp: Path, status: str, checkpoint: str | None = None) -> bool:
    """Whether Tune's latest experiment snapshot has a trial in ``status`` (and, with
    ``checkpoint``, one whose state names that checkpoint folder)."""
    for state in exp.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):  # being replaced right now
            continue
        for trial_json, run_meta in data.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == status and (checkpoint is None or checkpoint in run_meta):
                return True
    return False


def test_sweep_as_a_ray_job_stopped_and_resubmitted_with_resume_loses_nothing(
    ray_env, digits_ensemble
):
    from mlflow import MlflowClient

    from faults.cdfkd_faults import worker_env

    token = "0123456789abcdef" * 4
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # The job runs `cdfkd` from PATH on the head, as on a cluster node.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **auth, "PATH": path}
    cluster = LocalCluster(ray_env, env)
    uri = f"sqlite:///{ray_env / 'mlflow.db'}"
    spec = _spec(ray_env / "job", digits_ensemble, ray_env, uri)
    exp = ray_env / "sweeps" / "jobs"
    # The second trial waits after its step-12 checkpoint until the job has been stopped.
    marker, release = ray_env / "held.json", ray_env / "release"
    hold = {"step": 13, "marker": str(marker), "release": str(release)}
    faults = {
        **worker_env({"hold": {**hold, "when": {"method.alpha": 2.0}}}),
        "TUNE_GLOBAL_CHECKPOINT_S": "1",  # snapshot often: the wait below is then short
    }

    def job(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [RAY, "job", *args],
            cwd=ray_env,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert not check or out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    sweep = ["--", "cdfkd", "sweep", spec.name, "--address", "auto"]
    address: list[str] = []
    t0, took = time.time(), {}
    try:
        cluster.start_head(dashboard=True)
        took["head"] = time.time() - t0
        address = ["--address", str(cluster.dashboard_url)]
        job(
            "submit",
            *address,
            "--submission-id=sweep-1",
            f"--working-dir={spec.parent}",
            f"--runtime-env-json={json.dumps({'env_vars': faults})}",
            "--no-wait",
            *sweep,
        )
        _wait_for(marker.exists, "the second trial to reach its hold")
        took["held"] = time.time() - t0
        [first] = _wait_for(lambda: list(exp.glob("*/run/result.json")), "the first result")
        _wait_for(lambda: _snapshot_has(exp, "TERMINATED"), "Tune to snapshot the first trial")
        _wait_for(
            lambda: _snapshot_has(exp, "RUNNING", "checkpoint_000000"),
            "Tune to snapshot the second trial's checkpoint",
        )
        took["snapshot"] = time.time() - t0
        assert "was stopped" in job("stop", *address, "sweep-1").stdout  # waits for it to end
        took["stopped"] = time.time() - t0
        # The driver went, and with it the job's trials: the held one never goes on.
        held = Path(f"/proc/{json.loads(marker.read_text())['pid']}")
        _wait_for(lambda: not held.exists(), "the held trial's worker to end with its job", 60)
        release.touch()
        stamp = first.stat().st_mtime_ns
        job(
            "submit",
            *address,
            "--submission-id=sweep-2",
            f"--working-dir={spec.parent}",
            "--no-wait",
            *sweep,
            "--resume",
        )
        logs = job("logs", *address, "--follow", "sweep-2").stdout  # until the job ends
        took["resumed"] = time.time() - t0
        assert "succeeded" in job("status", *address, "sweep-2").stdout, logs
        print("seconds since the head started:", {k: round(v) for k, v in took.items()})
    except AssertionError as err:  # what the jobs said, for a failure's report
        if not address:
            raise
        said = [
            job("logs", *address, j, check=False).stdout[-3000:] for j in ("sweep-1", "sweep-2")
        ]
        raise AssertionError(f"{err}\n--- job logs:\n" + "\n---\n".join(said)) from None
    finally:
        cluster.stop()
    assert "resuming sweep jobs" in logs and "2 trials: 2 complete" in logs, logs

    with (exp / "results.csv").open() as f:
        rows = {float(r["param:method.alpha"]): r for r in csv.DictReader(f)}
    assert set(rows) == {1.0, 2.0} and all(r["status"] == "COMPLETE" for r in rows.values())
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not run again
    second = json.loads((Path(rows[2.0]["path"]) / "run" / "result.json").read_text())
    assert second["started_at_step"] == 12 and second["steps"] == 24  # from its checkpoint
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert len(runs) == 3  # the sweep and its two trials: none started twice
    assert {r.info.status for r in runs} == {"FINISHED"}
    for child in (r for r in runs if r.data.tags.get("run_kind") == "trial"):
        history = client.get_metric_history(child.info.run_id, "student_accuracy")
        assert [m.step for m in history] == [12, 24, 24]  # none lost, none twice
