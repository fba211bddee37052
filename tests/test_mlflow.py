"""MLflow tracking: what a distill run and a sweep log, resume, outages and replay, the registry.

Runs against an embedded sqlite store and a real ``mlflow server`` (lean: one worker, no
job runner) started once for the module; it starts in the background while the sqlite
tests run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.mlflow

STEPS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def _server_process(tmp_path_factory):
    """Start ``mlflow server`` now (it needs ~10-20 s), stop it after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        env=env,
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield proc, f"http://127.0.0.1:{port}", root
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker, nothing else
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(autouse=True, scope="module")
def _start_server_early(_server_process):
    yield


@pytest.fixture
def mlflow_server(_server_process) -> str:
    proc, url, root = _server_process
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return url
        except OSError:
            time.sleep(0.3)
    pytest.fail("mlflow server did not answer /health within 90 s")


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating one runs MLflow's migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite')}/mlflow.db"


def _config(path: Path, teachers: Path, **tracking) -> Path:
    raw = {
        "method": {"name": "cgdd"},
        "data": {"name": "digits", "root": str(path.parent / "data")},
        "teachers": {"path": str(teachers)},
        "student": {"arch": "lenet5_half"},
        "generator": {"width": 16, "nz": 32},
        "train": {
            "steps": STEPS,
            "batch_size": 16,
            "eval_every": 10,
            "checkpoint_every": 10,
            "device": "cpu",
        },
        "tracking": tracking,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _cli(*argv: str) -> int:
    from cdfkd.cli import main

    return main(list(argv))


def _distill(cfg: Path, out: Path, *extra: str) -> int:
    return _cli("distill", "--config", str(cfg), "--out", str(out), "--no-progress", *extra)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_id(out: Path) -> str:
    return json.loads((out / "mlflow_run.json").read_text())["run_id"]


def _check_model(model_uri: str, uri: str, run_dir: Path, monkeypatch) -> None:
    """The logged model loads and predicts a batch of 5 exactly like the trained student."""
    import mlflow.pytorch

    from cdfkd.data import load_dataset
    from cdfkd.tracking.export import ServingStudent
    from cdfkd.tracking.model_registry import student_from_run_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pytorch.load_model(model_uri)
    _, test, _ = load_dataset("digits", augment=False)
    x = torch.stack([test[i][0] for i in range(5)])
    student, shape = student_from_run_dir(run_dir)
    assert shape == (1, 32, 32)
    with torch.no_grad():
        got, want = model(x), ServingStudent(student)(x)
    assert got.shape == (5, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- no training


def test_tracking_uri_is_made_absolute(tmp_path, monkeypatch):
    from cdfkd.teachers import ensemble_id
    from cdfkd.tracking.uri import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path}/sub/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "env.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/env.db"
    assert (
        resolve_tracking_uri("http://h:1") == "http://h:1"
    )  # the config wins over the environment
    # The ensemble id depends on the teachers' hashes and their order only.
    m = {"teachers": [{"sha256": "a" * 64}, {"sha256": "b" * 64}]}
    rev = {"teachers": m["teachers"][::-1]}
    assert len(ensemble_id(m)) == 12 and ensemble_id(m) != ensemble_id(rev)


def test_dead_server_costs_one_short_attempt_per_backoff_and_keeps_every_record(
    tmp_path, monkeypatch
):
    from cdfkd.tracking.mlflow_logger import MLflowLogger
    from cdfkd.tracking.uri import RetryPolicy

    attempts = []
    ensure = MLflowLogger._ensure_run
    monkeypatch.setattr(
        MLflowLogger, "_ensure_run", lambda self, c: attempts.append(1) or ensure(self, c)
    )
    lg = MLflowLogger(
        tmp_path / "run",
        f"http://127.0.0.1:{_free_port()}",
        "x",
        retry=RetryPolicy(first_delay_s=60),
    )
    lg.log_params({"a": 1})
    for step in range(5):
        lg.log_metrics({"m": step / 2, "skipped": "text"}, step)
    assert len(attempts) == 1  # later calls fall inside the back-off and only append to the outbox
    lg.close("FAILED")
    assert len(attempts) == 2  # closing makes one last attempt
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "mlflow_pending.jsonl").read_text().splitlines()
    ]
    assert [r["kind"] for r in rows] == ["params", *["metrics"] * 5, "status"]
    assert len({r["id"] for r in rows}) == 7
    assert rows[0]["params"] == {"a": "1"}
    assert [(r["step"], r["metrics"]) for r in rows[1:6]] == [(s, {"m": s / 2}) for s in range(5)]
    assert rows[-1]["status"] == "FAILED"


