"""Choosing without labels: the synthetic validation set, selection_score everywhere it is
reported, a sweep that optimises it (ASHA), and the few-shot accuracy estimate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VALIDATION_SET

from cdfkd.metrics import (
    SELECTION_CANDIDATES,
    pick_regret,
    selection_scores,
    wilson_interval,
)
from cdfkd.selection import (
    SELECTION_SCORE,
    ValidationSetConfig,
    ValidationSetError,
    ensure_validation_set,
    few_shot_estimate,
)
from cdfkd.teachers import MANIFEST, read_manifest

TINY = ValidationSetConfig(**TINY_VALIDATION_SET)


@pytest.fixture
def teachers_copy(tmp_path, digits_ensemble) -> Path:
    """A private copy of the session's ensemble folder, without its validation set."""
    folder = tmp_path / "teachers"
    shutil.copytree(digits_ensemble, folder)
    raw = json.loads((folder / MANIFEST).read_text())
    (folder / raw.pop("validation_set")["file"]).unlink()
    (folder / MANIFEST).write_text(json.dumps(raw))
    return folder


def _raw(teachers: Path, root: Path, **train) -> dict:
    return {
        "method": {"name": "cgdd"},
        "data": {"name": "digits", "root": str(root / "data")},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 8, "batch_size": 16, "eval_every": 4, "checkpoint_every": 4, **train},
    }


# ----------------------------------------------------------------------------- scores


def test_selection_scores_of_a_perfect_and_of_a_wrong_student():
    g = torch.Generator().manual_seed(0)
    teachers = torch.randn(3, 40, 10, generator=g)
    targets = teachers.mean(0).argmax(-1)
    same = selection_scores(teachers.mean(0), teachers, targets)
    assert set(same) == set(SELECTION_CANDIDATES)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in same.values())
    wrong = selection_scores(teachers.mean(0).roll(1, dims=-1), teachers, targets)
    assert wrong["agreement"] == 0 and wrong["target_accuracy"] == 0
    assert wrong["worst_class_agreement"] == 0 and wrong["soft_agreement"] < 1
    assert all(0 <= v <= 1 for v in wrong.values())


def test_pick_regret_and_wilson_interval():
    assert pick_regret([0.1, 0.9, 0.5], [0.7, 0.8, 0.9]) == pytest.approx(0.1)
    assert pick_regret([1.0, 1.0], [0.9, 0.6]) == pytest.approx(0.3)  # ties pick the worse
    low, high = wilson_interval(8, 10)  # the textbook value (statsmodels proportion_confint)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 5)[0] == 0 and wilson_interval(5, 5)[1] == 1


# ----------------------------------------------------------------------------- the set


def test_validation_set_builds_balanced_is_cached_and_verified(teachers_copy, monkeypatch, capsys):
    import cdfkd.selection
    from cdfkd.cli import main

    assert read_manifest(teachers_copy).validation_set is None  # an old manifest stays valid
    lines: list[str] = []
    vs = ensure_validation_set(teachers_copy, cfg=TINY, progress=lines.append)
    assert any("building the validation set" in line for line in lines)
    c = TINY.per_class
    assert vs.images.shape == (10 * c, 1, 32, 32) and vs.class_counts() == [c] * 10
    assert vs.teacher_logits.shape == (3, 10 * c, 10)
    entry = read_manifest(teachers_copy).validation_set
    assert entry is not None and entry.sha256 == vs.entry["sha256"] and entry.per_class == c
    assert entry.build["iterations"] == TINY.iterations and entry.cpu_seconds > 0

    # Cached: read back (hash verified) without building again.
    def no_build(*a, **k):
        raise AssertionError("the cached set was built again")

    monkeypatch.setattr(cdfkd.selection, "build_validation_set", no_build)
    again = ensure_validation_set(teachers_copy, cfg=TINY)
    assert torch.equal(again.images, vs.images) and torch.equal(again.targets, vs.targets)
    monkeypatch.undo()

    # Deterministic in its seed: a rebuild gives the same file.
    rebuilt = ensure_validation_set(teachers_copy, cfg=TINY, rebuild=True)
    assert rebuilt.entry["sha256"] == entry.sha256

    # A changed file is refused, with the fix; the fix works.
    path = teachers_copy / entry.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValidationSetError, match=r"altered .*--rebuild"):
        ensure_validation_set(teachers_copy, cfg=TINY)
    argv = ["teachers", "validation-set", str(teachers_copy), "--no-progress", "--device", "cpu"]
    assert main(argv) == 1
    assert "validation-set" in capsys.readouterr().err
    tiny = ["--per-class", str(c), "--iterations", str(TINY.iterations)]
    assert main([*argv, "--rebuild", *tiny]) == 0
    assert "selection_score" in capsys.readouterr().out
    ensure_validation_set(teachers_copy)  # verified again


def test_the_default_set_is_class_balanced_and_the_teachers_agree_with_it(digits_teachers):
    from cdfkd.selection import build_validation_set

    # The default settings with fewer steps: what matters is that optimisation works.
    cfg = ValidationSetConfig(per_class=6, iterations=60)
    x, y, logits, _ = build_validation_set(digits_teachers, cfg)
    assert torch.bincount(y).tolist() == [6] * 10
    assert (logits.mean(0).argmax(-1) == y).float().mean() >= 0.9
    assert x.isfinite().all()


