"""Teacher ensemble: the per-teacher loop vs the fused ``vmap`` path, side by side.

Cases: 3 lenet5 (1x32x32) at batch 256 and 3 CIFAR resnet18 (3x32x32) at batch 64,
each as a no-grad forward (student steps) and as forward + gradient w.r.t. the
input (generator steps). The two paths are timed in alternation within one run,
so background load hits both alike; the table gives medians and vmap/loop.
``AUTO_FUSED`` in cdfkd/teachers/ensemble.py records which path wins per device.

    python benchmarks/ensemble.py --device cpu --repeats 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see cdfkd/cli.py

import torch  # noqa: E402

from cdfkd.data import DatasetInfo  # noqa: E402
from cdfkd.models import create_model  # noqa: E402
from cdfkd.teachers import TeacherEnsemble  # noqa: E402

CASES = [  # name, arch, channels, batch
    ("3 x lenet5, batch 256", "lenet5", 1, 256),
    ("3 x resnet18, batch 64", "resnet18", 3, 64),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(ens: TeacherEnsemble, x: torch.Tensor, grad: bool) -> None:
    if grad:
        xi = x.detach().requires_grad_(True)
        ens(xi).square().mean().backward()
    else:
        with torch.no_grad():
            ens(x)


def _time(ens: TeacherEnsemble, x: torch.Tensor, grad: bool, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _run(ens, x, grad)
    _sync(device)
    return time.perf_counter() - t0


def bench_case(arch: str, channels: int, batch: int, device, repeats: int, warmup: int) -> list:
    info = DatasetInfo("bench", 10, channels, 32, (0.5,) * channels, (0.5,) * channels)
    teachers = [create_model(arch, 10, channels, 32) for _ in range(3)]
    ensembles = {
        mode: TeacherEnsemble(teachers, info, [arch] * 3, mode=mode).to(device)
        for mode in ("loop", "vmap")
    }
    x = torch.randn(batch, channels, 32, 32, device=device)
    rows = []
    for grad in (False, True):
        times: dict[str, list[float]] = {"loop": [], "vmap": []}
        for ens in ensembles.values():
            for _ in range(warmup):
                _run(ens, x, grad)
        for _ in range(repeats):  # alternate so load spikes hit both paths
            for mode, ens in ensembles.items():
                times[mode].append(_time(ens, x, grad, device))
        loop, vmap = (statistics.median(times[m]) for m in ("loop", "vmap"))
        rows.append(("forward + input grad" if grad else "forward (no grad)", loop, vmap))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x {args.threads} threads"
    )
    print(f"torch {torch.__version__}, {name}, median of {args.repeats} (loop and vmap alternated)")
    print(f"{'case':<24} {'pass':<22} {'loop ms':>9} {'vmap ms':>9} {'vmap/loop':>9}")
    for case, arch, channels, batch in CASES:
        for what, loop, vmap in bench_case(
            arch, channels, batch, device, args.repeats, args.warmup
        ):
            print(
                f"{case:<24} {what:<22} {loop * 1e3:>9.2f} {vmap * 1e3:>9.2f} {vmap / loop:>9.2f}"
            )


if __name__ == "__main__":
    main()
