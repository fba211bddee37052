"""Student updates per second: the engine's methods against a reference-structured loop.

For ``cdfkd_mfs`` and ``cgdd``, side by side in one run:

- **engine**: ``create_method(cfg, teachers, info, device)``, then per round
  ``method.step()`` and the one host read of its losses that ``cdfkd.train.train_loop``
  does (the finite check), at the engine's defaults plus any ``--set`` overrides;
- **baseline**: a loop written here with the structure of the published DFAD /
  CDFKD-MFS / DAFL code: teachers left trainable (their weight gradients are computed),
  one forward and ``backward(retain_graph=True)`` per teacher for the per-teacher terms
  (the ensemble terms get one more backward), the generator's backward reaching student
  and teacher weights (no ``inputs=``), ``.item()`` on every loss at every step, and a
  fresh generator batch for every student update (generated with autograd on, then
  detached). Same models, batch, optimisers and loss terms (``cdfkd.losses``, BN
  statistics captured with ``cdfkd.bn_hooks``), so only the structure differs.

A round of cdfkd_mfs is ``student_steps`` (5) student updates then one generator update;
of cgdd one generator update then ``student_steps`` (1) student update. The first round
of each case checks that the baseline and the engine with its image pool off compute the
same losses from the same weights and latents ("losses match"); it doubles as warm-up.
Timed blocks of a few rounds then alternate between the variants (in reverse order every
other block); figures are medians over blocks. Each case prints a line ending
``speedup N.NNx`` (engine at defaults vs baseline) and, on its own line, the figure at
equal math (engine with ``train.pool.size=0`` and fp32 vs baseline).

Phases, per round and exclusive (a nested phase's time leaves its parent's; ``other`` is
what none claims): the baseline times its own (synthesis and teacher forward of the
student updates, the rest of the student update, the whole generator update), during the
timed blocks on CPU and in a pass of their own on CUDA (they synchronise there); the
engine's come from its ``torch.profiler.record_function`` ranges named ``cdfkd.*`` over a
separately profiled pass (profiler overhead included; on CUDA host times are launch
times, device times are shown beside them).

    python benchmarks/throughput.py --quick                     # ~240 CPU-s: 2-3 min idle
    python benchmarks/throughput.py                             # lenet5 and resnet18 cases
    python benchmarks/throughput.py --set train.pool.size=4096  # an engine config override
    python benchmarks/throughput.py --device cuda               # 3 x resnet34, fp32 vs bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see cdfkd/cli.py

import torch  # noqa: E402
import yaml  # noqa: E402
from reference_loops import REFERENCES, Phases, sync  # noqa: E402

from cdfkd.config import TrainConfig, build_config  # noqa: E402
from cdfkd.data import DatasetInfo  # noqa: E402
from cdfkd.methods import create_method  # noqa: E402
from cdfkd.models import create_model  # noqa: E402
from cdfkd.teachers import TeacherEnsemble  # noqa: E402

METHODS = ("cdfkd_mfs", "cgdd")
CASES = {"lenet5": (1, 256), "resnet18": (3, 64), "resnet34": (3, 256)}  # teacher: (C, B)
PHASES = ("synthesis", "teacher_forward", "student_update", "generator_update")
HAS_POOL = "pool" in TrainConfig.model_fields
HAS_PRECISION = "precision" in TrainConfig.model_fields
EQUAL_LABEL = "engine, pool off, fp32"  # the engine variant at the baseline's math
EQUAL_MATH = (["train.pool.size=0"] if HAS_POOL else []) + (
    ["train.precision=fp32"] if HAS_PRECISION else []
)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"

# (warm-up rounds, blocks, rounds per block, profiled rounds) per case and method.
PLANS = {
    ("full", "lenet5"): {"cdfkd_mfs": (2, 5, 2, 2), "cgdd": (2, 5, 4, 4)},
    ("full", "resnet18"): {"cdfkd_mfs": (1, 3, 1, 1), "cgdd": (1, 3, 2, 1)},
    ("quick", "lenet5"): {"cdfkd_mfs": (1, 3, 1, 1), "cgdd": (1, 3, 2, 2)},
    ("quick", "resnet18"): {"cdfkd_mfs": (1, 2, 1, 0), "cgdd": (1, 2, 1, 0)},
    ("full", "resnet34"): {"cdfkd_mfs": (5, 7, 5, 3), "cgdd": (5, 7, 10, 5)},
    ("quick", "resnet34"): {"cdfkd_mfs": (3, 3, 3, 2), "cgdd": (3, 3, 5, 3)},
}


class _Variant:
    """One timed contender: ``run_round()`` runs a round; block rates (and CUDA memory) accumulate."""

    def __init__(self, label: str, device: torch.device, run_round, updates: int) -> None:
        self.label, self.device, self.run_round, self.updates = label, device, run_round, updates
        self.rates: list[float] = []
        self.peak = self.resident = 0

    def block(self, rounds: int) -> None:
        cuda = self.device.type == "cuda"
        sync(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        for _ in range(rounds):
            self.run_round()
        sync(self.device)
        self.rates.append(rounds * self.updates / (time.perf_counter() - t0))
        if cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def describe(self) -> str:
        text = f"{self.rate:8.2f} updates/s (blocks {min(self.rates):.2f}..{max(self.rates):.2f})"
        if self.device.type == "cuda":
            above = (self.peak - self.resident) / 2**20
            text += f", peak {self.peak / 2**20:,.0f} MiB ({above:,.0f} MiB above resident)"
        return text


def _engine_round(method):
    """A round as cdfkd.train.train_loop runs it: ``step()`` and one host read of the losses."""

    def run() -> dict[str, float]:
        losses = method.step()
        values = torch.stack([v.float() for v in losses.values()]).tolist()
        return dict(zip(losses, values, strict=True))

    return run


def _engine_first_round(method) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Round 1 of the engine, recording the total loss of every student and generator update
    (the instance's ``update_*`` are wrapped for this round only)."""
    totals: dict[str, list[float]] = {"student": [], "generator": []}
    for kind in totals:
        original = getattr(method, f"update_{kind}")

        def record(loss, _original=original, _seen=totals[kind]):
            _seen.append(loss.item())
            return _original(loss)

        setattr(method, f"update_{kind}", record)
    try:
        return _engine_round(method)(), totals
    finally:
        for kind in totals:
            delattr(method, f"update_{kind}")