def test_distill_can_skip_building_the_set_and_then_has_no_selection_score(
    teachers_copy, tmp_path, monkeypatch
):
    import cdfkd.selection
    from cdfkd.cli import main

    def no_build(*a, **k):
        raise AssertionError("--skip-validation-set built the set")

    monkeypatch.setattr(cdfkd.selection, "build_validation_set", no_build)
    monkeypatch.chdir(tmp_path)
    raw = _raw(teachers_copy, tmp_path)
    raw["tracking"] = {"enabled": False}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    argv = ["distill", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main([*argv, "--skip-validation-set"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["selection_score"] is None and result["proxy"] is not None
    assert read_manifest(teachers_copy).validation_set is None  # nothing written to the folder
    assert not list(teachers_copy.glob("validation_set*"))


# ----------------------------------------------------------------------------- reported


def test_selection_score_in_result_json_and_mlflow(digits_ensemble, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from cdfkd.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw = _raw(digits_ensemble, tmp_path)
    raw["tracking"] = {"uri": uri, "experiment": "sel", "log_model": False}
    raw["aggregation"] = {"few_shot": 2, "epochs": 2}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["distill", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    score = result["selection_score"]
    assert 0 <= score <= 1 and "proxy" in result
    sel = result["selection"]
    assert sel["score"] == SELECTION_SCORE and sel["candidates"][SELECTION_SCORE] == score
    assert set(sel["candidates"]) == set(SELECTION_CANDIDATES)
    assert sel["validation_set"]["sha256"] == read_manifest(digits_ensemble).validation_set.sha256
    few = result["few_shot_estimate"]
    assert few["samples"] == 20 and few["low"] <= few["accuracy"] <= few["high"]
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("sel").experiment_id])
    history = client.get_metric_history(run.info.run_id, "selection_score")
    assert [m.step for m in history] == [4, 8, 8]  # every evaluation, then the final one
    assert run.data.metrics["selection_score"] == pytest.approx(score)
    assert run.data.metrics["few_shot_accuracy"] == pytest.approx(few["accuracy"])
    assert f"selection/{SELECTION_SCORE}" in run.data.metrics


@pytest.mark.ray
def test_sweep_on_selection_score_with_asha(ray_env, digits_ensemble):
    from cdfkd.tune import run_sweep

    spec = ray_env / "sel.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "sel",
                "base_config": _raw(digits_ensemble, ray_env, steps=24, eval_every=6),
                "search": {"optim.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
                "objective": {"metric": "selection_score", "mode": "max"},
                "scheduler": {"type": "asha", "grace_period": 1},
                "num_samples": 4,
                "max_concurrent_trials": 2,
                "seed": 0,
                "storage_path": str(ray_env / "sweeps"),
                "mlflow": {"enabled": False},
            },
            sort_keys=False,
        )
    )
    summary = run_sweep(spec, write=lambda _: None)
    with (Path(summary["experiment_dir"]) / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and "selection_score" in rows[0] and "relative_accuracy" in rows[0]
    done = [r for r in rows if r["status"] == "COMPLETE"]
    assert done and all(r["selection_score"] and r["relative_accuracy"] for r in rows)
    best = summary["best"]
    assert best["selection_score"] == max(float(r["selection_score"]) for r in done)
    result = json.loads((Path(best["path"]) / "run" / "result.json").read_text())
    assert result["selection_score"] == pytest.approx(best["selection_score"])


# ----------------------------------------------------------------------------- few shot


def test_few_shot_interval_covers_and_shrinks_with_m():
    # 10 classes of 100 samples; the "images" are sample indices, and the predictor is
    # right on a fixed 70 % of them: its accuracy is known exactly.
    labels = torch.arange(10).repeat_interleave(100)
    dataset = torch.utils.data.TensorDataset(torch.arange(1000), labels)
    right = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.7

    def predict(idx):
        pred = torch.where(right[idx], labels[idx], (labels[idx] + 1) % 10)
        return torch.nn.functional.one_hot(pred, 10).float()

    # What a class-balanced draw estimates: the mean of the per-class accuracies.
    truth = torch.stack([right[labels == c].float().mean() for c in range(10)]).mean().item()
    widths = {}
    for m in (2, 8, 30):
        draws = [few_shot_estimate(predict, dataset, m, seed=s) for s in range(40)]
        covered = sum(d["low"] <= truth <= d["high"] for d in draws) / len(draws)
        assert covered >= 0.85, (m, covered)
        assert all(d["samples"] == 10 * m for d in draws)
        widths[m] = sum(d["high"] - d["low"] for d in draws) / len(draws)
    assert widths[2] > widths[8] > widths[30]


def test_report_shows_selection_score_against_true_accuracy(tmp_path):
    import mlflow
    from mlflow.entities import Metric

    from cdfkd.reports import build_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sel", artifact_location=(tmp_path / "art").as_uri())
    # (selection_score, relative accuracy): the best score is 2 points below the best run
    points = [(0.99, 0.93), (0.97, 0.95), (0.90, 0.88), (0.80, 0.70)]
    for i, (score, rel) in enumerate(points):
        run = client.create_run(exp, tags={"run_kind": "trial", "method": "cgdd"})
        rid = run.info.run_id
        values = {"selection_score": score, "relative_accuracy": rel, "student_accuracy": rel}
        client.log_batch(rid, metrics=[Metric(k, v, 1000 + i, 10) for k, v in values.items()])
        client.set_terminated(rid, "FINISHED")
    paths = build_report(["sel"], tmp_path / "report", uri)
    assert "plots/selection.png" in paths
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Spearman rank correlation 0.800 over 4 runs" in text
    assert "2.00 points of relative accuracy below the truly best one" in text
