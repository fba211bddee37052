"""Faults of a multi-node cluster, on real `ray start` nodes on this machine: a worker node
lost mid-trial, and token authentication. Each node has its own --temp-dir, so that one
node's processes can be found and killed without touching any other Ray on the host."""

from __future__ import annotations

import contextlib
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
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).parent / "ray")
CDFKD = [sys.executable, "-m", "cdfkd"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def _mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


class LocalCluster:
    """A head and worker nodes started with `ray start`, each with its own temp dir."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Path] = []

    def _start(self, args: list[str], resources: dict, env: dict | None) -> Path:
        temp = Path(f"/tmp/cdfkd-node-{self.port}-{len(self.nodes)}")
        self.nodes.append(temp)
        out = subprocess.run(
            [
                RAY,
                "start",
                *args,
                "--num-cpus=1",
                f"--resources={json.dumps(resources)}",
                f"--temp-dir={temp}",
                "--object-store-memory=150000000",
                "--disable-usage-stats",
            ],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return temp

    def start_head(self, resources: dict | None = None) -> Path:
        return self._start(["--head", f"--port={self.port}"], resources or {}, None)

    def add_worker(self, resources: dict, env: dict | None = None) -> Path:
        return self._start([f"--address={self.address}"], resources, env)

    def kill(self, node: Path) -> None:
        """SIGKILL every process of ``node``: its raylet, agents and workers."""
        tree = _children()
        todo, doomed = _mentioning(str(node)), set()
        while todo:
            pid = todo.pop()
            if pid not in doomed and pid != os.getpid():
                doomed.add(pid)
                todo.extend(tree.get(pid, []))
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)


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


def test_worker_node_lost_mid_trial_resumes_on_another_node_in_the_same_mlflow_run(
    ray_env, digits_ensemble
):
    from mlflow import MlflowClient

    from faults.cdfkd_faults import worker_env

    env = {**os.environ}
    cluster = LocalCluster(ray_env, env)
    # Worker A's trial waits after its step-12 checkpoint until the test says go; by then
    # A has been killed, so it never goes on there.
    marker, release = ray_env / "held.json", ray_env / "release"
    hold = worker_env({"hold": {"step": 13, "marker": str(marker), "release": str(release)}})
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
        node_a = cluster.add_worker({"slot": 1}, env=hold)
        driver = subprocess.Popen(
            [*CDFKD, "sweep", str(spec), "--address", cluster.address],
            cwd=ray_env,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _wait_for(marker.exists, "the trial to reach step 13 on worker A")
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
