"""The distillation loop and `cdfkd distill` / `cdfkd aggregate` as a user runs them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from cdfkd.cli import main
from cdfkd.config import ConfigError, build_config
from cdfkd.train import CHECKPOINT, NonFiniteLossError, load_checkpoint, run


def _raw(teachers, tmp_path, method="cgdd", **train) -> dict:
    return {
        "method": {"name": method},
        "data": {"name": "digits", "root": str(tmp_path / "data")},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {"steps": 20, "batch_size": 16, "eval_every": 10, "checkpoint_every": 5, **train},
        "tracking": {"enabled": False},
    }


class _Interrupt(Exception):
    pass


def test_resume_continues_bit_for_bit(digits_ensemble, tmp_path):
    cfg = build_config(_raw(digits_ensemble, tmp_path))
    whole = run(cfg, tmp_path / "whole")

    def stop_at_12(step, total, losses):
        if step == 12:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(cfg, tmp_path / "cut", on_progress=stop_at_12)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["step"] == 10
    resumed = run(cfg, tmp_path / "cut", resume=True)
    a = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["student_accuracy"] == whole["student_accuracy"]
    assert resumed["proxy"] == whole["proxy"]


def test_last_steps_evaluation_is_the_final_one_and_is_not_repeated(
    digits_ensemble, tmp_path, monkeypatch
):
    import cdfkd.train as engine

    calls, reported = [], {}
    evaluate = engine.evaluate

    def counting(s, final):
        calls.append((s.method.step_count, final))
        return evaluate(s, final)

    monkeypatch.setattr(engine, "evaluate", counting)
    cfg = build_config(_raw(digits_ensemble, tmp_path, max_eval_samples=50))  # of 360
    result = run(cfg, tmp_path / "r", on_eval=lambda step, m, _: reported.update({step: m}))
    # Step 10 is capped like any evaluation in training; step 20 is the whole-test-set one,
    # which the result reuses rather than computing the same numbers a second time.
    assert calls == [(10, False), (20, True)]
    assert reported[20]["student_accuracy"] == result["student_accuracy"]
    assert reported[20]["proxy"] == result["proxy"]
    # Resumed at its last step, a run has no evaluation of it in memory: finish makes one.
    calls.clear()
    again = run(cfg, tmp_path / "r", resume=True)
    assert calls == [(20, True)]
    assert again["student_accuracy"] == result["student_accuracy"]
    assert again["proxy"] == result["proxy"]


def test_result_json_and_sample_grid(digits_ensemble, tmp_path):
    result = run(build_config(_raw(digits_ensemble, tmp_path)), tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    for key in (
        "method",
        "dataset",
        "teachers",
        "student_accuracy",
        "header_accuracies",
        "relative_accuracy",
        "reference",
        "proxy",
        "student_params",
        "student_macs",
        "steps",
        "wall_seconds",
        "config",
    ):
        assert key in saved
    assert saved["reference"]["kind"] == "ensemble"
    ref = saved["teachers"]["ensemble_accuracy"]
    assert saved["relative_accuracy"] == pytest.approx(saved["student_accuracy"] / ref)
    assert result["steps"] == 20 and 0 <= result["proxy"] <= 1
    grid = Image.open(tmp_path / "r" / "samples.png")
    # One row per class for the conditional generator: 10 rows of 32 px plus 1 px padding.
    assert grid.size[1] == 10 * 33 + 1
    lines = (tmp_path / "r" / "config.yaml").read_text()
    assert yaml.safe_load(lines)["method"]["name"] == "cgdd"


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(
    digits_ensemble, tmp_path, monkeypatch
):
    from cdfkd.methods.base import DistillMethod
    from faults.cdfkd_faults import wrap_step

    # The fault is injected, not hoped for: a student weight turns NaN at the start of
    # step 7, so the loss is NaN for real and the loop's own check must catch it.
    monkeypatch.setattr(
        DistillMethod, "step", wrap_step(DistillMethod.step, {"nonfinite": {"step": 7}})
    )
    raw = _raw(digits_ensemble, tmp_path, method="kd_real")
    with pytest.raises(
        NonFiniteLossError, match=r"loss 'student' became nan at step 7; last good checkpoint"
    ):
        run(build_config(raw), tmp_path / "nan")
    kept = load_checkpoint(tmp_path / "nan" / CHECKPOINT)
    assert kept["step"] == 5  # checkpoints every 5 steps: the last one before step 7
    assert all(torch.isfinite(v).all() for v in kept["student"].values())


def test_reference_choices(digits_ensemble, tmp_path):
    raw = _raw(digits_ensemble, tmp_path, method="kd_real", steps=10)
    kd = run(build_config(raw), tmp_path / "kd")
    best = run(build_config({**raw, "reference": {"kind": "best_teacher"}}), tmp_path / "best")
    manifest = json.loads((digits_ensemble / "ensemble.json").read_text())
    assert best["reference"]["accuracy"] == max(t["test_accuracy"] for t in manifest["teachers"])
    cg = run(
        build_config(
            {
                **_raw(digits_ensemble, tmp_path, steps=10),
                "reference": {"kind": "kd_real", "result": str(tmp_path / "kd" / "result.json")},
            }
        ),
        tmp_path / "vs-kd",
    )
    assert cg["reference"]["accuracy"] == kd["student_accuracy"]
    assert cg["relative_accuracy"] == pytest.approx(cg["student_accuracy"] / kd["student_accuracy"])


def test_run_folder_refusals(digits_ensemble, tmp_path):
    cfg = build_config(_raw(digits_ensemble, tmp_path, steps=5))
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        run(cfg, tmp_path / "fresh", resume=True)
    run(cfg, tmp_path / "done")
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg, tmp_path / "done")
    (tmp_path / "done" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        run(cfg, tmp_path / "done", resume=True)


def test_cli_distill_then_aggregate(digits_ensemble, tmp_path, capsys):
    raw = _raw(
        digits_ensemble, tmp_path, method="cdfkd_mfs", steps=6, eval_every=3, checkpoint_every=3
    )
    raw["student"] = {"arch": "lenet5_half", "family": "mfs", "headers": 3}
    config = tmp_path / "mfs.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "mfs"
    assert (
        main(
            [
                "distill",
                "--config",
                str(config),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "method.lambda_ens=2",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "relative accuracy" in text and "headers:" in text
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["method"]["lambda_ens"] == 2 and len(result["header_accuracies"]) == 3
    assert (out / "metrics.jsonl").read_text().count("\n") >= 2
    assert main(["aggregate", str(out), "--few-shot", "3"]) == 0
    agg = json.loads((out / "result.json").read_text())["aggregation"]
    assert agg["few_shot"] == 3 and agg["selection"] == "holdout"
    assert 0 <= agg["aggregated_accuracy"] <= 1


def test_cli_refuses_bad_configs_with_one_message_each(digits_ensemble, tmp_path, capsys):
    raw = _raw(digits_ensemble, tmp_path, method="cdfkd_mfs")
    raw["student"] = {"arch": "lenet5_half", "family": "mfs", "headers": 3, "fuse_from": 9}
    raw["method"]["lambda_ensemble"] = 1.0
    raw["train"]["stepz"] = 3
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert (
        main(["distill", "--config", str(config), "--out", str(tmp_path / "x"), "--no-progress"])
        == 1
    )
    err = capsys.readouterr().err
    assert "method.lambda_ensemble: unknown key" in err and "train.stepz: unknown key" in err
    raw["method"].pop("lambda_ensemble")
    raw["train"].pop("stepz")
    raw["teachers"]["path"] = str(tmp_path / "missing")
    config.write_text(yaml.safe_dump(raw))
    assert (
        main(["distill", "--config", str(config), "--out", str(tmp_path / "x"), "--no-progress"])
        == 1
    )
    assert "ensemble.json does not exist" in capsys.readouterr().err
    raw["teachers"]["path"] = str(digits_ensemble)
    config.write_text(yaml.safe_dump(raw))
    assert (
        main(["distill", "--config", str(config), "--out", str(tmp_path / "x"), "--no-progress"])
        == 1
    )
    assert "fuse_from=9 is out of range for lenet5_half (valid: 0..2)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_validation_images_are_held_out_and_measured(digits_ensemble, tmp_path, monkeypatch):
    import cdfkd.train as train_mod
    from cdfkd.data import load_dataset, validation_split
    from cdfkd.metrics import evaluate_headers
    from cdfkd.runs import RunDir

    raw = _raw(digits_ensemble, tmp_path, method="kd_real", steps=10)
    raw["data"]["validation_images"] = 300
    cfg = build_config(raw)
    seen = {}
    create = train_mod.create_method

    def spy(cfg, teachers, info, device, train_data=None):
        seen["train_indices"] = set(train_data.indices)
        return create(cfg, teachers, info, device, train_data=train_data)

    monkeypatch.setattr(train_mod, "create_method", spy)
    result = run(cfg, tmp_path / "r")

    plain, _, _ = load_dataset("digits", root=tmp_path / "data", augment=False)
    rest, held = validation_split(plain, 300, seed=0)
    assert len(held) == 300 and len(rest) == len(plain) - 300
    assert set(held.indices).isdisjoint(rest.indices)
    # kd_real, the one method that reads real images, trains on the rest only.
    assert seen["train_indices"] == set(rest.indices)
    # validation_accuracy is the finished student's accuracy on exactly those images.
    student, _ = RunDir(tmp_path / "r").load_student()
    loader = torch.utils.data.DataLoader(held, batch_size=128)
    single_header = lambda x: student(x).unsqueeze(0)  # noqa: E731  # (H=1, B, C)
    expect = evaluate_headers(single_header, loader, torch.device("cpu"))
    assert result["validation_accuracy"] == pytest.approx(expect["accuracy"])
    assert validation_split(plain, 300, seed=0)[1].indices == held.indices  # deterministic
    assert validation_split(plain, 300, seed=1)[1].indices != held.indices


def test_validation_images_refusals(digits_ensemble, tmp_path):
    raw = _raw(digits_ensemble, tmp_path, steps=2)
    raw["data"]["validation_images"] = 10**6
    with pytest.raises(ConfigError, match=r"data.validation_images: .*needs 0 < count < 1\d\d\d"):
        run(build_config(raw), tmp_path / "too-many")