def _check_losses(engine, engine_totals, ref, ref_round, rtol: float) -> tuple[bool, str]:
    """The first update of round 1 (identical weights and batch) must agree within ``rtol``;
    every loss term of round 1 (means over its updates) within 100 x ``rtol``: later updates
    start from weights that differ by float rounding (per-teacher backwards sum gradients in
    another order), and L1's sign gradients amplify that (5e-4 seen on resnet18)."""
    first = "generator" if ref.generator_first else "student"
    a, b = engine_totals[first][0], ref.totals[first][0]
    d_first = abs(a - b) / max(abs(a), 1e-2)
    missing = sorted(set(engine) ^ set(ref_round))
    diffs = {
        k: abs(engine[k] - ref_round[k]) / max(abs(engine[k]), 1e-2)
        for k in engine
        if k in ref_round
    }
    worst = max(diffs, key=diffs.get)
    ok = not missing and d_first <= rtol and diffs[worst] <= 100 * rtol
    text = (
        f"first {first} update {a:.6g} vs {b:.6g} (relative difference {d_first:.1e}); "
        f"{len(diffs)} terms of round 1, max relative difference {diffs[worst]:.1e} ({worst})"
    )
    if missing:
        text += f"; only one side has {missing}"
    if not ok:
        text += "\n     " + ", ".join(f"{k} {engine[k]:.6g}/{ref_round[k]:.6g}" for k in diffs)
    return ok, text


