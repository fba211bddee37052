"""Check a Ray cluster-launcher file (and a sweep spec meant for it) offline, before ``ray up``.

``ray up`` finds most mistakes only after minutes of provisioning, and some never:
a trial that asks for more than any node type offers stays PENDING forever, a
worker without ``RAY_AUTH_MODE=token`` cannot join, a sweep folder outside the
shared file system loses the trials' run folders. ``check_cluster`` reports them
as findings:

- ``error``: Ray would refuse the file, the cluster would be open to the network,
  or the sweep cannot run on it;
- ``fill-in``: a ``<PLACEHOLDER>`` still waits for an account-specific value;
- ``warning``: it would run, but probably not as meant.

Ray's own schema check (``prepare_config`` + ``validate_config``) is a private API
of the pinned Ray; no cloud API is called.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import yaml

from cdfkd.errors import ConfigError

Level = Literal["error", "fill-in", "warning"]
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")


@dataclass(frozen=True)
class Finding:
    level: Level
    where: str  # a dotted location in the file, or the spec's key
    message: str

    def __str__(self) -> str:
        return f"{self.level:8} {self.where}: {self.message}"


def check_cluster(path: str | Path, spec_path: str | Path | None = None) -> list[Finding]:
    """Findings for cluster file ``path`` and, with ``spec_path``, a sweep spec to run on it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} is not a Ray cluster file (a mapping with cluster_name, provider)"
        )
    findings = _schema(raw)
    findings += [
        Finding("fill-in", where, f"replace {value!r} with your value")
        for where, value in _placeholders(raw)
    ]
    if any(f.level == "error" for f in findings):
        return findings  # the rest would only repeat what the schema said
    findings += _security(raw)
    if spec_path is not None:
        findings += _spec_fits(raw, Path(spec_path))
    return findings


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
    try:
        validate_config(prepare_config(copy.deepcopy(raw)))
    except jsonschema.ValidationError as err:
        where = ".".join(map(str, err.absolute_path)) or "(top level)"
        return [Finding("error", where, f"Ray's cluster schema: {err.message}")]
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        return [Finding("error", "(file)", f"Ray refuses this cluster file: {err}")]
    return []


def _placeholders(node, where: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _placeholders(v, _join(where, str(k)))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _placeholders(v, _join(where, str(i)))]
    if isinstance(node, str):
        return [(where, m) for m in PLACEHOLDER.findall(node)]
    return []


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


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


def _spec_fits(raw: dict, spec_path: Path) -> list[Finding]:
    from cdfkd.tune.spec import load_spec

    spec, base = load_spec(spec_path)
    out = []
    shared = shared_paths(raw)

    def on_shared(p: str) -> bool:
        return any(Path(p).is_relative_to(s) for s in shared)

    # load_spec made relative paths absolute against this machine's working directory,
    # which says nothing about the head: read the spec's own text for that.
    text = yaml.safe_load(spec_path.read_text()) or {}
    for key, value, level, why in (
        (
            "storage_path",
            spec.storage_path,
            "error",
            "trials on workers write their run folders there, and the driver reads them",
        ),
        ("data.root", base["data"]["root"], "warning", "every worker would download the data"),
    ):
        level = cast(Level, level)
        given = text.get(key) if key == "storage_path" else text.get("overrides", {}).get(key)
        if given is not None and not Path(str(given)).is_absolute():
            out.append(
                Finding(
                    level,
                    key,
                    f"{given!r} is relative to the working directory on the head: give an "
                    f"absolute path under the shared {', '.join(shared) or 'file system'} ({why})",
                )
            )
        elif shared and not on_shared(value):
            out.append(
                Finding(level, key, f"{value} is not under the shared {', '.join(shared)}: {why}")
            )
    need = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu, **spec.resources.custom}
    need = {k: v for k, v in need.items() if v > 0}
    fits = {}
    cap = raw.get("max_workers", 2)  # Ray's default
    for name, node in raw.get("available_node_types", {}).items():
        have = node.get("resources") or {}
        per_node = min((math.floor(have.get(k, 0) / v + 1e-9) for k, v in need.items()), default=0)
        if per_node > 0:
            nodes = (
                1 if name == raw.get("head_node_type") else min(node.get("max_workers", cap), cap)
            )
            fits[name] = per_node * nodes
    if not fits:
        offered = {
            name: node.get("resources") for name, node in raw["available_node_types"].items()
        }
        out.append(
            Finding(
                "error",
                "resources",
                f"a trial needs {need} but no node type offers that ({offered}): its trials "
                "would wait PENDING forever; lower resources or add a node type",
            )
        )
    elif sum(fits.values()) < spec.max_concurrent_trials:
        out.append(
            Finding(
                "warning",
                "max_concurrent_trials",
                f"{spec.max_concurrent_trials} asked, but at most {sum(fits.values())} trials "
                f"fit the cluster at once ({fits})",
            )
        )
    return out
