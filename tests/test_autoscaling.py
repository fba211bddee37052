"""The autoscaler, for real, on this machine: a sweep makes the cluster grow while its trials
wait and shrink once they are done.

Ray's own autoscaler runs on a ``ray start`` head with the ``fake_multinode`` node provider,
which starts and stops worker nodes as local processes where a cloud provider would start
and stop machines. The cluster config is cluster.yaml's, scaled to two cores: the same node
types (a head without worker resources, a GPU worker type from 0 workers up), with a
stand-in resource for the GPU, two workers at most and a 6-second idle timeout; the sweep
asks for what tune/cluster-fashion-mnist.yaml asks, scaled alike. Token authentication is
on, as on the real cluster.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
#: what GPU is on cluster.yaml's workers, on this GPU-less machine
STAND_IN = "gpu_stand_in"
#: the fake_multinode provider knows its head by this node type name
FAKE_HEAD = "ray.head.default"
MAX_WORKERS = 2
IDLE_MINUTES = 0.1
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
CLUSTER_SPEC = yaml.safe_load((ROOT / "tune" / "cluster-fashion-mnist.yaml").read_text())


def local_config(cluster: dict, port: int) -> tuple[dict, float]:
    """cluster.yaml's autoscaling shape on the fake_multinode provider, and the factor its
    CPU counts were scaled by (a worker gets 1 CPU here)."""
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    # The shape under test: trials cannot run on the head; GPU workers start from none.
    assert not {k: v for k, v in head["resources"].items() if v}, head["resources"]
    assert workers and all(
        t["resources"].get("GPU") and t["min_workers"] == 0 for t in workers.values()
    )
    scale = 1 / max(t["resources"]["CPU"] for t in workers.values())
    local_types: dict = {
        FAKE_HEAD: {"resources": head["resources"], "node_config": {}, "max_workers": 0}
    }
    for name, t in workers.items():
        local_types[name] = {
            "resources": {
                "CPU": math.ceil(t["resources"]["CPU"] * scale),
                STAND_IN: t["resources"]["GPU"],
                "object_store_memory": 100_000_000,
            },
            "node_config": {},
            "min_workers": t["min_workers"],
            "max_workers": min(t["max_workers"], MAX_WORKERS),
        }
    config = {
        "cluster_name": cluster["cluster_name"],
        "max_workers": min(cluster["max_workers"], MAX_WORKERS),
        "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": IDLE_MINUTES,  # cluster.yaml: 10
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "available_node_types": local_types,
        "head_node_type": FAKE_HEAD,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    return config, scale


def _spec(path: Path, teachers: Path, root: Path, scale: float, capacity: int) -> Path:
    res = CLUSTER_SPEC["resources"]
    base = {
        "method": {"name": "cgdd"},
        "data": {"name": "digits", "root": str(root / "data")},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 24, "batch_size": 16, "eval_every": 12},
    }
    path.write_text(
        yaml.safe_dump(
            {
                "name": path.stem,
                "base_config": base,
                "search": {"method.alpha": {"type": "float", "low": 0.5, "high": 4.0}},
                "num_samples": capacity,
                "max_concurrent_trials": min(CLUSTER_SPEC["max_concurrent_trials"], capacity),
                "resources": {"cpu": res["cpu"] * scale, "custom": {STAND_IN: res["gpu"]}},
                "seed": 0,
                "storage_path": str(root / "sweeps"),
                "mlflow": {"enabled": False},
            }
        )
    )
    return path


def _counts(log: Path) -> list[tuple[float, int]]:
    """``(seconds, alive nodes)`` samples of the watcher (whole lines; -1: no answer)."""
    rows = [line.split() for line in log.read_text().split("\n")[:-1]] if log.exists() else []
    return [(float(t), int(n)) for t, n in rows if int(n) >= 0]


def _wait_for(condition, what: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_sweep_grows_the_cluster_for_waiting_trials_and_idle_workers_go(ray_env, digits_ensemble):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    token = "0123456789abcdef" * 4
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cluster = LocalCluster(ray_env, env)
    config, scale = local_config(CLUSTER, cluster.port)
    config_path = ray_env / "autoscaling.json"
    config_path.write_text(json.dumps(config))
    [worker_type] = [t for n, t in config["available_node_types"].items() if n != FAKE_HEAD]
    # Two trials per (stand-in) GPU, as on the cluster; enough trials to need every worker.
    per_worker = int(worker_type["resources"][STAND_IN] / CLUSTER_SPEC["resources"]["gpu"])
    capacity = per_worker * config["max_workers"]
    spec = _spec(ray_env / "grow.yaml", digits_ensemble, ray_env, scale, capacity)
    log = ray_env / "nodes.log"
    watcher = None
    try:
        cluster.start_head(
            num_cpus=0,
            autoscaling_config=config_path,
            env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        )
        watcher = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "ray_nodes.py"),
                "watch",
                cluster.address,
                str(log),
            ],
            env=env,
        )
        driver = subprocess.run(
            [sys.executable, "-m", "cdfkd", "sweep", str(spec), "--address", cluster.address],
            cwd=ray_env,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert driver.returncode == 0, driver.stderr[-4000:]
        swept = _counts(log)[-1][0]
        # Idle workers go after the idle timeout (6 s) and an autoscaler round or two.
        _wait_for(lambda: _counts(log)[-1][1] == 1, "the workers to go", 60)
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait()
        cluster.stop()
    counts = _counts(log)
    print(f"nodes over time (s): {_changes(counts)}, sweep done at {swept:.0f} s")
    assert counts[0][1] == 1  # the head alone, before any trial waits
    assert 2 <= max(n for _, n in counts) <= 1 + config["max_workers"]
    assert counts[-1][1] == 1  # back to the head alone
    with (ray_env / "sweeps" / "grow" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == capacity and all(r["status"] == "COMPLETE" for r in rows), rows
    # Every trial ran on a worker the autoscaler started (fake node ids count up from the head's).
    for row in rows:
        assert row["node_id"] != FAKE_HEAD_NODE_ID and row["node_id"][:-5] == FAKE_HEAD_NODE_ID[:-5]
    _wait_for(lambda: not cluster.leftovers(), "every process of the cluster to be gone", 30)


def _changes(counts: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The samples where the node count changed (and the first)."""
    out: list[tuple[float, int]] = []
    for t, n in counts:
        if not out or out[-1][1] != n:
            out.append((t, n))
    return out
