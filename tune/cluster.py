"""Check a Ray cluster-launcher file (and a sweep spec meant for it) offline, before ``ray up``.

``ray up`` finds most mistakes only after minutes of provisioning, and some never:
a trial that asks for more than any node type offers stays PENDING forever, a
worker without ``RAY_AUTH_MODE=token`` cannot join, a sweep folder outside the
shared file system loses the trials' run folders, a Ray on the cluster that is not
the Ray here refuses drivers. ``check_cluster`` reports them as findings:

- ``error``: Ray would refuse the file, the cluster would be open to the network,
  or the sweep cannot run on it;
- ``fill-in``: a ``<PLACEHOLDER>`` still waits for an account-specific value;
- ``warning``: it would run, but probably not as meant (workers that never stop, or
  stop between trials; fewer trials at once than asked).

A KubeRay manifest (``kind: RayCluster`` or ``RayJob``, ``deploy/kuberay/``) is checked
by ``kuberay.py`` instead. Ray's own schema check (``prepare_config`` +
``validate_config``) is a private API of the pinned Ray; no cloud API is called.
"""

from __future__ import annotations

import copy
import logging
import re
import shlex
from pathlib import Path

import yaml

from cdfkd.errors import ConfigError
from cdfkd.tune.findings import (
    RAY_IMAGE,
    RAY_PIN,
    Finding,
    NodeType,
    installed_ray,
    placeholders,
    ray_version,
    spec_fits,
)

__all__ = ["Finding", "check_cluster", "shared_paths"]

#: Ray's defaults for what the file leaves out
DEFAULT_MAX_WORKERS = 2
DEFAULT_IDLE_MINUTES = 5
#: idle timeouts outside this range are probably not meant (minutes)
IDLE_RANGE = (1, 60)


