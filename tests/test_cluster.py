"""cluster.yaml and `cdfkd cluster check`: the shipped file, and the mistakes it must catch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cdfkd.cli import main
from cdfkd.config import ConfigError
from cdfkd.tune.cluster import check_cluster, shared_paths

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
CLUSTER_SPEC = ROOT / "tune" / "cluster-fashion-mnist.yaml"


def _filled() -> dict:
    text = CLUSTER.read_text()
    for name, value in {
        "<AMI_ID>": "ami-0123456789abcdef0",
        "<SUBNET_ID>": "subnet-0123456789abcdef0",
        "<SECURITY_GROUP_ID>": "sg-0123456789abcdef0",
        "<HEAD_INSTANCE_PROFILE_ARN>": "arn:aws:iam::123456789012:instance-profile/ray-head",
        "<WORKER_INSTANCE_PROFILE_ARN>": "arn:aws:iam::123456789012:instance-profile/ray-worker",
        "<EFS_DNS_NAME>": "fs-0123456789abcdef0.efs.us-west-2.amazonaws.com",
    }.items():
        text = text.replace(name, value)
    return yaml.safe_load(text)


def _write(tmp_path: Path, cluster: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cluster))
    return path


def test_shipped_cluster_only_waits_for_account_values(capsys):
    findings = check_cluster(CLUSTER, CLUSTER_SPEC)
    assert {f.level for f in findings} == {"fill-in"}
    assert {f.message.split("'")[1] for f in findings} == {
        "<AMI_ID>",
        "<SUBNET_ID>",
        "<SECURITY_GROUP_ID>",
        "<HEAD_INSTANCE_PROFILE_ARN>",
        "<WORKER_INSTANCE_PROFILE_ARN>",
        "<EFS_DNS_NAME>",
    }
    assert "available_node_types.gpu_a10g.node_config.ImageId" in {f.where for f in findings}
    assert main(["cluster", "check", str(CLUSTER)]) == 1
    assert "to fix or fill in" in capsys.readouterr().out


def test_filled_cluster_and_its_sweep_are_ready(tmp_path, capsys):
    path = _write(tmp_path, _filled())
    assert check_cluster(path, CLUSTER_SPEC) == []
    assert main(["cluster", "check", str(path), "--spec", str(CLUSTER_SPEC)]) == 0
    assert "ready for `ray up" in capsys.readouterr().out
    assert shared_paths(_filled()) == ["/mnt/cdfkd"]


def _mutated(change) -> dict:
    cluster = copy.deepcopy(_filled())
    change(cluster)
    return cluster


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (
            lambda c: c["available_node_types"]["gpu_a10g"].update(min_worker=1),
            "available_node_types.gpu_a10g",
            "'min_worker' was unexpected",
        ),
        (
            lambda c: c["available_node_types"]["gpu_a10g"]["resources"].update(GPU=0.5),
            "available_node_types.gpu_a10g.resources.GPU",
            "not of type 'integer'",
        ),
        (lambda c: c.update(head_node_type="nope"), "(file)", "`head_node_type` must be one of"),
        (
            lambda c: c["available_node_types"]["gpu_a10g"]["node_config"].pop("SecurityGroupIds"),
            "available_node_types.gpu_a10g.node_config",
            "SSH open to 0.0.0.0/0",
        ),
        (
            lambda c: c.update(
                worker_start_ray_commands=["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
            ),
            "worker_start_ray_commands",
            "cannot join",
        ),
        (
            lambda c: c["head_start_ray_commands"].append(
                "RAY_AUTH_MODE=token ray start --head --dashboard-host=0.0.0.0"
            ),
            "head_start_ray_commands",
            "exposes the dashboard",
        ),
    ],
)
def test_cluster_mistakes_are_errors_that_say_where(tmp_path, change, where, message):
    findings = check_cluster(_write(tmp_path, _mutated(change)))
    errors = [f for f in findings if f.level == "error"]
    assert len(errors) == 1, findings
    assert errors[0].where == where and message in errors[0].message


def _spec(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(CLUSTER_SPEC.read_text())
    raw["base"] = str(ROOT / "configs" / "fashion-mnist" / "cgdd.yaml")
    raw.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_that_cannot_run_on_the_cluster_is_refused(tmp_path):
    cluster = _write(tmp_path, _filled())

    def findings(**changes):
        return [
            (f.level, f.where, f.message)
            for f in check_cluster(cluster, _spec(tmp_path, **changes))
        ]

    # More GPU per trial than a node has: the trials would wait forever.
    [(level, where, message)] = findings(resources={"cpu": 4, "gpu": 2})
    assert (level, where) == ("error", "resources") and "PENDING forever" in message
    # Custom resources count too.
    [(level, _, _)] = findings(resources={"cpu": 1, "gpu": 0, "custom": {"tpu": 1}})
    assert level == "error"
    # 8 g5 workers x 2 trials each = 16 at once.
    [(level, where, message)] = findings(max_concurrent_trials=40)
    assert (level, where) == ("warning", "max_concurrent_trials") and "at most 16" in message
    # A sweep folder outside the shared mount would strand the workers' run folders.
    [(level, where, message)] = findings(storage_path="/tmp/sweeps")
    assert (level, where) == ("error", "storage_path") and "/mnt/cdfkd" in message
    [(level, where, _)] = findings(storage_path="runs/sweeps")
    assert (level, where) == ("error", "storage_path")


def test_shared_paths_without_docker_come_from_nfs_mounts():
    cluster = _filled()
    del cluster["docker"]
    assert shared_paths(cluster) == ["/mnt/cdfkd"]
    cluster["initialization_commands"] = ["sudo mkdir -p /data"]
    assert shared_paths(cluster) == []


def test_unreadable_cluster_files_say_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_cluster(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="not a Ray cluster file"):
        check_cluster(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("cluster_name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        check_cluster(tmp_path / "bad.yaml")
