"""Distillation quality: every method on the same teachers, step budget and seeds.

Each (method, seed) is one ``cdfkd.train.run`` in its own subprocess (one torch
thread, ``OMP_WAIT_POLICY=PASSIVE``), built from ``configs/<dataset>/<method>.yaml``
with ``train.steps``, ``train.seed``, ``teachers.path``, ``data.root`` and
``train.threads=1`` overridden (plus any ``--set``). "Equal steps" means equal
``train.steps``, i.e. generator/student *rounds*; methods with
``method.student_steps > 1`` (cdfkd_mfs, dfad: 5) do that many student updates
per round, shown in the table. The child measures its own CPU time
(``resource.getrusage``) around ``run``, so data loading and the final
evaluation count; interpreter start-up and imports do not.

Code snapshot: the ``cdfkd`` package is copied to ``<out>/code`` once, when the
benchmark folder is first used, and the parent and every child import it from
there, so edits to the working tree during a long benchmark cannot mix versions
(results.json records the snapshot's file hashes).

Output: ``<out>/results.json`` (every run, the summary, the proxy correlation,
the target verdicts, the machine) and ``<out>/table.md``, also printed. A run
folder that already holds ``bench.json`` is reused, so an interrupted benchmark
continues where it stopped; delete the folder to re-run it.

    python benchmarks/quality.py --dataset digits --steps 300 --seeds 0 1 2 \\
        --teachers runs/teachers/digits-lenet5 --out runs/bench/digits --jobs 2
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ("cgdd", "cdfkd_mfs", "cdfkd", "dafl", "dfad", "deepinversion", "kd_real")
PROPOSED = ("cgdd", "cdfkd_mfs")
BASELINES = ("dafl", "dfad")
TARGET_RELATIVE = 0.90
TARGET_CPU_SECONDS = 600.0
BENCH = "bench.json"
REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _source_hashes(root: Path, method: str) -> dict[str, str]:
    """Short sha256 of the method's file and the shared code it runs on."""
    files = [f"cdfkd/methods/{method}.py", "cdfkd/methods/base.py", "cdfkd/train.py"]
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files}


def snapshot_code(out: Path) -> Path:
    """Copy the cdfkd package to ``out/code`` (once) and import it from there from now on."""
    code = out / "code"
    if not (code / "cdfkd").is_dir():
        tmp = out / "code.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(REPO / "cdfkd", tmp / "cdfkd", ignore=shutil.ignore_patterns("__pycache__"))
        os.replace(tmp, code)
    sys.path.insert(0, str(code))
    return code


# ----------------------------------------------------------------------------- child


def worker(spec_path: str) -> None:
    """Run one distillation from a spec file and write ``bench.json`` next to result.json."""
    import torch

    from cdfkd.config import build_config
    from cdfkd.train import run

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    cfg = build_config(spec["config"], source=spec["name"])
    import cdfkd

    code = Path(cdfkd.__file__).resolve().parent.parent
    if code != Path(spec["code"]).resolve():
        raise RuntimeError(f"imported cdfkd from {code}, not the snapshot {spec['code']}")
    sources = _source_hashes(code, cfg.method.name)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    result = run(cfg, spec["out"])
    bench = {
        "name": spec["name"],
        "cpu_seconds": _cpu_seconds() - cpu0,
        "wall_seconds": time.perf_counter() - wall0,
        "torch_threads": torch.get_num_threads(),
        "result": {k: v for k, v in result.items() if k != "config"},
        "method_config": result["config"]["method"],
        "sources": sources,
    }
    (Path(spec["out"]) / BENCH).write_text(json.dumps(bench, indent=2))


# ----------------------------------------------------------------------------- parent