def test_a_trial_whose_folder_was_lost_finds_its_run_by_trial_id(tmp_path, sqlite_uri):
    from cdfkd.tracking.mlflow_logger import MLflowLogger

    parent = MLflowLogger(tmp_path / "exp", sqlite_uri, "ids")
    pid = parent.start()

    def trial(folder: str, trial_id: str) -> MLflowLogger:
        return MLflowLogger(
            tmp_path / folder,
            sqlite_uri,
            "ids",
            parent_run_id=pid,
            identity_tags={"trial_id": trial_id},
        )

    first = trial("session1", "t1")
    first.log_metrics({"m": 1.0}, 1)  # then the driver is killed: never closed
    again = trial("session2", "t1")  # a new Ray session: an empty run folder
    again.log_metrics({"m": 2.0}, 2)
    again.close()
    other = trial("session2-other", "t2")
    other.log_metrics({"m": 3.0}, 1)
    other.close()
    parent.close()
    assert again.run_id == first.run_id != other.run_id
    client = _client(sqlite_uri)
    assert len(client.search_runs([parent.experiment_id])) == 3
    assert [m.value for m in client.get_metric_history(first.run_id, "m")] == [1.0, 2.0]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_resumed_run_does_not_log_replayed_steps_twice(tmp_path, sqlite_uri):
    from cdfkd.tracking.mlflow_logger import MLflowLogger

    # First life: evaluations at 10 and 20, then the process dies (never closed). The
    # checkpoint it resumes from is step 10, so the second life computes step 20 again.
    first = MLflowLogger(tmp_path / "run", sqlite_uri, "replay")
    first.log_metrics({"acc": 0.5, "loss/kd": 2.0}, 10)
    first.log_metrics({"acc": 0.6, "loss/kd": 1.5}, 20)
    again = MLflowLogger(tmp_path / "run", sqlite_uri, "replay")
    again.log_metrics({"acc": 0.6, "loss/kd": 1.5}, 20)  # replayed: not logged again
    again.log_metrics({"acc": 0.7, "loss/kd": 1.0}, 30)
    again.log_metrics({"acc": 0.71}, 30)  # the final full-test-set value at the last step
    again.close()
    assert again.run_id == first.run_id
    client = _client(sqlite_uri)
    acc = client.get_metric_history(first.run_id, "acc")
    assert [(m.step, m.value) for m in acc] == [(10, 0.5), (20, 0.6), (30, 0.7), (30, 0.71)]
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/kd")] == [10, 20, 30]


def test_using_tracking_uri_restores_an_unset_uri(tmp_path, monkeypatch):
    # Pins the behaviour of the one wrapper around MLflow's private _use_tracking_uri.
    import mlflow
    from mlflow.tracking._tracking_service import utils

    from cdfkd.tracking.uri import using_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(utils, "_tracking_uri", None)
    inside = f"sqlite:///{tmp_path}/x.db"
    with using_tracking_uri(inside):
        assert mlflow.get_tracking_uri() == inside
    assert utils._tracking_uri is None  # unset again, not frozen to a resolved default


