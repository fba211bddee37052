"""Sweep throughput and overhead: the same small digits sweep with 1 and with 2 concurrent trials.

    python benchmarks/sweep.py --teachers runs/teachers/digits-lenet5 [--trials 8] [--steps 120]

Prints, measured side by side in one run:
- trials/hour for max_concurrent_trials 1 and 2 (and their ratio);
- the overhead of each trial: the part of its Ray-measured duration not spent
  in the training loop (steps + periodic evaluations), as a fraction of it, over all
  trials and over the trials after each worker's first (a reused trial actor's first
  trial also pays the per-process imports and MLflow's store start, once per worker);
- the sweep's fixed cost (Ray start, teacher put, searcher) as a fraction of the sweep.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def _spec(
    dirpath: Path, name: str, teachers: str, concurrency: int, trials: int, steps: int
) -> Path:
    spec = {
        "name": name,
        "base_config": {
            "method": {"name": "cgdd"},
            "data": {"name": "digits", "root": str(dirpath / "data")},
            "teachers": {"path": teachers},
            "student": {"arch": "lenet5_half"},
            "train": {"steps": steps, "batch_size": 64, "eval_every": max(1, steps // 4)},
            "tracking": {"enabled": False},
        },
        "search": {"method.alpha": {"type": "float", "low": 0.3, "high": 3.0, "log": True}},
        "num_samples": trials,
        "max_concurrent_trials": concurrency,
        "resources": {"cpu": 1},
        "seed": 0,
        "storage_path": str(dirpath / "sweeps"),
        # Its own store, not ./mlflow.db: a benchmark leaves the user's runs alone.
        "mlflow": {"tracking_uri": f"sqlite:///{dirpath / 'mlflow.db'}"},
    }
    path = dirpath / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def measure(teachers: str, concurrency: int, trials: int, steps: int) -> dict:
    import ray

    from cdfkd.tune import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        spec = _spec(Path(tmp), f"bench-c{concurrency}", teachers, concurrency, trials, steps)
        t0 = time.perf_counter()
        summary = run_sweep(spec, write=lambda _: None)
        wall = time.perf_counter() - t0
        ray.shutdown()
    rows = summary["rows"]
    if any(r["status"] != "COMPLETE" for r in rows):
        # The split below (workers' first trials, later ones) reads rows by creation order.
        raise SystemExit(f"not every trial completed: {[r['status'] for r in rows]}")
    trial_total = [float(r["time_total_s"]) for r in rows]
    loop = [float(r["loop_seconds"]) for r in rows]
    overhead = [1 - lp / tt for lp, tt in zip(loop, trial_total, strict=True)]
    outside = [tt - lp for lp, tt in zip(loop, trial_total, strict=True)]
    # Rows are in trial creation order: the first `concurrency` trials are the workers' first.
    later = overhead[concurrency:] or overhead
    return {
        "concurrency": concurrency,
        "trials": len(rows),
        "wall_s": wall,
        "trials_per_hour": 3600 * len(rows) / wall,
        "trial_overhead_median": statistics.median(overhead),
        "trial_overhead_max": max(overhead),
        "trial_overhead_mean": statistics.mean(overhead),
        "later_overhead_median": statistics.median(later),
        "trial_fixed_s_median": statistics.median(outside),
        "first_fixed_s_median": statistics.median(outside[:concurrency]),
        "later_fixed_s_median": statistics.median(outside[concurrency:] or outside),
        "trial_s_median": statistics.median(trial_total),
        # Time no trial was running on any of the concurrent slots, over the whole sweep.
        "sweep_fixed_fraction": max(0.0, 1 - sum(trial_total) / (wall * concurrency)),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teachers", required=True, help="digits ensemble folder")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    teachers = str(Path(args.teachers).resolve())
    results = [measure(teachers, c, args.trials, args.steps) for c in (1, 2)]
    print(
        "| concurrent trials | trials | wall s | trials/hour | trial s (median) "
        "| outside the loop s (median: all / workers' first / later) "
        "| trial overhead (median / mean / max) | later trials' overhead (median) "
        "| sweep fixed cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['concurrency']} | {r['trials']} | {r['wall_s']:.0f} | {r['trials_per_hour']:.0f} | "
            f"{r['trial_s_median']:.1f} | {r['trial_fixed_s_median']:.2f} / "
            f"{r['first_fixed_s_median']:.2f} / {r['later_fixed_s_median']:.2f} | "
            f"{100 * r['trial_overhead_median']:.1f} % / {100 * r['trial_overhead_mean']:.1f} % / "
            f"{100 * r['trial_overhead_max']:.1f} % | {100 * r['later_overhead_median']:.1f} % | "
            f"{100 * r['sweep_fixed_fraction']:.1f} % |"
        )
    print(
        f"\nthroughput ratio 2 vs 1 concurrent: {results[1]['trials_per_hour'] / results[0]['trials_per_hour']:.2f}x"
    )


if __name__ == "__main__":
    main()
