"""Choosing without labels: how well every candidate selection score ranks finished runs.

For each finished run folder (a ``benchmarks/quality.py`` benchmark's ``runs/``, a sweep's
experiment folder, or any folders holding ``result.json``, ``config.yaml`` and
``student.pt``) the student is reloaded and scored on the teachers' synthetic validation
set with every candidate of ``cdfkd.metrics.SELECTION_CANDIDATES``; the old ``proxy``
comes from ``result.json``. With ``--few-shot M ...`` the student's accuracy on M real
labelled training samples per class (the aggregation's few-shot data) and its Wilson
interval are computed too, for ``--few-shot-seeds`` draws of the samples.

Reported per score: Spearman rank correlation with the true relative accuracy (over all
runs and over the data-free runs, i.e. without ``kd_real``) and the regret of the pick
(the best relative accuracy minus that of the best-scoring run, in points). For the
few-shot estimate also the coverage of its intervals (the share that contain the run's
test accuracy) and their mean width. The test set is only read through ``result.json``'s
``relative_accuracy``: nothing is chosen on it here.

    # (a) the digits quality runs
    python benchmarks/quality.py --dataset digits --steps 300 --seeds 0 1 2 \\
        --teachers runs/teachers/digits-lenet5 --out runs/bench/selection/digits-quality --jobs 2
    python benchmarks/selection.py --name digits --teachers runs/teachers/digits-lenet5 \\
        --runs runs/bench/selection/digits-quality/runs --few-shot 1 5 10 --out runs/bench/selection/digits
    # (b) a Fashion-MNIST sweep (benchmarks/selection-fashion-mnist.yaml: 16 trials, objective
    #     selection_score), run first with --sweep, then scored
    python benchmarks/selection.py --name fashion-mnist --teachers runs/teachers/fashion-mnist-lenet5 \\
        --sweep benchmarks/selection-fashion-mnist.yaml --few-shot 1 5 10 --out runs/bench/selection/fmnist

Output: ``<out>/selection.json`` (every run's scores, the summary) and ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def find_runs(folders: list[Path]) -> list[Path]:
    """Finished run folders under ``folders`` (result.json + config.yaml + student.pt)."""
    found = set()
    for folder in folders:
        for result in folder.rglob("result.json"):
            d = result.parent
            if (d / "config.yaml").is_file() and (d / "student.pt").is_file():
                found.add(d.resolve())
    return sorted(found)


def score_runs(args, runs: list[Path]) -> list[dict]:
    import torch

    from cdfkd.runs import RunDir
    from cdfkd.selection import (
        SELECTION_SCORE,
        ensure_validation_set,
        few_shot_estimate,
        score_student,
    )
    from cdfkd.teachers import read_manifest

    torch.set_num_threads(1)
    vs = ensure_validation_set(args.teachers, progress=lambda line: print(line, file=sys.stderr))
    info = read_manifest(args.teachers).info()
    train = None
    if args.few_shot:
        cfg0 = RunDir(runs[0]).read_config()
        if args.data_root:
            cfg0.data.root = args.data_root
        train, _, _ = cfg0.data.load(augment=False)
    rows = []
    for path in runs:
        run = RunDir(path)
        result = run.read_result() or {}
        student, _ = run.load_student("cpu", info)

        @torch.no_grad()
        def predict(x, student=student):
            out = student(x)
            return out.mean(0) if out.dim() == 3 else out

        scores = score_student(predict, vs)
        logged = result.get("selection_score")
        if logged is not None and abs(logged - scores[SELECTION_SCORE]) > 1e-5:
            print(
                f"WARNING {path}: result.json's selection_score {logged} differs from "
                f"{scores[SELECTION_SCORE]} (another validation set?)",
                file=sys.stderr,
            )
        row = {
            "run": str(path),
            "method": result.get("method"),
            "relative_accuracy": result["relative_accuracy"],
            "student_accuracy": result["student_accuracy"],
            "steps": result.get("steps"),
            "lr": (result.get("config") or {}).get("optim", {}).get("lr"),
            "proxy": result.get("proxy"),
            "selection_score_logged": logged,
            "scores": scores,
            "few_shot": {},
        }
        for m in args.few_shot:
            assert train is not None
            row["few_shot"][str(m)] = [
                few_shot_estimate(predict, train, m, seed=s) for s in range(args.few_shot_seeds)
            ]
        rows.append(row)
        print(
            f"{Path(path).parent.name}/{Path(path).name}: {row['method']} rel "
            f"{100 * row['relative_accuracy']:.1f} %, {SELECTION_SCORE} "
            f"{scores[SELECTION_SCORE]:.4f}",
            file=sys.stderr,
        )
    return rows


def _rank_stats(rows: list[dict], value) -> dict:
    from cdfkd.metrics import pick_regret, spearman

    out = {}
    for subset, chosen in (
        ("all", rows),
        ("data_free", [r for r in rows if r["method"] != "kd_real"]),
    ):
        pairs = [(value(r), r["relative_accuracy"]) for r in chosen]
        pairs = [(v, t) for v, t in pairs if v is not None and not math.isnan(v)]
        if len(pairs) < 2:
            continue
        scores, truth = [p[0] for p in pairs], [p[1] for p in pairs]
        out[subset] = {
            "n": len(pairs),
            "spearman": spearman(scores, truth),
            "regret_points": 100 * pick_regret(scores, truth),
        }
    return out


def summarise(rows: list[dict], few_shot: list[int]) -> dict:
    from cdfkd.metrics import SELECTION_CANDIDATES
    from cdfkd.selection import SELECTION_SCORE

    scores = {
        name: _rank_stats(rows, lambda r, n=name: r["scores"][n]) for name in SELECTION_CANDIDATES
    }
    scores["proxy (old)"] = _rank_stats(rows, lambda r: r["proxy"])
    estimates = {}
    for m in few_shot:
        key = str(m)
        seeds = len(rows[0]["few_shot"][key])
        per_seed = [
            _rank_stats(rows, lambda r, s=s, k=key: r["few_shot"][k][s]["accuracy"])
            for s in range(seeds)
        ]
        draws = [(r, e) for r in rows for e in r["few_shot"][key]]
        estimates[key] = {
            "seeds": seeds,
            "spearman_all_mean": statistics.fmean(p["all"]["spearman"] for p in per_seed),
            "regret_all_mean": statistics.fmean(p["all"]["regret_points"] for p in per_seed),
            "spearman_data_free_mean": statistics.fmean(
                p["data_free"]["spearman"] for p in per_seed if "data_free" in p
            ),
            "regret_data_free_mean": statistics.fmean(
                p["data_free"]["regret_points"] for p in per_seed if "data_free" in p
            ),
            # kd_real trained on the training set these samples come from: left out here
            "coverage": statistics.fmean(
                float(e["low"] <= r["student_accuracy"] <= e["high"])
                for r, e in draws
                if r["method"] != "kd_real"
            ),
            "mean_width_points": 100 * statistics.fmean(e["high"] - e["low"] for _, e in draws),
        }
    return {"selection_score": SELECTION_SCORE, "scores": scores, "few_shot": estimates}


def markdown(name: str, summary: dict, rows: list[dict]) -> str:
    chosen = summary["selection_score"]
    n_all = len(rows)
    n_free = sum(r["method"] != "kd_real" for r in rows)
    lines = [
        f"**{name}**: {n_all} runs ({n_free} data-free). Spearman ρ with the true relative "
        "accuracy; regret = best relative accuracy − that of the best-scoring run (points).",
        "",
        "| score | ρ (all) | regret (all) | ρ (data-free) | regret (data-free) |",
        "|---|---|---|---|---|",
    ]

    def cell(stats: dict, subset: str, key: str, fmt: str) -> str:
        v = stats.get(subset, {}).get(key)
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for score, stats in summary["scores"].items():
        label = f"**{score}** (selection_score)" if score == chosen else score
        lines.append(
            f"| {label} | {cell(stats, 'all', 'spearman', '.3f')} "
            f"| {cell(stats, 'all', 'regret_points', '.1f')} "
            f"| {cell(stats, 'data_free', 'spearman', '.3f')} "
            f"| {cell(stats, 'data_free', 'regret_points', '.1f')} |"
        )
    if summary["few_shot"]:
        lines += [
            "",
            "| few-shot estimate, M per class | ρ (all) | regret (all) | ρ (data-free) "
            "| regret (data-free) | 95 % Wilson coverage | mean width |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, e in summary["few_shot"].items():
            lines.append(
                f"| M = {m} (mean of {e['seeds']} draws) | {e['spearman_all_mean']:.3f} "
                f"| {e['regret_all_mean']:.1f} | {e['spearman_data_free_mean']:.3f} "
                f"| {e['regret_data_free_mean']:.1f} | {100 * e['coverage']:.0f} % "
                f"| {e['mean_width_points']:.1f} points |"
            )
    return "\n".join(lines)


def run_sweep(spec: str) -> Path:
    """Run (or resume) the sweep of ``spec``; returns its experiment folder."""
    from cdfkd.tune import run_sweep as sweep
    from cdfkd.tune.spec import load_spec

    s, _ = load_spec(spec)
    exp = Path(s.storage_path) / s.name
    resume = exp.is_dir() and any(exp.glob("experiment_state-*.json"))
    summary = sweep(spec, resume=resume, write=lambda line: print(line, file=sys.stderr))
    return Path(summary["experiment_dir"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="label of this benchmark (digits, fashion-mnist)")
    p.add_argument(
        "--teachers", required=True, help="the runs' ensemble folder (its validation set)"
    )
    p.add_argument("--runs", nargs="*", default=[], help="folders holding finished run folders")
    p.add_argument("--sweep", help="a sweep spec: run (or resume) it first, then score its trials")
    p.add_argument("--few-shot", type=int, nargs="*", default=[], metavar="M")
    p.add_argument("--few-shot-seeds", type=int, default=5, help="draws of the M samples per class")
    p.add_argument("--data-root", default=None, help="dataset root (default: the runs' config)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    t0 = time.perf_counter()
    folders = [Path(r) for r in args.runs]
    if args.sweep:
        folders.append(run_sweep(args.sweep))
    runs = find_runs(folders)
    if len(runs) < 3:
        raise SystemExit(f"{len(runs)} finished runs under {folders}: need at least 3")
    rows = score_runs(args, runs)
    summary = summarise(rows, args.few_shot)
    table = markdown(args.name, summary, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cdfkd.teachers import read_manifest

    entry = read_manifest(args.teachers).validation_set
    report = {
        "name": args.name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "validation_set": entry.model_dump(mode="json") if entry else None,
        "summary": summary,
        "runs": rows,
        "seconds": time.perf_counter() - t0,
    }
    (out / "selection.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
