"""Check a KubeRay manifest (``RayCluster`` or ``RayJob``, ray.io/v1; ``deploy/kuberay/``)
offline, before ``kubectl apply``: what ``cdfkd cluster check`` does for cluster.yaml.

Kubernetes drops unknown fields of a custom resource silently (a ``minReplica`` typo
just vanishes), and the rest shows only once pods are scheduled. So the Ray-specific
fields are read against KubeRay 1.7's API (``ray-operator/apis/ray/v1``; pod templates
are Kubernetes' own and not checked beyond what a sweep needs), then: token
authentication for every Ray container, the Ray version, autoscaling, a volume that
every Ray pod mounts at the same path, and, with a sweep spec, that its trials fit a
worker group.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

from cdfkd.tune.findings import (
    RAY_IMAGE,
    Finding,
    NodeType,
    join,
    placeholders,
    ray_version,
    spec_fits,
)

#: the fields of the ray.io/v1 types (KubeRay 1.7), by the path of the object holding them
FIELDS = {
    "cluster": "upgradeStrategy authOptions suspend managedBy autoscalerOptions "
    "headServiceAnnotations enableInTreeAutoscaling gcsFaultToleranceOptions "
    "historyServerOptions networkPolicy tlsOptions headGroupSpec rayVersion workerGroupSpecs",
    "head": "template headService enableIngress ingressOptions resources labels rayStartParams "
    "serviceType",
    "worker": "suspend groupName replicas minReplicas maxReplicas idleTimeoutSeconds priority "
    "resources labels rayStartParams template scaleStrategy numOfHosts",
    "autoscaler": "resources image imagePullPolicy securityContext idleTimeoutSeconds "
    "upscalingMode version env envFrom volumeMounts command args",
    "auth": "enableK8sTokenAuth secretName mode",
    "job": "activeDeadlineSeconds backoffLimit clusterSelector deletionStrategy entrypoint "
    "entrypointNumCpus entrypointNumGpus entrypointResources jobId managedBy metadata "
    "preRunningDeadlineSeconds rayClusterSpec runtimeEnvYAML shutdownAfterJobFinishes "
    "submissionMode submitterConfig submitterPodTemplate suspend ttlSecondsAfterFinished",
}
REQUIRED = {"cluster": ["headGroupSpec"], "head": ["template"]}
REQUIRED["worker"] = ["groupName", "minReplicas", "maxReplicas", "template"]
ENUMS = {
    "auth.mode": {"disabled", "token"},
    "autoscaler.upscalingMode": {"Default", "Aggressive", "Conservative"},
    "head.serviceType": {"ClusterIP", "NodePort", "LoadBalancer"},
    "job.submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
}
GPU_KEYS = ("nvidia.com/gpu", "amd.com/gpu")
#: idle timeouts outside this range are probably not meant (seconds)
IDLE_RANGE = (60, 3600)


def check_kuberay(docs: list, spec_path: Path | None) -> list[Finding]:
    """Findings for the RayCluster and RayJob documents of one manifest file."""
    out: list[Finding] = []
    for doc in docs:
        if not isinstance(doc, dict) or not str(doc.get("apiVersion", "")).startswith("ray.io/"):
            continue  # a PersistentVolumeClaim, a Secret, ...: Kubernetes checks those
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name", "?")
        where = f"{kind}/{name}"
        out += placeholders(doc, where)
        if doc["apiVersion"] != "ray.io/v1":
            out.append(Finding("error", f"{where}.apiVersion", "use ray.io/v1 (KubeRay >= 1.0)"))
            continue
        spec = doc.get("spec") or {}
        if kind == "RayCluster":
            out += _cluster(spec, f"{where}.spec", spec_path)
        elif kind == "RayJob":
            out += _fields(spec, "job", f"{where}.spec")
            out += _job(spec, f"{where}.spec")
            if "rayClusterSpec" in spec:
                out += _cluster(spec["rayClusterSpec"], f"{where}.spec.rayClusterSpec", spec_path)
        else:
            out.append(Finding("warning", where, f"{kind} is not checked (RayCluster, RayJob are)"))
    return out


def _fields(obj, kind: str, where: str) -> list[Finding]:
    if not isinstance(obj, dict):
        return [Finding("error", where, f"must be a mapping, not {obj!r}")]
    known = FIELDS[kind].split()
    out = [
        Finding(
            "error",
            join(where, key),
            f"unknown field: Kubernetes would drop it without a word (known: {', '.join(known)})",
        )
        for key in obj
        if key not in known
    ]
    out += [
        Finding("error", join(where, key), "required")
        for key in REQUIRED.get(kind, [])
        if key not in obj
    ]
    for path, allowed in ENUMS.items():
        owner, key = path.split(".")
        if owner == kind and key in obj and obj[key] not in allowed:
            out.append(
                Finding("error", join(where, key), f"{obj[key]!r}: one of {sorted(allowed)}")
            )
    return out


def _cluster(spec: dict, where: str, spec_path: Path | None) -> list[Finding]:
    out = _fields(spec, "cluster", where)
    head = spec.get("headGroupSpec") or {}
    workers = spec.get("workerGroupSpecs") or []
    out += _fields(head, "head", f"{where}.headGroupSpec")
    for i, w in enumerate(workers):
        out += _fields(w, "worker", f"{where}.workerGroupSpecs.{i}")
    for key, kind in (("autoscalerOptions", "autoscaler"), ("authOptions", "auth")):
        if key in spec:
            out += _fields(spec[key], kind, f"{where}.{key}")
    if any(f.level == "error" for f in out):
        return out  # the rest would guess at a structure that is not there
    groups = {"headGroupSpec": head} | {f"workerGroupSpecs.{i}": w for i, w in enumerate(workers)}
    out += _auth(spec, groups, where)
    out += _versions(spec, groups, where)
    out += _autoscaling(spec, workers, where)
    if head.get("serviceType") in ("NodePort", "LoadBalancer") or head.get("enableIngress"):
        out.append(
            Finding(
                "error",
                f"{where}.headGroupSpec",
                "the head service is reachable from outside the cluster, and with it the "
                "dashboard and job submission; keep ClusterIP and use `kubectl port-forward`",
            )
        )
    shared = _shared_mounts(groups)
    if not shared:
        out.append(
            Finding(
                "warning",
                f"{where}.headGroupSpec.template.spec.volumes",
                "no volume that every Ray pod mounts at the same path (a ReadWriteMany "
                "persistentVolumeClaim): a sweep's storage_path must be shared",
            )
        )
    if spec_path is not None:
        out += [
            Finding(f.level, f"{where}: {f.where}", f.message)
            for f in spec_fits(node_types(spec), shared, spec_path)
        ]
    return out


def _ray_container(group: dict) -> dict:
    """The container KubeRay runs Ray in: the pod template's first."""
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return containers[0]


