"""What ``cdfkd cluster check`` reports, and the checks a cluster-launcher file
(``cluster.py``) and a KubeRay manifest (``kuberay.py``) share: the ``<PLACEHOLDERS>``
still to fill in, the Ray version a cluster pins, and whether a sweep spec can run on
the node types (its trials' resources, the shared storage, how many trials fit at once).
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import yaml

Level = Literal["error", "fill-in", "warning"]
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
#: a Ray version in an image tag (rayproject/ray:2.60.0-py311-gpu) or a pip pin (ray==2.60.0)
RAY_IMAGE = re.compile(r"\brayproject/ray(?:-ml|-llm)?:([^\s'\"]+)")
RAY_PIN = re.compile(r"\bray(?:\[[a-z,\s]*\])?\s*==\s*([0-9][0-9a-z.*]*)")


@dataclass(frozen=True)
class Finding:
    level: Level
    where: str  # a dotted location in the file, or the spec's key
    message: str

    def __str__(self) -> str:
        return f"{self.level:8} {self.where}: {self.message}"


@dataclass(frozen=True)
class NodeType:
    """What a sweep can use of one node type: Ray resources per node, and at most how many
    such nodes the autoscaler may run (the head: always one)."""

    name: str
    resources: dict[str, float]
    max_nodes: int
    head: bool = False


def placeholders(node, where: str = "") -> list[Finding]:
    """A ``fill-in`` finding for every ``<PLACEHOLDER>`` in a YAML tree."""
    if isinstance(node, dict):
        return [f for k, v in node.items() for f in placeholders(v, join(where, str(k)))]
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in placeholders(v, join(where, str(i)))]
    if isinstance(node, str):
        return [
            Finding("fill-in", where, f"replace {m!r} with your value")
            for m in PLACEHOLDER.findall(node)
        ]
    return []


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def installed_ray() -> str:
    return importlib.metadata.version("ray")


def ray_version(where: str, pinned: str) -> list[Finding]:
    """``pinned`` (a version, ``2.60.*`` or an image tag's version part) against the Ray
    installed here, which runs ``ray up``/``ray job submit`` and the checks."""
    here = installed_ray()
    version = pinned.split("-")[0]  # 2.60.0-py311-gpu
    if not re.fullmatch(r"\d+\.\d+(\.[\d*]+)?", version):
        return [
            Finding(
                "warning",
                where,
                f"{pinned!r} does not pin a Ray release: the cluster's Ray may change under "
                f"you; pin {here}, the Ray installed here",
            )
        ]
    theirs, ours = version.split("."), here.split(".")
    if theirs[:2] != ours[:2]:
        return [
            Finding(
                "error",
                where,
                f"Ray {version} on the cluster, Ray {here} here: drivers, `ray job submit` and "
                f"`ray up` need the same Ray on both sides; pin {here} (or install {version} here)",
            )
        ]
    if len(theirs) > 2 and theirs[2] != "*" and theirs[:3] != ours[:3]:
        return [
            Finding(
                "warning",
                where,
                f"Ray {version} on the cluster, Ray {here} here: a patch release apart",
            )
        ]
    return []


def spec_fits(nodes: list[NodeType], shared: list[str], spec_path: Path) -> list[Finding]:
    """Whether the sweep of ``spec_path`` can run on these node types, with ``shared`` the
    paths every node mounts alike."""
    from cdfkd.tune.spec import load_spec

    spec, base = load_spec(spec_path)
    out = []

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
    startable = [n for n in nodes if n.max_nodes > 0]
    # Resources that no node type the cluster can start offers at all: say which.
    missing = [k for k in need if not any(n.resources.get(k, 0) > 0 for n in startable)]
    if missing:
        idle = [n.name for n in nodes if any(n.resources.get(k, 0) > 0 for k in missing)]
        out.append(
            Finding(
                "error",
                "resources",
                f"a trial needs {', '.join(missing)} but "
                + (
                    f"{', '.join(idle)} can never start (max workers 0)"
                    if idle
                    else "no node type offers it"
                )
                + ": its trials would wait PENDING forever; add a worker type with "
                f"{', '.join(missing)} in its resources",
            )
        )
        return out
    fits = {}
    for n in startable:
        per_node = min((math.floor(n.resources.get(k, 0) / v + 1e-9) for k, v in need.items()))
        if per_node > 0:
            fits[n.name] = per_node * n.max_nodes
    if not fits:
        offered = {n.name: n.resources for n in nodes}
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