class _Recorder:
    """A metric logger that keeps every call (and has ``log_model``, as MLflowLogger does)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict]] = []
        self.models: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_model(self, model, input_example) -> None:
        self.models.append((model, input_example))


def test_run_hands_final_metrics_and_a_multi_header_student_to_the_logger(
    tmp_path, digits_ensemble
):
    from cdfkd.config import build_config
    from cdfkd.tracking.export import (
        example_batch,
        load_program,
        save_program,
        serving_module,
    )
    from cdfkd.tracking.protocol import MultiLogger
    from cdfkd.train import run

    raw = yaml.safe_load(_config(tmp_path / "c.yaml", digits_ensemble).read_text())
    raw["method"] = {"name": "cdfkd_mfs", "student_steps": 1}
    raw["student"] = {"arch": "lenet5_half", "family": "mfs", "headers": 3}
    raw["train"].update(steps=4, eval_every=2, checkpoint_every=2)
    raw["aggregation"] = {"few_shot": 2, "epochs": 3}
    rec = _Recorder()
    result = run(build_config(raw), tmp_path / "run", logger=MultiLogger(rec))
    step, final = rec.metrics[-1]
    assert step == 4
    assert final["student_params"] == result["student_params"]
    assert final["student_macs"] == result["student_macs"]
    assert final["wall_seconds"] == result["wall_seconds"]
    assert final["student_accuracy"] == result["student_accuracy"]
    assert [final[f"header_{i}_accuracy"] for i in range(3)] == result["header_accuracies"]
    agg = result["aggregation"]
    assert final["aggregation/averaging_accuracy"] == agg["averaging_accuracy"]
    assert final["aggregation/aggregated_accuracy"] == agg["aggregated_accuracy"]
    [(student, example)] = rec.models
    assert example.shape[1:] == (1, 32, 32)
    # Served: the mean of the 3 headers' logits, exported with a batch size of its own.
    serving = serving_module(student)
    x = example[:5]
    with torch.no_grad():
        want = student.eval()(x).mean(0)
        torch.testing.assert_close(serving(x), want)
    save_program(serving, example_batch(example), tmp_path / "s.pt2", tmp_path / "x.npy")
    program, ex = load_program(tmp_path / "s.pt2", tmp_path / "x.npy")
    assert ex.shape == (2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), want, rtol=1e-5, atol=1e-5)
        assert program(x[:1]).shape == (1, 10)


# ----------------------------------------------------------------------------- distill runs


@pytest.mark.parametrize("backend", ["sqlite", "server"])
def test_distill_logs_params_metrics_tags_artifacts_and_model(
    backend, request, tmp_path, digits_ensemble, monkeypatch
):
    from cdfkd.teachers import ensemble_id_of_dir

    monkeypatch.chdir(tmp_path)
    uri = request.getfixturevalue("sqlite_uri" if backend == "sqlite" else "mlflow_server")
    cfg = _config(tmp_path / "cgdd.yaml", digits_ensemble, uri=uri, experiment=f"exp-{backend}")
    out = tmp_path / "runs" / "a"
    assert _distill(cfg, out) == 0
    result = json.loads((out / "result.json").read_text())
    client = _client(uri)
    exp = client.get_experiment_by_name(f"exp-{backend}")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [_run_id(out)]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "a"
    p, t = run.data.params, run.data.tags
    eid = ensemble_id_of_dir(digits_ensemble)
    assert (
        p["method.name"] == "cgdd"
        and p["train.steps"] == str(STEPS)
        and p["generator.width"] == "16"
    )
    assert p["teachers.ensemble_id"] == eid and len(eid) == 12
    assert {
        k: t[k] for k in ("method", "dataset", "reference", "run_kind", "teacher_ensemble_hash")
    } == {
        "method": "cgdd",
        "dataset": "digits",
        "reference": "ensemble",
        "run_kind": "distill",
        "teacher_ensemble_hash": eid,
    }
    assert t["git_commit"] and t["cdfkd_version"]
    acc = client.get_metric_history(run.info.run_id, "student_accuracy")
    assert [m.step for m in acc] == [10, STEPS, STEPS]  # two evaluations, then the final full test
    m = run.data.metrics
    assert m["student_accuracy"] == pytest.approx(result["student_accuracy"])
    assert m["relative_accuracy"] == pytest.approx(result["relative_accuracy"])
    assert (
        m["student_params"] == result["student_params"]
        and m["student_macs"] == result["student_macs"]
    )
    assert m["header_0_accuracy"] == pytest.approx(result["header_accuracies"][0])
    assert {"proxy", "steps_per_second", "wall_seconds"} <= set(m)
    assert any(k.startswith("loss/") for k in m)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "config.yaml",
        "result.json",
        "samples.png",
    }
    model_uri = json.loads((out / "mlflow_run.json").read_text())["model_uri"]
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [
        model_uri[len("models:/") :]
    ]
    _check_model(model_uri, uri, out, monkeypatch)


def test_resume_continues_the_same_run(tmp_path, digits_ensemble, sqlite_uri, monkeypatch):
    import cdfkd.train

    monkeypatch.chdir(tmp_path)
    uri = sqlite_uri
    cfg = _config(tmp_path / "cgdd.yaml", digits_ensemble, uri=uri, log_model=False)
    out = tmp_path / "run"
    proxy = cdfkd.train.agreement_proxy
    calls = []

    def interrupted_at_second_eval(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return proxy(*args, **kw)

    monkeypatch.setattr(cdfkd.train, "agreement_proxy", interrupted_at_second_eval)
    assert _distill(cfg, out) == 130  # Ctrl-C after the step-10 checkpoint
    client = _client(uri)
    run_id = _run_id(out)
    assert client.get_run(run_id).info.status == "KILLED"
    monkeypatch.setattr(cdfkd.train, "agreement_proxy", proxy)
    assert _distill(cfg, out, "--resume", "--set", "train.eval_every=5") == 0
    runs = client.search_runs([client.get_experiment_by_name("cdfkd-distill").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # no second run
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "student_accuracy")] == [
        10,
        15,
        20,
        20,
    ]
    # MLflow keeps a param's first value; the change made on resume is recorded as a tag.
    assert runs[0].data.params["train.eval_every"] == "10"
    assert runs[0].data.tags["params_changed"] == "train.eval_every"


# ----------------------------------------------------------------------------- outages


class _Gate:
    """A TCP forwarder on a fixed port: closed (server down), then open to the real server."""

    def __init__(self, target: str) -> None:
        self.target = int(target.rsplit(":", 1)[1])
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sock = None
        self.conns: list[socket.socket] = []

    def open(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting and cut the open connections too, as a dying server would."""
        if self.sock is not None:
            self.sock.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.conns.clear()