def _auth(spec: dict, groups: dict, where: str) -> list[Finding]:
    auth = spec.get("authOptions")
    out = []
    for name, group in groups.items():
        env = {e.get("name"): e for e in _ray_container(group).get("env") or []}
        here = f"{where}.{name}.template.spec.containers.0.env"
        mode = (env.get("RAY_AUTH_MODE") or {}).get("value")
        if mode is not None and mode != "token":
            out.append(Finding("error", here, f"RAY_AUTH_MODE={mode}: token authentication off"))
        if "value" in (env.get("RAY_AUTH_TOKEN") or {}):
            out.append(
                Finding(
                    "error",
                    here,
                    "RAY_AUTH_TOKEN is written in the manifest: keep it in a Secret "
                    "(authOptions.secretName)",
                )
            )
        by_env = mode == "token" and "valueFrom" in (env.get("RAY_AUTH_TOKEN") or {})
        if auth is None and not by_env:
            out.append(
                Finding(
                    "error",
                    f"{where}.authOptions",
                    f"{name} runs Ray without token authentication: set authOptions "
                    "{mode: token, secretName: <your Secret>} (KubeRay >= 1.6)",
                )
            )
            break
    if auth is not None and auth.get("mode", "token") != "token":
        out.append(Finding("error", f"{where}.authOptions.mode", "token authentication off"))
    return out


def _versions(spec: dict, groups: dict, where: str) -> list[Finding]:
    if not spec.get("rayVersion"):
        return [
            Finding(
                "error",
                f"{where}.rayVersion",
                "missing: KubeRay needs it for token authentication and the job submitter",
            )
        ]
    out = ray_version(f"{where}.rayVersion", str(spec["rayVersion"]))
    for name, group in groups.items():
        match = RAY_IMAGE.search(str(_ray_container(group).get("image", "")))
        if match:
            out += ray_version(f"{where}.{name}.template.spec.containers.0.image", match[1])
    return out


