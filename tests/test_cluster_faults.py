"""Faults of a multi-node cluster, on real `ray start` nodes on this machine: a worker node
lost mid-trial, and token authentication. Each node has its own --temp-dir, so that one
node's processes can be found and killed without touching any other Ray on the host."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CDFKD = [sys.executable, "-m", "cdfkd"]


def _spec(path: Path, teachers: Path, root: Path, **fields) -> Path:
    base = {
        "method": {"name": "cgdd"},
        "data": {"name": "digits", "root": str(root / "data")},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 36, "batch_size": 16, "eval_every": 12},
    }
    path.write_text(
        yaml.safe_dump(
            {
                "name": path.stem,
                "base_config": base,
                "num_samples": 1,
                "max_concurrent_trials": 1,
                "storage_path": str(root / "sweeps"),
                **fields,
            }
        )
    )
    return path


def _wait_for(condition, what: str, timeout: float = 600):
    deadline = time.time() + timeout  # bounds a broken run only
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    "hold",
    [
        pytest.param({"step": 13}, id="after-its-checkpoint"),
        # Step 24's evaluation is in MLflow, its checkpoint never written: the restored
        # trial computes step 24 again and must not log it twice.
        pytest.param({"step": 24, "at": "save"}, id="between-logging-and-checkpoint"),
    ],
)
def test_worker_node_lost_mid_trial_resumes_on_another_node_in_the_same_mlflow_run(
    ray_env, digits_ensemble, hold
):
    from mlflow import MlflowClient

    from faults.cdfkd_faults import worker_env

    env = {**os.environ}
    cluster = LocalCluster(ray_env, env)
    # Worker A's trial waits where ``hold`` says until the test says go; by then A has
    # been killed, so it never goes on there.
    marker, release = ray_env / "held.json", ray_env / "release"
    faults = worker_env({"hold": {**hold, "marker": str(marker), "release": str(release)}})
    uri = f"sqlite:///{ray_env / 'mlflow.db'}"
    spec = _spec(
        ray_env / "lost.yaml",
        digits_ensemble,
        ray_env,
        resources={"cpu": 1, "custom": {"slot": 1}},  # only workers have a slot
        max_failures=2,
        mlflow={"tracking_uri": uri},
    )
    driver = None
    try:
        cluster.start_head()
        node_a = cluster.add_worker({"slot": 1}, env=faults)
        driver = subprocess.Popen(
            [*CDFKD, "sweep", str(spec), "--address", cluster.address],
            cwd=ray_env,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _wait_for(marker.exists, "the trial to reach its hold on worker A")
        held_on = json.loads(marker.read_text())["node_id"]
        cluster.kill(node_a)  # a spot worker reclaimed: every process of the node, at once
        release.touch()
        cluster.add_worker({"slot": 1})  # the autoscaler's replacement
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-4000:]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.stop()

    exp = ray_env / "sweeps" / "lost"
    with (exp / "results.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["status"] == "COMPLETE" and row["node_id"] != held_on  # finished elsewhere
    result = json.loads((Path(row["path"]) / "run" / "result.json").read_text())
    assert result["started_at_step"] == 12  # from the checkpoint, not from step 0
    assert result["steps"] == 36 and row["relative_accuracy"]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("lost").experiment_id])
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(children) == 1 and len(runs) == 2  # the same child run, continued
    child = children[0]
    assert child.info.status == "FINISHED"
    history = client.get_metric_history(child.info.run_id, "student_accuracy")
    assert [m.step for m in history] == [12, 24, 36, 36]  # none lost, none twice
    loss = client.get_metric_history(child.info.run_id, "loss/student")
    assert [m.step for m in loss] == [12, 24, 36]


def test_token_auth_cluster_runs_a_sweep_with_the_token_and_refuses_without(
    ray_env, digits_ensemble
):
    token = "0123456789abcdef" * 4
    secured = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cluster = LocalCluster(ray_env, secured)
    spec = _spec(
        ray_env / "auth.yaml",
        digits_ensemble,
        ray_env,
        resources={"cpu": 1, "custom": {"slot": 1}},
        mlflow={"enabled": False},
    )
    try:
        cluster.start_head()
        cluster.add_worker({"slot": 1})
        bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(
            [*CDFKD, "sweep", str(spec), "--address", cluster.address],
            cwd=ray_env,
            env=bare,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "export RAY_AUTH_MODE=token" in refused.stderr
        assert "~/.ray/auth_token" in refused.stderr
        assert not (ray_env / "sweeps" / "auth" / "results.csv").exists()
        # With the mode but a wrong or unreadable token: refused with that advice, no
        # traceback. (A short GCS wait: a refused client otherwise retries for ~25 s.)
        quick = {"RAY_gcs_server_port_wait_time_s": "3", "RAY_AUTH_MODE": "token"}
        for wrong in ({"RAY_AUTH_TOKEN": "f" * 64}, {"RAY_AUTH_TOKEN_PATH": str(ray_env / "none")}):
            out = subprocess.run(
                [*CDFKD, "sweep", str(spec), "--address", cluster.address],
                cwd=ray_env,
                env={**bare, **quick, **wrong},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert out.returncode == 1, out.stderr[-3000:]
            assert "Traceback" not in out.stderr, out.stderr[-3000:]
            assert "cdfkd: error: could not connect" in out.stderr
            assert "refused this client's token" in out.stderr
        ran = subprocess.run(
            [*CDFKD, "sweep", str(spec), "--address", cluster.address],
            cwd=ray_env,
            env=secured,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
    finally:
        cluster.stop()
    with (ray_env / "sweeps" / "auth" / "results.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["COMPLETE"]