def ensure_teachers(dataset: str, path: Path, data_root: str) -> dict:
    """The ensemble manifest at ``path``; trains 3 lenet5 teachers there first if it is missing."""
    from cdfkd.teachers import MANIFEST, TeacherTrainConfig, read_manifest, train_ensemble

    if not (path / MANIFEST).exists():
        import torch

        cfg = TeacherTrainConfig.for_dataset(dataset, "lenet5", count=3)
        print(f"training {cfg.count} {cfg.arch} teachers on {dataset} -> {path}", file=sys.stderr)
        t0 = time.perf_counter()
        train_ensemble(cfg, path, torch.device("cpu"), data_root=data_root)
        print(f"teachers trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    manifest = read_manifest(path)
    raw = json.loads((path / MANIFEST).read_text())
    if raw.get("dataset") != dataset:
        raise SystemExit(
            f"{path} holds a {raw.get('dataset')} ensemble, not {dataset}: pass another --teachers"
        )
    return {
        "path": str(path),
        "arch": raw.get("arch"),
        "count": len(manifest.teachers),
        "accuracies": [t.get("test_accuracy") for t in raw["teachers"]],
        "ensemble_accuracy": raw.get("ensemble_accuracy"),
    }


def build_specs(args, code: Path) -> list[dict]:
    """One spec per (method, seed): the validated raw config and its run folder."""
    import yaml

    from cdfkd.config import ExperimentConfig, apply_overrides, build_config

    specs = []
    for method in args.methods:
        path = Path(args.configs) / args.dataset / f"{method}.yaml"
        if not path.is_file():
            raise SystemExit(
                f"{path} does not exist: every method needs configs/{args.dataset}/<method>.yaml"
            )
        base = yaml.safe_load(path.read_text())
        for seed in args.seeds:
            overrides = [
                f"train.steps={args.steps}",
                f"train.seed={seed}",
                f"teachers.path={Path(args.teachers).resolve()}",
                f"data.root={Path(args.data_root).resolve()}",
                "train.threads=1",
                "train.device=cpu",
            ]
            if "tracking" in ExperimentConfig.model_fields:
                overrides.append("tracking.enabled=false")
            overrides += args.set
            raw = apply_overrides(base, overrides)
            build_config(raw, source=str(path))  # every config is checked before anything runs
            name = f"{method}-s{seed}"
            specs.append(
                {
                    "name": name,
                    "method": method,
                    "seed": seed,
                    "config": raw,
                    "out": str(Path(args.out).resolve() / "runs" / name),
                    "code": str(code),
                }
            )
    return specs


def launch(spec: dict) -> dict:
    """Run one spec in a fresh interpreter (or reuse its finished folder); return bench.json."""
    out = Path(spec["out"])
    if (out / BENCH).exists():
        return {**json.loads((out / BENCH).read_text()), "reused": True}
    if out.exists():
        shutil.rmtree(out)  # an interrupted run: start it over so its timings are whole
    out.mkdir(parents=True)
    spec_path = out.parent / f"{spec['name']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        **CHILD_ENV,
        "PYTHONPATH": os.pathsep.join(
            p for p in (spec["code"], os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    t0 = time.perf_counter()
    with open(out.parent / f"{spec['name']}.log", "w") as log_file:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(spec_path)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    if proc.returncode != 0:
        tail = (out.parent / f"{spec['name']}.log").read_text()[-2000:]
        return {
            "name": spec["name"],
            "failed": True,
            "returncode": proc.returncode,
            "log_tail": tail,
        }
    bench = json.loads((out / BENCH).read_text())
    bench["process_wall_seconds"] = time.perf_counter() - t0
    return bench


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(specs: list[dict], benches: list[dict]) -> dict:
    """Per-method rows, the proxy's Spearman correlation and the target verdicts."""
    from cdfkd.metrics import spearman

    by_method: dict[str, list[dict]] = {}
    for spec, bench in zip(specs, benches, strict=True):
        if not bench.get("failed"):
            by_method.setdefault(spec["method"], []).append(bench)
    rows, mixed = {}, []
    for method, runs in by_method.items():
        rel = [b["result"]["relative_accuracy"] for b in runs]
        acc = [b["result"]["student_accuracy"] for b in runs]
        first = runs[0]
        if any(
            b["method_config"] != first["method_config"] or b.get("sources") != first.get("sources")
            for b in runs
        ):
            mixed.append(method)
        rows[method] = {
            "runs": len(runs),
            "steps": first["result"]["steps"],
            "student_steps": first["method_config"].get("student_steps", 1),
            "relative_mean": _mean_std(rel)[0],
            "relative_std": _mean_std(rel)[1],
            "accuracy_mean": _mean_std(acc)[0],
            "accuracy_std": _mean_std(acc)[1],
            "proxy_mean": statistics.fmean(b["result"]["proxy"] for b in runs),
            "wall_mean": statistics.fmean(b["wall_seconds"] for b in runs),
            "cpu_mean": statistics.fmean(b["cpu_seconds"] for b in runs),
            "cpu_max": max(b["cpu_seconds"] for b in runs),
            "params": first["result"]["student_params"],
            "macs": first["result"]["student_macs"],
            "headers": len(first["result"]["header_accuracies"]),
            "method_config": first["method_config"],
            "sources": first.get("sources"),
        }
    ok = [b for b in benches if not b.get("failed")]
    pairs = [
        (b["result"]["proxy"], b["result"]["relative_accuracy"], b["result"]["method"]) for b in ok
    ]
    data_free = [p for p in pairs if p[2] != "kd_real"]
    correlation = {
        "all_runs": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        "all_runs_n": len(pairs),
        "data_free_runs": spearman([p[0] for p in data_free], [p[1] for p in data_free]),
        "data_free_runs_n": len(data_free),
    }
    targets = {}
    for method in PROPOSED:
        if method not in rows:
            continue
        r = rows[method]
        beats = {b: r["relative_mean"] > rows[b]["relative_mean"] for b in BASELINES if b in rows}
        targets[method] = {
            "relative_mean": r["relative_mean"],
            "reaches_90": r["relative_mean"] >= TARGET_RELATIVE,
            "beats": beats,
            "cpu_max": r["cpu_max"],
            "within_cpu_budget": r["cpu_max"] <= TARGET_CPU_SECONDS,
        }
        targets[method]["met"] = (
            targets[method]["reaches_90"]
            and all(beats.values())
            and targets[method]["within_cpu_budget"]
        )
    return {
        "rows": rows,
        "proxy_spearman": correlation,
        "targets": targets,
        "mixed_code": mixed,
        "failed": [b for b in benches if b.get("failed")],
    }


def _fmt_int(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def markdown(summary: dict, methods: list[str]) -> str:
    lines = [
        "| method | rounds (student updates/round) | rel. acc. mean ± std | abs. acc. mean ± std "
        "| proxy | wall s | CPU s (max) | params | MACs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        r = summary["rows"].get(method)
        if r is None:
            lines.append(f"| {method} | failed | | | | | | | |")
            continue
        name = method + (f" ({r['headers']} headers)" if r["headers"] > 1 else "")
        lines.append(
            f"| {name} | {r['steps']} ({r['student_steps']}) "
            f"| {100 * r['relative_mean']:.1f} ± {100 * r['relative_std']:.1f} % "
            f"| {100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} % "
            f"| {100 * r['proxy_mean']:.1f} % | {r['wall_mean']:.0f} "
            f"| {r['cpu_mean']:.0f} ({r['cpu_max']:.0f}) | {_fmt_int(r['params'])} "
            f"| {_fmt_int(r['macs'])} |"
        )
    c = summary["proxy_spearman"]
    lines += [
        "",
        f"Proxy vs true relative accuracy, Spearman rho: {c['all_runs']:.3f} over all "
        f"{c['all_runs_n']} runs; {c['data_free_runs']:.3f} over the {c['data_free_runs_n']} "
        "data-free runs (kd_real's proxy uses real training images).",
    ]
    for method, t in summary["targets"].items():
        beats = ", ".join(f"{'beats' if v else 'does NOT beat'} {b}" for b, v in t["beats"].items())
        lines.append(
            f"- {method}: {100 * t['relative_mean']:.1f} % mean relative accuracy "
            f"({'>=' if t['reaches_90'] else '<'} 90 %), {beats}, "
            f"max {t['cpu_max']:.0f} CPU-s per run "
            f"({'within' if t['within_cpu_budget'] else 'OVER'} {TARGET_CPU_SECONDS:.0f}): "
            f"target {'MET' if t['met'] else 'MISSED'}"
        )
    for method in summary["mixed_code"]:
        lines.append(
            f"- WARNING {method}: its runs differ in method config or source files "
            "(code edited during the benchmark); see results.json"
        )
    for f in summary["failed"]:
        lines.append(f"- FAILED {f['name']} (exit {f['returncode']}): {f['log_tail'][-300:]!r}")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_per_run": 1,
        "processor": platform.processor(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--steps", type=int, default=300, help="train.steps (rounds) for every method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--teachers", help="ensemble folder; 3 lenet5 teachers are trained there if missing"
    )
    p.add_argument("--out", help="benchmark folder (runs/, results.json, table.md)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--data-root", default="data")
    p.add_argument("--configs", default=str(REPO / "configs"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for every run (repeatable)",
    )
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not args.teachers or not args.out:
        p.error("--teachers and --out are required")
    os.environ.update({k: v for k, v in CHILD_ENV.items() if k == "OMP_WAIT_POLICY"})
    started = datetime.datetime.now(datetime.UTC)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    code = snapshot_code(out)
    teachers = ensure_teachers(args.dataset, Path(args.teachers), args.data_root)
    specs = build_specs(args, code)
    print(f"{len(specs)} runs, {args.jobs} at a time", file=sys.stderr)
    t0 = time.perf_counter()

    def one(spec: dict) -> dict:
        bench = launch(spec)
        status = (
            "FAILED"
            if bench.get("failed")
            else (
                f"rel {100 * bench['result']['relative_accuracy']:.1f} %, "
                f"{bench['cpu_seconds']:.0f} CPU-s" + (" (reused)" if bench.get("reused") else "")
            )
        )
        print(
            f"[{time.perf_counter() - t0:6.0f} s] {spec['name']}: {status}",
            file=sys.stderr,
            flush=True,
        )
        return bench

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        benches = list(pool.map(one, specs))
    summary = summarise(specs, benches)
    table = markdown(summary, args.methods)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "total_wall_seconds": time.perf_counter() - t0,
        "dataset": args.dataset,
        "steps": args.steps,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "overrides": args.set,
        "code_snapshot": str(code),
        "machine": machine(),
        "teachers": teachers,
        "summary": summary,
        "runs": benches,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\ntotal wall time {report['total_wall_seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