def _engine_state(method) -> str:
    pool = "pool off"
    if getattr(method, "pooling", False):
        pool = f"pool {method.pool_cfg.size} images (refresh {method.pool_cfg.refresh})"
    dtype = getattr(method, "autocast_dtype", None)
    return f"{pool}, {'fp32' if dtype is None else str(dtype).removeprefix('torch.')}"


def _effective_key(cfg, method) -> str:
    """Configs that run the same computation get the same key (pool, precision as resolved)."""
    d = cfg.to_dict()
    if hasattr(method, "pooling"):
        d["train"]["pool"] = method.pool_cfg.model_dump() if method.pooling else "off"
    if hasattr(method, "autocast_dtype"):
        d["train"]["precision"] = str(method.autocast_dtype)
    return json.dumps(d, sort_keys=True, default=str)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto writes start/stop lines straight to file descriptor 2: hide them."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profile_engine(method, rounds: int, device: torch.device):
    """Per round: ``{phase: (host s, device s)}`` from the ``cdfkd.*`` ranges, and the wall.

    Host times are exclusive (a nested ``cdfkd.*`` range's time leaves its parent's), so
    they add up with ``other`` (outside every range) to the round's wall; device times
    (CUDA) are inclusive.
    """
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    run = _engine_round(method)
    sync(device)
    with _quiet_stderr(), torch.profiler.profile(activities=acts, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(rounds):
            run()
        sync(device)
        wall = time.perf_counter() - t0
    host: dict[str, float] = defaultdict(float)
    dev: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if not e.name.startswith("cdfkd."):
            continue
        name, dt = e.name.removeprefix("cdfkd."), e.time_range.elapsed_us() / 1e6
        if e.device_type != torch.autograd.DeviceType.CPU:
            dev[name] += dt
            continue
        host[name] += dt
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("cdfkd."):
            parent = parent.cpu_parent
        if parent is not None:
            host[parent.name.removeprefix("cdfkd.")] -= dt
    if not host:
        return {}, wall / rounds
    host["other"] = wall - sum(host.values())
    found = {k: (host[k] / rounds, dev.get(k, 0.0) / rounds) for k in host}
    return found, wall / rounds


def _print_phases(label: str, per_round: dict[str, tuple[float, float]], wall: float) -> None:
    names = [p for p in (*PHASES, "other") if p in per_round]
    names += sorted(set(per_round) - set(names))
    parts = []
    for name in names:
        host, dev = per_round[name]
        part = f"{name} {host * 1e3:.0f} ms ({host / wall:.0%})"
        parts.append(part + (f" [device {dev * 1e3:.0f} ms]" if dev else ""))
    missing = [p for p in PHASES if p not in per_round]
    if missing:
        parts.append("no range for " + ", ".join(missing))
    print(f"   phases, {label}, per round of {wall * 1e3:.0f} ms: " + " | ".join(parts))


def _student_section(method: str) -> dict:
    """The student of configs/digits/<method>.yaml (the shipped example configs)."""
    path = CONFIGS / f"{method}.yaml"
    if path.is_file():
        return dict(yaml.safe_load(path.read_text()).get("student") or {})
    return {"arch": "lenet5_half", "family": "mfs", "headers": 3} if method == "cdfkd_mfs" else {}


def _build_engines(raw, sets, teachers, info, arch, device) -> dict[str, tuple]:
    """``{effective config key: ([labels], cfg, method)}``: variants that would run the same
    computation are built once. Each gets its own copy of the teachers."""
    specs = [("engine", sets), (EQUAL_LABEL, sets + EQUAL_MATH)]
    if device.type == "cuda" and HAS_PRECISION:
        specs += [("engine fp32", sets + ["train.precision=fp32"])]
        specs += [("engine bf16", sets + ["train.precision=bf16"])]
    engines: dict[str, tuple] = {}
    for label, overrides in specs:
        cfg = build_config(raw, overrides, source="benchmark config")
        copies = [copy.deepcopy(t) for t in teachers]
        ens = TeacherEnsemble(copies, info, [arch] * len(copies), mode=cfg.teachers.mode)
        method = create_method(cfg, ens, info, device)
        key = _effective_key(cfg, method)
        if key in engines:
            engines[key][0].append(label)
        else:
            engines[key] = ([label], cfg, method)
    return engines


def run_case(arch: str, method: str, plan, device: torch.device, sets: list[str]):
    """Validate, warm up, time and profile one (teacher arch, method) case.
    Returns (losses matched, the summary lines)."""
    channels, batch = CASES[arch]
    warmup, blocks, rounds, profiled = plan
    info = DatasetInfo("synthetic", 10, channels, 32, (0.5,) * channels, (0.5,) * channels)
    torch.manual_seed(0)
    teachers = [create_model(arch, 10, channels, 32).eval() for _ in range(3)]  # untrained
    raw = {
        "method": {"name": method},
        "data": {"name": "digits"},  # not loaded: create_method gets the teachers and info
        "teachers": {"path": "unused", "mode": "loop"},
        "student": _student_section(method),
        "train": {"batch_size": batch, "device": str(device), "steps": 1000, "seed": 0},
    }
    engines = _build_engines(raw, sets, teachers, info, arch, device)
    equal_labels, equal_cfg, equal = next(e for e in engines.values() if EQUAL_LABEL in e[0])
    ref = REFERENCES[method](equal_cfg, teachers, equal, device)  # before equal's first step
    steps = equal_cfg.method.student_steps
    case = f"3 x {arch}, batch {batch}"
    if ref.generator_first:
        order = f"1 generator update + {steps} student update(s)"
    else:
        order = f"{steps} student updates + 1 generator update"
    print(f"\n== {method} | {case} | a round = {order}")
    for labels, _, m in engines.values():
        print(f"   {' = '.join(labels)}: {_engine_state(m)}")

    # Round 1 of the equal-math engine and of the baseline (same weights, same latents)
    # checks the losses and is their first warm-up round.
    off = Phases(device, enabled=False)
    engine_round, engine_totals = _engine_first_round(equal)
    rtol = 1e-4 if device.type == "cpu" else 1e-2  # CUDA: TF32 convolutions, other kernels
    ok, text = _check_losses(engine_round, engine_totals, ref, ref.round(off), rtol)
    print(f"   {'losses match' if ok else 'LOSSES DIFFER'}: {text}")

    ref_phases = Phases(device, enabled=device.type == "cpu")  # free on CPU: during blocks
    variants = [_Variant("baseline", device, lambda: ref.round(ref_phases), steps)]
    for labels, _, m in engines.values():
        variants.append(_Variant(" = ".join(labels), device, _engine_round(m), steps))
    for v in variants:
        done = 1 if v.label == "baseline" or EQUAL_LABEL in v.label else 0
        for _ in range(warmup - done):
            v.run_round()
    ref_phases.totals.clear()
    ref_phases.rounds = 0
    for b in range(blocks):  # alternate, reversed every other block, so load hits all alike
        for v in variants[:: 1 if b % 2 == 0 else -1]:
            v.block(rounds)
    print(f"   {blocks} timed blocks of {rounds} round(s) each, after {warmup} warm-up round(s)")
    for v in variants:
        print(f"   {v.label:<38} {v.describe()}")

    if device.type == "cuda" and profiled:  # the baseline's timers sync: a pass of their own
        ref_phases = Phases(device, enabled=True)
        for _ in range(profiled):
            ref.round(ref_phases)
    if ref_phases.rounds:
        per_round = {k: (v / ref_phases.rounds, 0.0) for k, v in ref_phases.totals.items()}
        wall = sum(v[0] for v in per_round.values())
        _print_phases(f"baseline (own timers, {ref_phases.rounds} round(s))", per_round, wall)
    for labels, _, m in engines.values():
        if not profiled:
            print(f"   phases, {labels[0]}: not profiled (--profile-rounds 0)")
            continue
        found, wall = _profile_engine(m, profiled, device)
        if found:
            _print_phases(f"{labels[0]} (torch.profiler, {profiled} round(s))", found, wall)
        else:
            print(f"   phases, {labels[0]}: split unavailable (no cdfkd.* ranges in the engine)")

    base = variants[0].rate
    default = next(v for v in variants if v.label.startswith("engine"))
    fair = next(v for v in variants if EQUAL_LABEL in v.label)
    lines = [
        f"{method:<10} {case:<24} engine {default.rate:.2f} vs baseline {base:.2f} "
        f"updates/s, speedup {default.rate / base:.2f}x",
        f"  at equal math ({EQUAL_LABEL} vs baseline): {fair.rate:.2f} vs {base:.2f} "
        f"updates/s = {fair.rate / base:.2f}x"
        + ("" if HAS_POOL else " (this engine has no train.pool: the same engine)"),
    ]
    fast = next((v for v in variants if "engine bf16" in v.label), None)
    fp32 = next((v for v in variants if "engine fp32" in v.label), None)
    if fast is not None and fp32 is not None:
        lines.append(
            f"  fast path (train.precision=bf16): {fast.rate:.2f} updates/s = "
            f"{fast.rate / base:.2f}x baseline, {fast.rate / fp32.rate:.2f}x engine fp32"
        )
    for line in lines:
        print(line)
    return ok, lines


def _plan(args, arch: str, method: str) -> tuple[int, int, int, int]:
    w, b, r, p = PLANS[("quick" if args.quick else "full", arch)][method]
    return (
        max(1, args.warmup if args.warmup is not None else w),
        args.blocks or b,
        args.rounds or r,
        args.profile_rounds if args.profile_rounds is not None else p,
    )


def _usable_sets(items: list[str]) -> list[str]:
    """``--set`` items, less those naming train.pool / train.precision on an engine without them."""
    known = {"train.pool": HAS_POOL, "train.precision": HAS_PRECISION}
    kept = []
    for item in items:
        key = item.split("=", 1)[0].strip()
        field = next((f for f in known if key == f or key.startswith(f + ".")), None)
        if field is not None and not known[field]:
            print(f"note: this engine has no {field} yet: --set {item} ignored")
        else:
            kept.append(item)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few rounds (<= 5 min on 2 idle cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="engine config override, repeatable (e.g. train.pool.size=0)",
    )  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--cases", nargs="+", choices=sorted(CASES),
        help="teacher archs (default: lenet5 resnet18 on CPU, resnet34 on CUDA)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, help="warm-up rounds (the first checks the losses)")
    p.add_argument("--blocks", type=int, help="timed blocks per variant")
    p.add_argument("--rounds", type=int, help="rounds per timed block")
    p.add_argument("--profile-rounds", type=int, help="rounds under torch.profiler (0: none)")
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: running the CPU cases on the CPU")
        device = torch.device("cpu")
    sets = _usable_sets(args.sets)
    cases = args.cases or (["resnet34"] if device.type == "cuda" else ["lenet5", "resnet18"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, {where}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}; engine config overrides: {sets or 'none'} "
        f"(train.pool {'known' if HAS_POOL else 'unknown'}, "
        f"train.precision {'known' if HAS_PRECISION else 'unknown'})"
    )
    all_ok, summary = True, []
    for arch in cases:
        for method in args.methods:
            ok, lines = run_case(arch, method, _plan(args, arch, method), device, sets)
            all_ok &= ok
            summary += lines
    print(
        f"\nsummary ({time.perf_counter() - t0:.0f} s wall, "
        f"load average {os.getloadavg()[0]:.1f} at the end):"
    )
    print("\n".join(summary))
    if not all_ok:
        raise SystemExit("the baseline's losses differ from the engine's: the figures are void")


if __name__ == "__main__":
    main()
