"""Accuracy of finished runs' students on a held-out subset of the dataset's *training* split.

A data-free student never sees the training images (its teachers did), so they serve as a
validation split for choosing a method's options without touching the test set that
``result.json`` reports. BENCHMARKS.md, "CGDD without mode collapse", ranks its ablation
with this:

    python benchmarks/validation_accuracy.py --dataset fashion-mnist runs/bench/abl-*/

Prints one line per run: validation accuracy (mean-logit of the headers) and, beside it,
the run's own test accuracy from result.json.

This scores runs made *without* a held-out split, after the fact. New runs should set
``data.validation_images`` instead, which reports ``validation_accuracy`` during training
and keeps the images from ``kd_real`` too. The two draws differ: this one is
``torch.randperm`` and that one is ``cdfkd.data.validation_split``. This one is kept as it
is so that the ablation's recorded figures can be reproduced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cdfkd.data import load_dataset
from cdfkd.metrics import evaluate_headers
from cdfkd.runs import RunDir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (student.pt)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", default="data")
    p.add_argument("--samples", type=int, default=10_000, help="training images, fixed subset")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    args = p.parse_args()
    train, _, info = load_dataset(args.dataset, args.data_root, augment=False)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(train, order[: args.samples].tolist()), batch_size=1000
    )
    for run in args.runs:
        student, _ = RunDir(run).load_student("cpu", info)
        with torch.no_grad():  # the engine's own evaluation, so both columns mean the same
            val = evaluate_headers(student, loader, torch.device("cpu"))["accuracy"]
        test = json.loads((run / "result.json").read_text())["student_accuracy"]
        print(f"{str(run):40s} validation {100 * val:5.1f} %   test {100 * test:5.1f} %")


if __name__ == "__main__":
    main()