def _autoscaling(spec: dict, workers: list, where: str) -> list[Finding]:
    out = []
    if not spec.get("enableInTreeAutoscaling"):
        return [
            Finding(
                "warning",
                f"{where}.enableInTreeAutoscaling",
                "not true: worker groups stay at their replicas, waiting trials start none",
            )
        ]
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    here = f"{where}.autoscalerOptions.idleTimeoutSeconds"
    if idle is None:
        out.append(Finding("warning", here, "not set: the autoscaler's default (60 s) applies"))
    elif idle < IDLE_RANGE[0]:
        out.append(
            Finding(
                "warning",
                here,
                f"{idle} s: workers stop in the gap between two trials, and the next one waits "
                "for a new pod (and node)",
            )
        )
    elif idle > IDLE_RANGE[1]:
        out.append(Finding("warning", here, f"{idle} s: idle GPU workers keep running that long"))
    for i, w in enumerate(workers):
        here = f"{where}.workerGroupSpecs.{i}"
        low, high = w["minReplicas"], w["maxReplicas"]
        if low > high:
            out.append(Finding("error", here, f"minReplicas {low} > maxReplicas {high}"))
        if high == 0:
            out.append(Finding("warning", f"{here}.maxReplicas", "0: this group never starts"))
        if low > 0 and any(k in _limits(w) for k in GPU_KEYS):
            out.append(
                Finding(
                    "warning",
                    f"{here}.minReplicas",
                    f"{low} GPU workers run (and bill) even when no trial needs them",
                )
            )
    return out


def _limits(group: dict) -> dict:
    res = _ray_container(group).get("resources") or {}
    return {**(res.get("requests") or {}), **(res.get("limits") or {})}


def _shared_mounts(groups: dict) -> list[str]:
    """Mount paths of claim/NFS/CSI volumes that every group's Ray container has."""
    per_group = []
    for group in groups.values():
        pod = (group.get("template") or {}).get("spec") or {}
        shared = {
            v["name"]
            for v in pod.get("volumes") or []
            if {"persistentVolumeClaim", "nfs", "csi"} & set(v)
        }
        per_group.append(
            {
                m["mountPath"]
                for m in _ray_container(group).get("volumeMounts") or []
                if m.get("name") in shared
            }
        )
    return sorted(set.intersection(*per_group)) if per_group else []


def _cpu(quantity) -> float:
    text = str(quantity)
    return math.ceil(float(text[:-1]) / 1000) if text.endswith("m") else math.ceil(float(text))


def node_types(spec: dict) -> list[NodeType]:
    """The Ray resources of each group's pods, as KubeRay starts them (rayStartParams first,
    then the Ray container's limits), and how many pods the autoscaler may run."""
    groups = [("head", spec["headGroupSpec"], 1, True)]
    scaling = bool(spec.get("enableInTreeAutoscaling"))
    for w in spec.get("workerGroupSpecs") or []:
        count = w["maxReplicas"] if scaling else w.get("replicas", 0)
        groups.append((w["groupName"], w, count * w.get("numOfHosts", 1), False))
    out = []
    for name, group, count, head in groups:
        params = group.get("rayStartParams") or {}
        limits = _limits(group)
        res: dict[str, float] = json.loads(params.get("resources", "{}").strip("'\""))
        if "num-cpus" in params:
            res["CPU"] = float(params["num-cpus"])
        elif "cpu" in limits:
            res["CPU"] = _cpu(limits["cpu"])
        gpus = params.get("num-gpus") or next((limits[k] for k in GPU_KEYS if k in limits), 0)
        res["GPU"] = float(gpus)
        out.append(NodeType(name, res, count, head=head))
    return out


def _job(spec: dict, where: str) -> list[Finding]:
    out = []
    entry = spec.get("entrypoint", "")
    if not entry and spec.get("submissionMode") != "InteractiveMode":
        out.append(Finding("error", f"{where}.entrypoint", "missing: the command the job runs"))
    words = shlex.split(entry)
    sweep = words[:2] == ["cdfkd", "sweep"]
    if sweep and spec.get("backoffLimit", 0) > 0 and "--resume" not in words:
        out.append(
            Finding(
                "warning",
                f"{where}.backoffLimit",
                "a retry runs `cdfkd sweep` again, which refuses a sweep that exists; keep 0 "
                "and resubmit with --resume",
            )
        )
    if "rayClusterSpec" in spec and not spec.get("shutdownAfterJobFinishes"):
        out.append(
            Finding(
                "warning",
                f"{where}.shutdownAfterJobFinishes",
                "not true: the job's cluster (and its GPU workers' nodes) stays after the job",
            )
        )
    if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
        out.append(
            Finding(
                "error", where, "neither rayClusterSpec nor clusterSelector: no cluster to run on"
            )
        )
    if re.search(r"--address[= ](?!auto\b)", entry):
        out.append(
            Finding(
                "warning",
                f"{where}.entrypoint",
                "the job runs on the head: `--address auto` joins its cluster",
            )
        )
    return out
