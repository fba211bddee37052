"""cdfkd.reports on a synthetic sqlite MLflow store: tables, images, HTML links, compare, errors."""

import math
import statistics
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cdfkd.reports import ReportError, build_report
from cdfkd.reports.importance import journal_importances, param_importances
from cdfkd.reports.query import coerce_param
from cdfkd.reports.tables import pareto_mask, structure_labels

REF = 0.95  # the teachers' ensemble accuracy every synthetic run is relative to
T0 = 1_700_000_000_000  # ms
# (method, seed) -> final relative accuracy
REL = {
    ("cgdd", 0): 0.91,
    ("cgdd", 1): 0.87,
    ("cgdd", 2): 0.89,
    ("cdfkd_mfs", 0): 0.93,
    ("cdfkd_mfs", 1): 0.96,
    ("cdfkd_mfs", 2): 0.90,
}
PARAMS = {"cgdd": 20_000, "cdfkd_mfs": 55_000}


def _params(method: str, seed: int) -> dict:
    mfs, swept = method == "cdfkd_mfs", method != "dafl"  # sweep-b (dafl): one config, three seeds
    return {
        "method.name": method,
        "data.name": "digits",
        "train.seed": seed,
        "train.steps": 30,
        "teachers.ensemble_id": "e3b0c442",
        **(
            {"method.lambda_ens": 2.0 + seed}
            if mfs
            else {"method.alpha": 0.1 * (seed + 1) if swept else 0.5}
        ),
        "student.arch": "lenet5_half",
        "student.family": "mfs" if mfs else None,
        "student.headers": 3 if mfs else 1,
        "student.fuse_from": 1 if mfs else None,
        "student.share_until": None,
        "student.header_width": 0.5 if seed % 2 and swept else 1.0,
    }


def _log_run(
    client,
    exp_id,
    *,
    method,
    seed,
    rel,
    start,
    kind,
    parent=None,
    samples=None,
    status="FINISHED",
    proxy=None,
):
    from mlflow.entities import Metric, Param, RunTag

    tags = {
        "run_kind": kind,
        "method": method,
        "dataset": "digits",
        "reference": "ensemble",
        "teacher_ensemble_hash": "e3b0c442",
        "git_commit": "0" * 40,
        "cdfkd_version": "0.1.0",
    }
    if parent is not None:
        tags.update(
            {"mlflow.parentRunId": parent, "trial_id": f"t{seed}{method[:2]}", "sweep": "sweep-a"}
        )
    run = client.create_run(exp_id, start_time=start, tags=tags, run_name=f"{method}-{seed}")
    rid = run.info.run_id
    metrics = [
        Metric("relative_accuracy", rel * f, start + 1000 * k, 10 * k)
        for k, f in ((1, 0.5), (2, 0.8), (3, 1.0))
    ]
    finals = {
        "student_accuracy": rel * REF,
        "proxy": proxy if proxy is not None else rel - 0.1,
        "student_params": PARAMS.get(method, 10_000),
        "student_macs": 10 * PARAMS.get(method, 10_000),
        "wall_seconds": 3.0 + seed,
        "steps_per_second": 10.0,
        "loss/kd": 0.5,
    }
    if method == "cdfkd_mfs":  # three headers, each a little below the aggregated student
        finals.update({f"header_{i}_accuracy": rel * REF - 0.01 * (i + 1) for i in range(3)})
    metrics += [Metric(k, float(v), start + 3000, 30) for k, v in finals.items()]
    params = [Param(k, str(v)) for k, v in _params(method, seed).items()]
    client.log_batch(
        rid, metrics=metrics, params=params, tags=[RunTag("mlflow.note.content", "synthetic")]
    )
    if samples is not None:
        client.log_artifact(rid, str(samples))
    client.set_terminated(rid, status, end_time=start + 4000)
    return rid


