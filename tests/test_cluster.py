"""cluster.yaml and `cdfkd cluster check`: the shipped file, and the mistakes it must catch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cdfkd.cli import main
from cdfkd.config import ConfigError
from cdfkd.tune.cluster import check_cluster, shared_paths
from cdfkd.tune.findings import installed_ray

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


# ----------------------------------------------------------------------------- autoscaling


def _levels(cluster: dict, tmp_path: Path, spec: Path | None = None) -> list[tuple[str, str, str]]:
    return [(f.level, f.where, f.message) for f in check_cluster(_write(tmp_path, cluster), spec)]


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes", "Ray's default (5 min)"),
        (
            lambda c: c.update(idle_timeout_minutes=0.5),
            "idle_timeout_minutes",
            "between two trials",
        ),
        (lambda c: c.update(idle_timeout_minutes=240), "idle_timeout_minutes", "(and billing)"),
        (lambda c: c.pop("max_workers"), "max_workers", "allows 2 workers"),
        (
            lambda c: c["available_node_types"]["gpu_a10g"].update(max_workers=12),
            "available_node_types.gpu_a10g.max_workers",
            "max_workers (8) caps it",
        ),
        (
            lambda c: c["available_node_types"]["gpu_a10g"].update(min_workers=2),
            "available_node_types.gpu_a10g.min_workers",
            "even when no trial needs them",
        ),
    ],
)
def test_autoscaling_fields_that_decide_the_bill_are_warned_about(tmp_path, change, where, message):
    [(level, found_where, found)] = _levels(_mutated(change), tmp_path)
    assert (level, found_where) == ("warning", where) and message in found


def test_a_head_without_the_job_server_is_refused(tmp_path):
    def no_dashboard(c):
        c["head_start_ray_commands"][-1] += " --include-dashboard=false"

    [(level, where, message)] = _levels(_mutated(no_dashboard), tmp_path)
    assert (level, where) == ("error", "head_start_ray_commands") and "ray job submit" in message


def test_every_resource_a_sweep_asks_for_needs_a_worker_type_that_can_start(tmp_path):
    # A custom resource nobody offers is named.
    [(level, where, message)] = _levels(
        _filled(), tmp_path, _spec(tmp_path, resources={"cpu": 1, "custom": {"tpu": 1}})
    )
    assert (level, where) == ("error", "resources") and "needs tpu" in message
    # The GPU type exists but may never start: that is said, not "no node type".
    stopped = _mutated(lambda c: c["available_node_types"]["gpu_a10g"].update(max_workers=0))
    [(level, where, message)] = _levels(stopped, tmp_path, _spec(tmp_path))
    assert (level, where) == ("error", "resources") and "gpu_a10g can never start" in message
    # Only the head offers the custom resource: it is always there, so that fits.
    slot = _mutated(lambda c: c["available_node_types"]["head"]["resources"].update(CPU=1, slot=1))
    spec = _spec(tmp_path, resources={"cpu": 1, "custom": {"slot": 1}}, max_concurrent_trials=1)
    assert [f for f in _levels(slot, tmp_path, spec) if f[0] == "error"] == []


# ----------------------------------------------------------------------------- Ray version


def _other(version: str, minor: int = 0, patch: int = 0) -> str:
    major, mi, pa = (int(x) for x in version.split(".")[:3])
    return f"{major}.{mi + minor}.{pa + patch}"


def test_the_ray_version_pinned_on_the_cluster_is_the_one_installed_here(tmp_path):
    here = installed_ray()
    newer = _other(here, minor=1)

    def image(tag):
        return lambda c: c["docker"].update(image=f"rayproject/ray:{tag}-py311-gpu")

    def pin(version):
        return lambda c: c.update(
            setup_commands=[f"pip install -q -e /home/ray/cdfkd 'ray[default]=={version}'"]
        )

    [(level, where, message)] = _levels(_mutated(image(newer)), tmp_path)
    assert (level, where) == ("error", "docker.image") and f"Ray {newer} on the cluster" in message
    assert f"Ray {here} here" in message
    [(level, where, _)] = _levels(_mutated(pin(newer)), tmp_path)
    assert (level, where) == ("error", "setup_commands.0")
    # A patch release apart, or an unpinned tag: a warning.
    [(level, _, message)] = _levels(_mutated(image(_other(here, patch=1))), tmp_path)
    assert level == "warning" and "patch release" in message
    [(level, _, message)] = _levels(_mutated(image("nightly")), tmp_path)
    assert level == "warning" and "does not pin a Ray release" in message
    # pip left free to move Ray.
    unpinned = _mutated(lambda c: c.update(setup_commands=["pip install -q -e /home/ray/cdfkd"]))
    [(level, where, message)] = _levels(unpinned, tmp_path)
    assert (level, where) == ("warning", "setup_commands") and f"ray[default]=={here}" in message
    # `==2.60.*` style pins match any patch release.
    star = ".".join(here.split(".")[:2]) + ".*"
    assert _levels(_mutated(pin(star)), tmp_path) == []


# ----------------------------------------------------------------------------- KubeRay

KUBERAY = ROOT / "deploy" / "kuberay"
IMAGE = "registry.example.com/cdfkd:0.1.0"


def _manifest(name: str, change=None) -> list[dict]:
    docs = list(yaml.safe_load_all((KUBERAY / name).read_text().replace("<CDFKD_IMAGE>", IMAGE)))
    if change is not None:
        change(docs[0]["spec"])
    return docs


def _kuberay_findings(tmp_path: Path, docs: list[dict], spec: Path | None = None):
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return [(f.level, f.where, f.message) for f in check_cluster(path, spec)]


def test_shipped_kuberay_manifests_only_wait_for_the_image(tmp_path, capsys):
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")):
        findings = check_cluster(KUBERAY / name, CLUSTER_SPEC)
        assert {f.level for f in findings} == {"fill-in"}, findings
        assert {f.message for f in findings} == {"replace '<CDFKD_IMAGE>' with your value"}
        assert all(f.where.startswith(f"{kind}/") for f in findings)
        assert _kuberay_findings(tmp_path, _manifest(name), CLUSTER_SPEC) == []
    assert main(["cluster", "check", str(KUBERAY / "rayjob.yaml")]) == 1
    assert "before `kubectl apply -f" in capsys.readouterr().out
    # One cluster shape for both: the RayJob's cluster is the RayCluster.
    [cluster] = _manifest("raycluster.yaml")
    [job] = _manifest("rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    with pytest.raises(ConfigError, match="PersistentVolumeClaim, not a RayCluster"):
        check_cluster(KUBERAY / "storage.yaml")


def test_kuberay_shape_cpu_head_with_mlflow_autoscaled_gpu_workers_shared_volume():
    from cdfkd.tune.kuberay import node_types

    [cluster] = _manifest("raycluster.yaml")
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "cdfkd-ray-token"}
    assert (
        spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    )
    head, [gpu] = node_types(spec)[0], node_types(spec)[1:]
    assert head.head and head.resources == {"CPU": 0.0, "GPU": 0.0}  # no trial on the head
    assert gpu.resources == {"CPU": 8.0, "GPU": 1.0} and gpu.max_nodes == 8
    [worker] = spec["workerGroupSpecs"]
    assert worker["minReplicas"] == 0 == worker["replicas"]
    # Trials of the cluster sweep fit the workers as cluster.yaml's: two per GPU, 16 at once.
    sweep = yaml.safe_load(CLUSTER_SPEC.read_text())
    per_pod = min(gpu.resources["CPU"] / sweep["resources"]["cpu"], 1 / sweep["resources"]["gpu"])
    assert per_pod == 2 and per_pod * gpu.max_nodes == sweep["max_concurrent_trials"]
    ec2 = _filled()["available_node_types"]["gpu_a10g"]
    assert gpu.resources == {k: float(v) for k, v in ec2["resources"].items()}
    assert gpu.max_nodes == ec2["max_workers"]
    # Every Ray pod mounts the claim at the spec's shared path.
    pods = [spec["headGroupSpec"]["template"]["spec"], worker["template"]["spec"]]
    for pod in pods:
        [claim] = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claim["persistentVolumeClaim"]["claimName"] == "cdfkd-shared"
        ray_container = pod["containers"][0]
        assert {"name": claim["name"], "mountPath": "/mnt/cdfkd"} in ray_container["volumeMounts"]
        # KubeRay writes the Ray container's `ray start` command: nothing may replace it.
        assert "command" not in ray_container and "args" not in ray_container
    [storage] = yaml.safe_load_all((KUBERAY / "storage.yaml").read_text())
    assert storage["metadata"]["name"] == "cdfkd-shared"
    assert storage["spec"]["accessModes"] == ["ReadWriteMany"]
    assert sweep["storage_path"].startswith("/mnt/cdfkd/")


def test_kuberay_container_commands_are_what_cdfkd_and_mlflow_accept():
    import shlex

    from cdfkd.cli.main import build_parser

    [cluster] = _manifest("raycluster.yaml")
    [job] = _manifest("rayjob.yaml")
    # The job's command is a `cdfkd sweep` this cdfkd parses, on a spec the image holds.
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "cdfkd"
    args = build_parser().parse_args(words[1:])
    assert args.func.__name__ == "_run_sweep" and args.address == "auto" and not args.resume
    assert args.spec.startswith("/home/ray/cdfkd/")
    assert (ROOT / args.spec.removeprefix("/home/ray/cdfkd/")) == CLUSTER_SPEC
    # The MLflow container serves the store on the shared volume, at the port the driver's
    # MLFLOW_TRACKING_URI names.
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    [mlflow] = [c for c in head["containers"] if c["name"] == "mlflow"]
    assert mlflow["command"] == ["bash", "-c"]
    script = shlex.split(mlflow["args"][0])
    server = script[script.index("mlflow") :]
    assert server[:2] == ["mlflow", "server"]
    options = dict(zip(server[2::2], server[3::2], strict=True))
    assert options["--backend-store-uri"] == "sqlite:////mnt/cdfkd/mlflow/mlflow.db"
    assert options["--artifacts-destination"].startswith("/mnt/cdfkd/mlflow/")
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://$(POD_IP):{options['--port']}"
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"containerPort": int(options["--port"]), "name": "mlflow"} in mlflow["ports"]
    # The image: Ray as rayVersion and as installed here, and every folder it copies exists.
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    here = installed_ray()
    assert f"FROM rayproject/ray:{cluster['spec']['rayVersion']}-py311-gpu" in dockerfile
    assert cluster["spec"]["rayVersion"] == here and f"'ray[default]=={here}'" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[2:-1]:
                assert (ROOT / source).exists(), source


def _env(group: dict) -> list:
    return group["template"]["spec"]["containers"][0].setdefault("env", [])


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (
            lambda s: s["workerGroupSpecs"][0].update(minReplica=1),
            "workerGroupSpecs.0.minReplica",
            "unknown field",
        ),
        (lambda s: s.pop("authOptions"), "authOptions", "without token authentication"),
        (lambda s: s["authOptions"].update(mode="disabled"), "authOptions.mode", "off"),
        (
            lambda s: _env(s["workerGroupSpecs"][0]).append(
                {"name": "RAY_AUTH_TOKEN", "value": "x"}
            ),
            "workerGroupSpecs.0.template.spec.containers.0.env",
            "written in the manifest",
        ),
        (lambda s: s.update(rayVersion="2.40.0"), "rayVersion", "Ray 2.40.0 on the cluster"),
        (lambda s: s.pop("rayVersion"), "rayVersion", "missing"),
        (
            lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer"),
            "headGroupSpec",
            "reachable from outside",
        ),
        (
            lambda s: s["workerGroupSpecs"][0].update(minReplicas=9),
            "workerGroupSpecs.0",
            "minReplicas 9 > maxReplicas 8",
        ),
    ],
)
def test_kuberay_mistakes_are_errors_that_say_where(tmp_path, change, where, message):
    findings = _kuberay_findings(tmp_path, _manifest("raycluster.yaml", change))
    errors = [f for f in findings if f[0] == "error"]
    assert len(errors) == 1, findings
    assert errors[0][1] == f"RayCluster/cdfkd.spec.{where}" and message in errors[0][2]


def test_kuberay_autoscaling_and_sweep_fit(tmp_path):
    def gpu_limits(s):
        res = s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
        return res["requests"], res["limits"]

    def no_gpu(s):
        for part in gpu_limits(s):
            part.pop("nvidia.com/gpu")

    [(level, where, message)] = _kuberay_findings(
        tmp_path, _manifest("raycluster.yaml", no_gpu), CLUSTER_SPEC
    )
    assert (level, where) == ("error", "RayCluster/cdfkd.spec: resources")
    assert "needs GPU" in message and "PENDING forever" in message
    # 4 CPUs a pod instead of 8: one trial a pod, 8 at once where 16 are asked.
    half = _manifest("raycluster.yaml", lambda s: [p.update(cpu="4") for p in gpu_limits(s)])
    [(level, where, message)] = _kuberay_findings(tmp_path, half, CLUSTER_SPEC)
    assert (level, where) == ("warning", "RayCluster/cdfkd.spec: max_concurrent_trials")
    assert "at most 8" in message
    # No autoscaler: the GPU group stays at 0 replicas.
    fixed = _manifest("raycluster.yaml", lambda s: s.update(enableInTreeAutoscaling=False))
    found = _kuberay_findings(tmp_path, fixed, CLUSTER_SPEC)
    assert ("warning", "RayCluster/cdfkd.spec.enableInTreeAutoscaling") in {f[:2] for f in found}
    assert any(f[0] == "error" and "can never start" in f[2] for f in found), found
    short = _manifest(
        "raycluster.yaml", lambda s: s["autoscalerOptions"].update(idleTimeoutSeconds=5)
    )
    [(level, _, message)] = _kuberay_findings(tmp_path, short)
    assert level == "warning" and "between two trials" in message


def test_kuberay_job_settings(tmp_path):
    def retried(s):
        s["backoffLimit"] = 2

    [job] = _manifest("rayjob.yaml")
    retried(job["spec"])
    [(level, where, message)] = _kuberay_findings(tmp_path, [job])
    assert (level, where) == ("warning", "RayJob/cdfkd-fmnist.spec.backoffLimit")
    assert "--resume" in message
    job["spec"]["entrypoint"] += " --resume"  # a resubmission may retry
    assert _kuberay_findings(tmp_path, [job]) == []
    job["spec"].pop("shutdownAfterJobFinishes")
    [(level, where, _)] = _kuberay_findings(tmp_path, [job])
    assert (level, where) == ("warning", "RayJob/cdfkd-fmnist.spec.shutdownAfterJobFinishes")


def test_job_working_dir_carries_specs_and_configs_not_the_code():
    """What `ray job submit --working-dir .` uploads from the repository (README, Clusters)."""
    from ray._private.runtime_env.packaging import _dir_travel

    files: list[str] = []
    _dir_travel(
        ROOT,
        [],
        lambda p: files.append(str(p.relative_to(ROOT))) if p.is_file() else None,
        include_gitignore=True,
    )
    assert "tune/cluster-fashion-mnist.yaml" in files
    assert "configs/fashion-mnist/cgdd.yaml" in files
    code = [f for f in files if f.endswith(".py")]
    assert code == [], code  # the nodes' installed cdfkd runs, never a second copy
    assert sum((ROOT / f).stat().st_size for f in files) < 2**20