def check_cluster(path: str | Path, spec_path: str | Path | None = None) -> list[Finding]:
    """Findings for cluster file ``path`` and, with ``spec_path``, a sweep spec to run on it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file {path} does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if _is_kuberay(docs):
        from cdfkd.tune.kuberay import check_kuberay

        return check_kuberay(docs, None if spec_path is None else Path(spec_path))
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ConfigError(
            f"{path} is not a Ray cluster file (a mapping with cluster_name, provider) nor a "
            "KubeRay manifest (apiVersion: ray.io/v1)"
        )
    raw = docs[0]
    if "apiVersion" in raw and "kind" in raw:
        raise ConfigError(
            f"{path} is a Kubernetes {raw['kind']}, not a RayCluster or RayJob: nothing to check"
        )
    findings = _schema(raw)
    findings += placeholders(raw)
    if any(f.level == "error" for f in findings):
        return findings  # the rest would only repeat what the schema said
    findings += _security(raw)
    findings += _autoscaling(raw)
    findings += _ray_versions(raw)
    if spec_path is not None:
        findings += spec_fits(node_types(raw), shared_paths(raw), Path(spec_path))
    return findings


def _is_kuberay(docs: list) -> bool:
    return any(
        isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/") for d in docs
    )


def launch_command(path: str | Path) -> str:
    """What starts the cluster of ``path``: ``ray up`` or ``kubectl apply``."""
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except (OSError, yaml.YAMLError):
        docs = []
    return f"kubectl apply -f {path}" if _is_kuberay(docs) else f"ray up {path}"


def node_types(cluster: dict) -> list[NodeType]:
    """The file's node types as the autoscaler sees them: per-type ``max_workers`` (the
    global one when left out) capped by the global ``max_workers``."""
    cap = cluster.get("max_workers", DEFAULT_MAX_WORKERS)
    head = cluster.get("head_node_type")
    return [
        NodeType(
            name,
            {k: float(v) for k, v in (t.get("resources") or {}).items()},
            1 if name == head else min(t.get("max_workers", cap), cap),
            head=name == head,
        )
        for name, t in cluster.get("available_node_types", {}).items()
    ]


def shared_paths(cluster: dict) -> list[str]:
    """Paths every node sees alike: the containers' bind mounts, else the hosts' NFS mounts."""
    docker = cluster.get("docker") or {}
    found = []
    for option in docker.get("run_options") or []:
        words = shlex.split(str(option))
        for flag, value in zip(words, words[1:] + [""], strict=True):
            if flag in ("-v", "--volume") and ":" in value:
                found.append(value.split(":")[1])
            elif flag.startswith(("-v/", "--volume=")):
                found.append(flag.split(":")[1])
    if found or docker.get("image"):
        return found
    for cmd in (cluster.get("initialization_commands") or []) + (
        cluster.get("setup_commands") or []
    ):
        words = shlex.split(str(cmd).split("||")[-1])
        if "mount" in words and any(w.startswith("nfs") for w in words):
            found.append(words[-1])
    return found


def _schema(raw: dict) -> list[Finding]:
    import jsonschema
    from ray.autoscaler._private.util import logger as ray_util_log
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config logs its defaults at INFO; the findings say what matters.
    ray_util_log.setLevel(logging.WARNING)
    missing = [k for k in ("cluster_name", "provider") if k not in raw]
    if missing:
        return [
            Finding("error", "(top level)", f"Ray's cluster schema: {missing[0]!r} is required")
        ]
    try:
        validate_config(prepare_config(copy.deepcopy(raw)))
    except jsonschema.ValidationError as err:
        where = ".".join(map(str, err.absolute_path)) or "(top level)"
        return [Finding("error", where, f"Ray's cluster schema: {err.message}")]
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        return [Finding("error", "(file)", f"Ray refuses this cluster file: {err}")]
    return []


def _security(raw: dict) -> list[Finding]:
    out = []
    provider = raw["provider"]
    if provider.get("type") == "aws":
        for name, node in raw.get("available_node_types", {}).items():
            if not node.get("node_config", {}).get("SecurityGroupIds"):
                out.append(
                    Finding(
                        "error",
                        f"available_node_types.{name}.node_config",
                        "no SecurityGroupIds: Ray would create a group with SSH open to "
                        "0.0.0.0/0; give a group that allows SSH from your network and "
                        "traffic between its members only",
                    )
                )
        if not provider.get("use_internal_ips"):
            out.append(
                Finding(
                    "warning",
                    "provider.use_internal_ips",
                    "nodes get public IPs; set true and run `ray up` from inside the VPC",
                )
            )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = [str(c) for c in raw.get(key) or []]
        starts = [i for i, c in enumerate(commands) if "ray start" in c]
        if not starts:
            out.append(Finding("error", key, "no `ray start` command"))
            continue
        before = " ".join(commands[: starts[0] + 1])
        if "RAY_AUTH_MODE=token" not in before:
            out.append(
                Finding(
                    "error",
                    key,
                    "`ray start` without `export RAY_AUTH_MODE=token`: "
                    + (
                        "the head would run without token authentication"
                        if key.startswith("head")
                        else "workers cannot join a token-authenticated head"
                    ),
                )
            )
    head = " ".join(str(c) for c in raw.get("head_start_ray_commands") or [])
    if re.search(r"--dashboard-host[= ]0\.0\.0\.0", head):
        out.append(
            Finding(
                "error",
                "head_start_ray_commands",
                "--dashboard-host=0.0.0.0 exposes the dashboard (and job submission) to the "
                "network; use 127.0.0.1 and `ray dashboard cluster.yaml`",
            )
        )
    if not shared_paths(raw):
        out.append(
            Finding(
                "warning",
                "docker.run_options",
                "no shared file system (a `-v HOST:CONTAINER` mount of NFS/EFS): a sweep's "
                "storage_path must be shared once trials run on more than one node",
            )
        )
    return out


def _autoscaling(raw: dict) -> list[Finding]:
    """What decides the bill: how long idle workers live, how many may run, and which
    never stop."""
    out = []
    idle = raw.get("idle_timeout_minutes")
    if idle is None:
        out.append(
            Finding(
                "warning",
                "idle_timeout_minutes",
                f"not set: Ray's default ({DEFAULT_IDLE_MINUTES} min) decides how long idle GPU "
                "workers keep running; set it",
            )
        )
    elif idle < IDLE_RANGE[0]:
        out.append(
            Finding(
                "warning",
                "idle_timeout_minutes",
                f"{idle} min: workers stop in the gap between two trials, so the next trial "
                f"waits minutes for a new machine; use at least {IDLE_RANGE[0]} min",
            )
        )
    elif idle > IDLE_RANGE[1]:
        out.append(
            Finding(
                "warning",
                "idle_timeout_minutes",
                f"{idle} min: every GPU worker keeps running (and billing) that long after the "
                "sweep's last trial",
            )
        )
    cap = raw.get("max_workers")
    if cap is None:
        out.append(
            Finding(
                "warning",
                "max_workers",
                f"not set: Ray's default allows {DEFAULT_MAX_WORKERS} workers in all; set it",
            )
        )
    for node in node_types(raw):
        t = raw["available_node_types"][node.name]
        where = f"available_node_types.{node.name}"
        if not node.head and cap is not None and t.get("max_workers", 0) > cap:
            out.append(
                Finding(
                    "warning",
                    f"{where}.max_workers",
                    f"{t['max_workers']}, but the cluster's max_workers ({cap}) caps it",
                )
            )
        if not node.head and t.get("min_workers", 0) > 0 and node.resources.get("GPU"):
            out.append(
                Finding(
                    "warning",
                    f"{where}.min_workers",
                    f"{t['min_workers']} GPU workers run (and bill) even when no trial needs "
                    "them; 0 lets the autoscaler start them for waiting trials",
                )
            )
    head = " ".join(str(c) for c in raw.get("head_start_ray_commands") or [])
    if re.search(r"--include-dashboard[= ](false|False|0)", head):
        out.append(
            Finding(
                "error",
                "head_start_ray_commands",
                "--include-dashboard=false: `ray job submit` and `ray job logs` need the "
                "dashboard's job server",
            )
        )
    return out


def _ray_versions(raw: dict) -> list[Finding]:
    """The Ray of the images and of the setup commands' pip pins, against the Ray here."""
    out: list[Finding] = []
    docker = raw.get("docker") or {}
    images = {
        f"docker.{k}": docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)
    }
    for name, t in (raw.get("available_node_types") or {}).items():
        for k, v in (t.get("docker") or {}).items():
            if k.endswith("image") and v:
                images[f"available_node_types.{name}.docker.{k}"] = v
    for where, image in images.items():
        match = RAY_IMAGE.search(str(image))
        if match:
            out += ray_version(where, match.group(1))
    pinned = False
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for i, cmd in enumerate(raw.get(key) or []):
            for match in RAY_PIN.finditer(str(cmd)):
                pinned = True
                out += ray_version(f"{key}.{i}", match.group(1))
    if not pinned:
        out.append(
            Finding(
                "warning",
                "setup_commands",
                "no command pins Ray: `pip install` of cdfkd (ray>=2.60) may upgrade the "
                f"image's Ray; add 'ray[default]=={installed_ray()}' to the pip install",
            )
        )
    return out