def _log_with_cdfkd_logger(uri: str, run_dir: Path, *, seed: int, rel: float) -> str:
    """A distill run logged by cdfkd.tracking.MLflowLogger with the calls of train.run."""
    from cdfkd.tracking.mlflow_logger import MLflowLogger
    from cdfkd.tracking.tags import standard_tags

    lg = MLflowLogger(
        run_dir,
        uri,
        "sweep-b",
        run_name=f"dafl-{seed}",
        tags=standard_tags("distill", "e3b0c442"),
        log_models=False,
    )
    lg.log_params(_params("dafl", seed))
    lg.set_tags({"method": "dafl", "dataset": "digits", "reference": "ensemble"})
    lg.log_metrics({"relative_accuracy": rel / 2, "loss/kd": 1.0}, step=10)
    lg.log_metrics(
        {
            "relative_accuracy": rel,
            "student_accuracy": rel * REF,
            "proxy": rel - 0.1,
            "student_params": 10_000,
            "student_macs": 100_000,
            "wall_seconds": 3.0 + seed,
        },
        step=20,
    )
    lg.close("FINISHED")
    assert lg.run_id is not None, "the MLflow logger could not reach the test store"
    return lg.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """sqlite store: sweep-a (parent, 6 trials, 1 failed), sweep-b (3 distill runs), 2 others."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(0)
    samples = root / "samples.png"
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(samples)
    a = client.create_experiment("sweep-a", artifact_location=(root / "art-a").as_uri())
    b = client.create_experiment("sweep-b", artifact_location=(root / "art-b").as_uri())
    client.create_experiment("empty", artifact_location=(root / "art-e").as_uri())
    lone = client.create_experiment("only-parent", artifact_location=(root / "art-p").as_uri())
    client.set_terminated(client.create_run(lone, tags={"run_kind": "sweep"}).info.run_id)
    parent = client.create_run(
        a, start_time=T0, tags={"run_kind": "sweep", "sweep": "sweep-a"}
    ).info.run_id
    ids = {}
    for i, ((method, seed), rel) in enumerate(REL.items()):
        ids[method, seed] = _log_run(
            client,
            a,
            method=method,
            seed=seed,
            rel=rel,
            start=T0 + 5000 * i,
            kind="trial",
            parent=parent,
            samples=samples,
        )
    # A failed trial with a tempting value: it must stay out of every table and plot.
    failed = _log_run(
        client,
        a,
        method="cgdd",
        seed=3,
        rel=0.99,
        start=T0,
        kind="trial",
        parent=parent,
        status="FAILED",
    )
    client.set_terminated(parent, "FINISHED")
    del b  # sweep-b is written by the project's own logger, as `cdfkd distill` does
    b_ids = [
        _log_with_cdfkd_logger(uri, root / f"dafl-{s}", seed=s, rel=0.7 + 0.05 * s)
        for s in range(3)
    ]
    return {
        "uri": uri,
        "root": root,
        "ids": ids,
        "parent": parent,
        "failed": failed,
        "b_ids": b_ids,
    }


@pytest.fixture(scope="module")
def single(store, tmp_path_factory):
    """The single-experiment report, made through the CLI."""

    from cdfkd.cli import main

    out = tmp_path_factory.mktemp("report-a")
    assert (
        main(
            ["report", "--experiment", "sweep-a", "--tracking-uri", store["uri"], "--out", str(out)]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def compare(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-ab")
    return out, build_report(["sweep-a", "sweep-b"], out, tracking_uri=store["uri"], top_k=2)


def test_comparison_table_equals_the_runs_metrics(store, single):
    table = pd.read_csv(single / "comparison.csv")
    assert set(table["method"]) == {"cgdd", "cdfkd_mfs"}
    for method in ("cgdd", "cdfkd_mfs"):
        row = table[table["method"] == method].iloc[0]
        rel = [REL[method, s] for s in range(3)]
        assert row["relative_accuracy_mean"] == pytest.approx(statistics.mean(rel), abs=1e-12)
        assert row["relative_accuracy_std"] == pytest.approx(statistics.stdev(rel), abs=1e-12)
        assert row["student_accuracy_mean"] == pytest.approx(statistics.mean(r * REF for r in rel))
        assert row["student_accuracy_std"] == pytest.approx(statistics.stdev(r * REF for r in rel))
        assert row["reference_accuracy"] == pytest.approx(REF)
        assert row["student_params_mean"] == PARAMS[method]
        assert row["wall_seconds_mean"] == pytest.approx(4.0)
        assert (row["n_runs"], row["seeds"], row["reference"], row["dataset"]) == (
            3,
            "0 1 2",
            "ensemble",
            "digits",
        )
        assert set(row["run_ids"].split()) == {store["ids"][method, s] for s in range(3)}
    # mfs first: rows are sorted by mean relative accuracy
    assert list(table["method"]) == ["cdfkd_mfs", "cgdd"]
    runs = pd.read_csv(single / "runs.csv")
    assert store["parent"] not in set(runs["run_id"])  # sweep parents are not trials
    assert store["failed"] in set(runs["run_id"])  # listed, but kept out of the tables
    assert len(runs) == 7


def test_best_runs_carry_ids_and_params(store, single):
    best = pd.read_csv(single / "best.csv")
    order = sorted(REL, key=REL.get, reverse=True)[:3]
    assert list(best["run_id"]) == [store["ids"][k] for k in order]
    assert list(best["relative_accuracy"]) == pytest.approx([REL[k] for k in order])
    assert list(best["rank"]) == [1, 2, 3]
    swept = {"param:method.lambda_ens", "param:student.header_width", "param:student.family"}
    assert swept <= set(best)
    # the seed has its own column; a param equal in every run is not a configuration choice
    assert "param:train.seed" not in best and "param:data.name" not in best
    assert list(best["seed"]) == [k[1] for k in order]
    assert store["failed"] not in set(best["run_id"])
    # per-header accuracies of the multi-header students; NaN for the single-header cgdd run
    assert best.loc[0, "header_2_accuracy"] == pytest.approx(REL[order[0]] * REF - 0.03)
    assert math.isnan(best.loc[2, "header_0_accuracy"])


def test_importances_from_the_runs(single):
    imp = pd.read_csv(single / "importances.csv")
    assert len(imp) > 0 and set(imp["experiment"]) == {"sweep-a"}
    assert imp["importance"].sum() == pytest.approx(1.0)
    assert (imp["importance"] >= 0).all()
    assert set(imp["param"]) <= {
        "method.name",
        "method.alpha",
        "method.lambda_ens",
        "student.family",
        "student.headers",
        "student.fuse_from",
        "student.header_width",
    }
    assert (imp["n_trials"] == 6).all() and len(imp["run_ids"].iloc[0].split()) == 6


def _image_ok(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= 40 and im.height >= 40, (path, im.size)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 0, f"{path} is a blank image"


def test_every_png_is_a_real_image(store, single):
    pngs = sorted(single.rglob("*.png"))
    names = {p.relative_to(single).as_posix() for p in pngs}
    assert {
        "plots/history.png",
        "plots/pareto.png",
        "plots/structure.png",
        "plots/proxy.png",
        "plots/importances.png",
    } <= names
    best3 = sorted(REL, key=REL.get, reverse=True)[:3]
    assert {f"samples/{store['ids'][k]}.png" for k in best3} <= names
    for p in pngs:
        _image_ok(p)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k in ("src", "href")]


def test_html_is_self_contained(store, single):
    text = (single / "index.html").read_text()
    parser = _Links()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags  # CSS embedded, no JS
    assert len(parser.links) >= 10
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), link
        target = (single / link).resolve()
        assert target.is_file() and single.resolve() in target.parents, link
    for run_id in store["ids"].values():
        assert run_id in text  # every reported number carries its run id
    assert (
        "Spearman" in text and "91.00" in text
    )  # the proxy plot caption; a run's rel. accuracy in %
    md = (single / "report.md").read_text()
    assert (
        "## Comparison" in md and store["ids"]["cdfkd_mfs", 1] in md and "(plots/pareto.png)" in md
    )


def test_compare_mode_puts_experiments_side_by_side(store, compare):
    out, paths = compare
    assert set(paths) >= {
        "index.html",
        "report.md",
        "runs.csv",
        "comparison.csv",
        "best.csv",
        "importances.csv",
        "plots/pareto.png",
    }
    assert all(p.is_file() and p.parent.is_relative_to(out.resolve()) for p in paths.values())
    table = pd.read_csv(paths["comparison.csv"])
    assert list(table["experiment"]) == ["sweep-a", "sweep-a", "sweep-b"]
    dafl = table[table["experiment"] == "sweep-b"].iloc[0]
    assert dafl["relative_accuracy_mean"] == pytest.approx(0.75)
    assert set(dafl["run_ids"].split()) == set(store["b_ids"])
    best = pd.read_csv(paths["best.csv"])
    assert best.groupby("experiment").size().to_dict() == {"sweep-a": 2, "sweep-b": 2}
    html = paths["index.html"].read_text()
    assert "sweep-a vs sweep-b" in html
    # sweep-b's params never vary: a note instead of importances; sweep-b logged no samples
    assert "sweep-b: no parameter importances" in html and "logged no samples.png" in html
    for p in paths.values():
        if p.suffix == ".png":
            _image_ok(p)


def test_clear_errors(store, tmp_path):
    with pytest.raises(
        ReportError,
        match=r"no MLflow experiment named 'nope'.*known experiments: Default, "
        r"empty, only-parent, sweep-a, sweep-b",
    ):
        build_report(["nope"], tmp_path, tracking_uri=store["uri"])
    with pytest.raises(ReportError, match=r"'empty' .* has no runs: log runs to it first"):
        build_report(["empty"], tmp_path, tracking_uri=store["uri"])
    with pytest.raises(ReportError, match=r"'only-parent' .* only sweep parent runs"):
        build_report(["only-parent"], tmp_path, tracking_uri=store["uri"])
    with pytest.raises(
        ReportError,
        match=r"cannot reach the MLflow tracking server at http://127.0.0.1:9 "
        r".*mlflow server",
    ):
        build_report(["sweep-a"], tmp_path, tracking_uri="http://127.0.0.1:9")
    missing = tmp_path / "nowhere.db"
    with pytest.raises(
        ReportError, match=r"no MLflow store at sqlite:///.*does not exist; pass --tracking-uri"
    ):
        build_report(["sweep-a"], tmp_path, tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # reading never creates a store


def test_cli_error_exit_code(store, tmp_path, capsys):

    from cdfkd.cli import main

    assert (
        main(
            [
                "report",
                "--compare",
                "sweep-a",
                "ghost",
                "--tracking-uri",
                store["uri"],
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no MLflow experiment named 'ghost'" in err and "sweep-a" in err


def test_coerce_param_types_mlflow_strings():
    ints = coerce_param(pd.Series(["1", "3", "None", None]))
    assert str(ints.dtype) == "Int64" and ints.tolist()[:2] == [1, 3] and ints.isna().sum() == 2
    assert coerce_param(pd.Series(["0.5", "1"])).tolist() == [0.5, 1.0]
    text = coerce_param(pd.Series(["mfs", "None"]))
    assert text.iloc[0] == "mfs" and pd.isna(text.iloc[1])


def test_pareto_mask_and_structure_labels():
    frame = pd.DataFrame(
        {
            "relative_accuracy": [0.9, 0.8, 0.95, 0.85, 0.9],
            "student_params": [100, 50, 300, 200, 100],
        }
    )
    # (0.8, 50) and (0.9, 100) twice and (0.95, 300) are not dominated; (0.85, 200) is
    assert pareto_mask(frame).tolist() == [True, True, True, False, True]
    runs = pd.DataFrame(
        {
            "param:student.family": ["mfs", "branch", None],
            "param:student.headers": pd.array([3, 2, 1], dtype="Int64"),
            "param:student.fuse_from": pd.array([1, None, None], dtype="Int64"),
            "param:student.share_until": pd.array([None, 2, None], dtype="Int64"),
            "param:student.header_width": [0.5, 1.0, 1.0],
        }
    )
    assert structure_labels(runs).tolist() == [
        "mfs h=3 fuse_from=1 width=0.5",
        "branch h=2 share_until=2 width=1",
        "single header",
    ]


def test_importances_find_the_parameter_that_matters(tmp_path):
    rng = np.random.default_rng(1)
    x, noise = rng.uniform(0, 1, 12), rng.uniform(0, 1, 12)
    frame = pd.DataFrame(
        {
            "experiment": "s",
            "status": "FINISHED",
            "run_id": [f"r{i}" for i in range(12)],
            "relative_accuracy": x,
            "param:method.alpha": x,
            "param:method.beta": noise,
            "param:train.seed": 0,
        }
    )
    imp, notes = param_importances(frame, "s")
    scores = dict(zip(imp["param"], imp["importance"], strict=True))
    assert set(scores) == {"method.alpha", "method.beta"} and scores["method.alpha"] > 0.8
    assert notes == []
    _, notes = param_importances(frame.head(1), "s")
    assert "at least 2 finished runs" in notes[0]

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "optuna.log"
    study = optuna.create_study(
        study_name="sw",
        direction="maximize",
        storage=JournalStorage(JournalFileBackend(str(journal))),
    )
    dist = {
        "method.alpha": optuna.distributions.FloatDistribution(0, 1),
        "method.beta": optuna.distributions.FloatDistribution(0, 1),
    }
    for a, b in zip(x, noise, strict=True):
        study.add_trial(
            optuna.trial.create_trial(
                value=float(a), params={"method.alpha": a, "method.beta": b}, distributions=dist
            )
        )
    imp, _ = journal_importances(journal, "sw")
    assert imp.iloc[0]["param"] == "method.alpha" and imp.iloc[0]["source"].startswith("journal")
    assert not math.isnan(imp["importance"].sum())
    with pytest.raises(ReportError, match="has no study 'other'; it has: sw"):
        journal_importances(journal, "other")
