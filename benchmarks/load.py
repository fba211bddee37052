"""Load: a long sweep of tiny trials on the local Ray, and whether the driver's costs stay flat.

    python benchmarks/load.py --teachers runs/teachers/digits-lenet5 [--trials 64] [--quick]

64 tiny CGDD trials on digits (4 steps each), 2 at a time, MLflow on (the default
sqlite store), as a user's sweep would run. When the 8th, 32nd and last trial
finish, a Tune callback in the driver records:

- the driver's resident memory (``/proc/self/statm``);
- the object store in use on the cluster (total minus available);
- the median per-trial overhead of the trials finished since the last mark: the part
  of a trial's Tune-measured duration not spent in its training loop.

At the end it checks that every trial is in ``results.csv`` and has its MLflow child
run, and prints one line per mark plus the growth from the first mark to the last
(flat: the driver's costs do not grow with the number of trials).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

MARKS = (8, 32, 64)


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _object_store_used_mib() -> float:
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0.0)
    free = ray.available_resources().get("object_store_memory", 0.0)
    return (total - free) / 2**20


def _callback(marks: tuple[int, ...], out: list[dict]):
    from ray.tune import Callback

    class Marks(Callback):
        def __init__(self) -> None:
            self.done: list[float] = []
            self.since: list[float] = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "loop_seconds" in r and "time_total_s" in r:
                self.since.append(max(0.0, r["time_total_s"] - r["loop_seconds"]))
            self.done.append(time.time())
            if len(self.done) in marks:
                out.append(
                    {
                        "trials": len(self.done),
                        "driver_rss_mib": _rss_mib(),
                        "object_store_mib": _object_store_used_mib(),
                        "overhead_s": statistics.median(self.since) if self.since else 0.0,
                    }
                )
                self.since = []

    return Marks()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", required=True, help="a digits teacher ensemble folder")
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="16 trials (marks 4, 8, 16)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # As `cdfkd sweep` does: Ray's own console output stays in its log files.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    trials = 16 if args.quick else args.trials
    marks = (4, 8, 16) if args.quick else tuple(m for m in MARKS if m <= trials)
    if trials not in marks:
        marks = (*marks, trials)

    from mlflow import MlflowClient

    from cdfkd.tune import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        spec = root / "load.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    "name": "load",
                    "base_config": {
                        "method": {"name": "cgdd"},
                        "data": {"name": "digits", "root": str(root / "data")},
                        "teachers": {"path": str(Path(args.teachers).resolve())},
                        "student": {"arch": "lenet5_half"},
                        "generator": {"width": 8, "nz": 16},
                        "train": {"steps": 4, "batch_size": 16, "eval_every": 4},
                    },
                    "search": {
                        "method.alpha": {"type": "float", "low": 0.3, "high": 3.0, "log": True}
                    },
                    "num_samples": trials,
                    "max_concurrent_trials": 2,
                    "resources": {"cpu": 1},
                    "seed": 0,
                    "storage_path": str(root / "sweeps"),
                    "mlflow": {"tracking_uri": uri},
                }
            )
        )
        measured: list[dict] = []
        t0 = time.perf_counter()
        summary = run_sweep(spec, write=lambda _: None, callbacks=[_callback(marks, measured)])
        wall = time.perf_counter() - t0
        import ray

        ray.shutdown()
        rows = summary["rows"]
        complete = sum(r["status"] == "COMPLETE" for r in rows)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("load")
        children = [
            r
            for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.tags.get("run_kind") == "trial"
        ]
        finished = sum(r.info.status == "FINISHED" for r in children)
        evaluated = sum("student_accuracy" in r.data.metrics for r in children)

    print(f"{trials} trials, 2 concurrent, {wall:.0f} s wall ({3600 * trials / wall:.0f} trials/h)")
    print("trials  driver RSS MiB  object store MiB  median overhead s/trial")
    for m in measured:
        print(
            f"{m['trials']:>6}  {m['driver_rss_mib']:>14.0f}  {m['object_store_mib']:>16.1f}"
            f"  {m['overhead_s']:>23.2f}"
        )
    first, last = measured[0], measured[-1]
    print(
        f"growth {first['trials']} -> {last['trials']} trials: driver RSS "
        f"{last['driver_rss_mib'] / first['driver_rss_mib']:.2f}x, object store "
        f"{last['object_store_mib'] - first['object_store_mib']:+.1f} MiB, overhead "
        f"{last['overhead_s'] / max(first['overhead_s'], 1e-9):.2f}x"
    )
    print(
        f"results.csv: {len(rows)} rows, {complete} complete; MLflow: {len(children)} child runs, "
        f"{finished} FINISHED, {evaluated} with their evaluations"
    )
    ok = len(rows) == complete == len(children) == finished == evaluated == trials
    print("every trial is in results.csv and in MLflow" if ok else "MISSING TRIALS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