def test_unreachable_server_buffers_and_sync_replays_once(
    tmp_path, digits_ensemble, mlflow_server, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    gate = _Gate(mlflow_server)
    cfg = _config(tmp_path / "cgdd.yaml", digits_ensemble, uri=gate.url, experiment="offline")
    out = tmp_path / "runs" / "offline"
    assert _distill(cfg, out) == 0  # training goes on while the server is dead
    assert (out / "result.json").is_file()
    assert _run_id(out) is None
    pending = [json.loads(line) for line in (out / "mlflow_pending.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in pending]
    assert kinds[:2] == ["params", "tags"] and kinds[-1] == "status" and kinds.count("model") == 1
    assert [r["step"] for r in pending if r["kind"] == "metrics"] == [10, STEPS, STEPS]
    assert len({r["id"] for r in pending}) == len(pending)
    assert (out / "mlflow_student.pt2").is_file()

    gate.open()  # the server is back, at the same URI
    try:
        capsys.readouterr()
        assert _cli("mlflow", "sync", str(tmp_path / "runs")) == 0
        assert f"sent {len(pending)} record(s)" in capsys.readouterr().out
        client = _client(gate.url)
        run_id = _run_id(out)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["run_kind"] == "distill"
        assert run.data.params["method.name"] == "cgdd"
        acc = client.get_metric_history(run_id, "student_accuracy")
        recorded = [
            r for r in pending if r["kind"] == "metrics" and "student_accuracy" in r["metrics"]
        ]
        # Replayed with the step and time of the moment they were recorded, not of the sync.
        assert [(m.step, m.timestamp, m.value) for m in acc] == [
            (r["step"], r["time_ms"], r["metrics"]["student_accuracy"]) for r in recorded
        ]
        assert run.info.start_time <= recorded[0]["time_ms"]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert artifacts >= {"config.yaml", "result.json", "samples.png"}
        counts = {k: len(client.get_metric_history(run_id, k)) for k in run.data.metrics}
        model_uri = json.loads((out / "mlflow_run.json").read_text())["model_uri"]
        _check_model(model_uri, gate.url, out, monkeypatch)

        assert _cli("mlflow", "sync", str(out)) == 0  # again: nothing more is sent
        assert "sent 0 record(s)" in capsys.readouterr().out
        assert {k: len(client.get_metric_history(run_id, k)) for k in run.data.metrics} == counts
        assert len(client.search_runs([run.info.experiment_id])) == 1
        assert len(client.get_run(run_id).outputs.model_outputs) == 1
    finally:
        gate.close()


# ----------------------------------------------------------------------------- sweeps


@pytest.mark.ray
def test_sweep_nests_trial_runs_and_registers_a_loadable_best_student(
    ray_env, digits_ensemble, mlflow_server
):
    from cdfkd.tracking import load_registered_student, sync_runs
    from cdfkd.tune import run_sweep

    base = yaml.safe_load(_config(ray_env / "base.yaml", digits_ensemble).read_text())
    del base["tracking"]
    spec = ray_env / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "mlsweep",
                "base_config": base,
                "search": {
                    "method.alpha": {"type": "float", "low": 0.1, "high": 10.0, "log": True}
                },
                "num_samples": 2,
                "max_concurrent_trials": 2,
                "seed": 0,
                "storage_path": str(ray_env / "sweeps"),
                "mlflow": {"tracking_uri": mlflow_server},
            }
        )
    )
    lines: list[str] = []
    summary = run_sweep(spec, write=lines.append)
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name("mlsweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "mlsweep"
    assert parent.data.metrics["trials_complete"] == 2
    children = {r.data.tags["trial_id"]: r for r in runs if r is not parent}
    assert set(children) == {row["trial_id"] for row in summary["rows"]}
    for row in summary["rows"]:
        child = children[row["trial_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["run_kind"] == "trial" and child.data.tags["sweep"] == "mlsweep"
        assert child.info.status == "FINISHED"
        assert float(child.data.params["method.alpha"]) == pytest.approx(row["param:method.alpha"])
        assert child.data.metrics["relative_accuracy"] == pytest.approx(row["relative_accuracy"])
    # Checkpoints carry each trial's MLflow state (packed, so a sync does not mistake
    # them for run folders); nothing is left to send.
    exp_dir = Path(summary["experiment_dir"])
    assert list(exp_dir.glob("*/checkpoint_*/mlflow_state.json"))
    rows = sync_runs(exp_dir)
    assert {Path(r["run_dir"]) for r in rows} == {
        exp_dir,
        *(Path(r["path"]) / "run" for r in summary["rows"]),
    }
    assert all(r["sent"] == r["pending"] == 0 for r in rows)
    best = summary["best"]
    versions = client.search_model_versions("name = 'mlsweep-best'")
    assert len(versions) == 1 and versions[0].run_id == children[best["trial_id"]].info.run_id
    assert client.get_model_version_by_alias("mlsweep-best", "best").version == versions[0].version
    assert any("registered mlsweep-best version 1" in line for line in lines)
    model = load_registered_student("mlsweep-best", tracking_uri=mlflow_server)
    x = torch.randn(5, 1, 32, 32)
    from cdfkd.tracking.export import ServingStudent
    from cdfkd.tracking.model_registry import student_from_run_dir

    student, _ = student_from_run_dir(Path(best["path"]) / "run")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ServingStudent(student)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_server_killed_mid_sweep_loses_nothing_after_sync(
    ray_env, digits_ensemble, mlflow_server, capsys, monkeypatch
):
    from cdfkd.tune import run_sweep
    from faults.cdfkd_faults import worker_env

    gate = _Gate(mlflow_server)
    gate.open()
    # The first trial waits at the start of step 11, after logging its step-10 evaluation,
    # until the test has killed the server: the outage happens mid-sweep for certain.
    marker, release = ray_env / "held.json", ray_env / "release"
    env = worker_env({"hold": {"step": 11, "marker": str(marker), "release": str(release)}})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    base = yaml.safe_load(_config(ray_env / "base.yaml", digits_ensemble).read_text())
    del base["tracking"]
    spec = ray_env / "outage.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "outage",
                "base_config": base,
                "search": {
                    "method.alpha": {"type": "float", "low": 0.1, "high": 10.0, "log": True}
                },
                "num_samples": 2,
                "max_concurrent_trials": 1,
                "seed": 0,
                "storage_path": str(ray_env / "sweeps"),
                "mlflow": {"tracking_uri": gate.url},
            }
        )
    )
    client = _client(mlflow_server)
    seen_before_kill: list[bool] = []

    def kill_when_held() -> None:
        deadline = time.time() + 600  # a generous bound on a wait, not a timing assumption
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.1)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp is not None else []
        seen_before_kill.append(any("student_accuracy" in r.data.metrics for r in runs))
        gate.close()
        release.touch()

    killer = threading.Thread(target=kill_when_held, daemon=True)
    killer.start()
    try:
        summary = run_sweep(spec, write=lambda _: None)
        killer.join(timeout=5)
        assert seen_before_kill == [True]  # the server died after the first evaluation
        assert all(r["status"] == "COMPLETE" for r in summary["rows"])  # training went on
        for row in summary["rows"]:  # what each trial owes MLflow is in the experiment folder
            assert (Path(row["path"]) / "run" / "mlflow_run.json").is_file()
        gate.open()  # the server is back at the same URI
        capsys.readouterr()
        assert _cli("mlflow", "sync", summary["experiment_dir"]) == 0
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id])
        children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
        assert len(children) == 2 and len(runs) == 3  # one parent, one run per trial
        for child in children:
            assert child.info.status == "FINISHED"
            steps = [
                m.step for m in client.get_metric_history(child.info.run_id, "student_accuracy")
            ]
            assert steps == [10, STEPS, STEPS], steps  # every evaluation, none twice
        counts = {
            r.info.run_id: {
                k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics
            }
            for r in runs
        }
        assert _cli("mlflow", "sync", summary["experiment_dir"]) == 0
        assert "sent 0 record(s)" in capsys.readouterr().out
        again = {
            r.info.run_id: {
                k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics
            }
            for r in client.search_runs([exp.experiment_id])
        }
        assert again == counts
    finally:
        gate.close()
