"""A run folder's MLflow outbox: the records MLflow has not received yet, kept on disk.

Files (``MLFLOW_FILES``; a trial that restarts from scratch keeps them, and its Tune
checkpoints carry the ``STATE_FILES``, packed by ``pack_state``, to the next Ray session
or node):

- ``mlflow_run.json``: where the folder logs (tracking_uri, experiment, run_id, null until
  the run exists, the parent run, the logged model's URI). A folder is one run.
- ``mlflow_pending.jsonl``: records not sent when they were made, one JSON object a line,
  each ``{"id", "kind", "time_ms", ...}`` with a unique id.
- ``mlflow_sent.txt``: ids of pending records sent since; a replay skips them.
- ``mlflow_rejected.jsonl``: records MLflow refused for good, with the reason.
- ``mlflow.lock``: held while a process sends this folder's records.
- ``mlflow_student.pt2`` + ``mlflow_input_example.npy``: a student whose upload failed
  (a ``torch.export`` program, no pickle).

All files are append-only or replaced atomically, so a crash at any point loses at most
the line being written, and a replay never sends a record twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from cdfkd.files import read_json, write_json_atomic

RUN_FILE = "mlflow_run.json"
PENDING_FILE = "mlflow_pending.jsonl"
SENT_FILE = "mlflow_sent.txt"
REJECTED_FILE = "mlflow_rejected.jsonl"
LOCK_FILE = "mlflow.lock"
MODEL_PROGRAM = "mlflow_student.pt2"
MODEL_EXAMPLE = "mlflow_input_example.npy"
MLFLOW_FILES = (
    RUN_FILE,
    PENDING_FILE,
    SENT_FILE,
    REJECTED_FILE,
    LOCK_FILE,
    MODEL_PROGRAM,
    MODEL_EXAMPLE,
)
#: the small files that say which run a folder logs to and what it still owes
STATE_FILES = (RUN_FILE, PENDING_FILE, SENT_FILE, REJECTED_FILE)
#: STATE_FILES packed into one file, for checkpoints (a sync walking a folder skips it)
STATE_BUNDLE = "mlflow_state.json"

#: MLflow error codes that no retry can fix (the request itself is wrong)
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "MALFORMED_REQUEST",
    "RESOURCE_DOES_NOT_EXIST",
}


class PermanentError(RuntimeError):
    """A record MLflow can never accept (a file that is gone, a model that cannot be read)."""


def is_permanent(err: BaseException) -> bool:
    """True for errors no retry fixes (not: connection errors, timeouts, a locked sqlite file)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, PermanentError):
        return True
    if isinstance(err, MlflowException):
        return err.error_code in _PERMANENT_CODES
    return False


def pack_state(run_dir: Path, dest: Path) -> None:
    """Copy a run folder's MLflow state into ``dest/mlflow_state.json`` (nothing if it has none)."""
    state = {n: (run_dir / n).read_text() for n in STATE_FILES if (run_dir / n).is_file()}
    if state:
        write_json_atomic(dest / STATE_BUNDLE, state)


def unpack_state(src: Path, run_dir: Path) -> None:
    """Restore the state packed in ``src``, unless ``run_dir`` has its own (newer) state."""
    state = read_json(src / STATE_BUNDLE)
    if not isinstance(state, dict) or (run_dir / RUN_FILE).is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in state.items():
        if name in STATE_FILES:
            (run_dir / name).write_text(text)


class Outbox:
    """The pending, sent and rejected records of one run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)

    def unsent(self) -> list[dict]:
        """Pending records not sent yet, oldest first."""
        sent = self.sent_ids()
        return [r for r in self._lines(PENDING_FILE) if r["id"] not in sent]

    def sent_ids(self) -> set[str]:
        path = self.dir / SENT_FILE
        return set(path.read_text().split()) if path.is_file() else set()

    def add(self, records: list[dict]) -> None:
        """Append records (keys starting with ``_`` hold live objects and are not written)."""
        if records:
            self.dir.mkdir(parents=True, exist_ok=True)
            with (self.dir / PENDING_FILE).open("a") as f:
                for rec in records:
                    f.write(
                        json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}) + "\n"
                    )

    def mark_sent(self, record_id: str) -> None:
        with (self.dir / SENT_FILE).open("a") as f:
            f.write(record_id + "\n")

    def reject(self, rec: dict, err: BaseException) -> None:
        row = {k: v for k, v in rec.items() if not k.startswith("_")}
        with (self.dir / REJECTED_FILE).open("a") as f:
            f.write(json.dumps({**row, "error": str(err)[:2000]}) + "\n")

    def rejected_count(self) -> int:
        return len(self._lines(REJECTED_FILE))

    @contextlib.contextmanager
    def lock(self, blocking: bool) -> Iterator[bool]:
        """Hold the folder's send lock; yields False at once when another process holds it."""
        # A live logger and `cdfkd mlflow sync` must never send the same record twice.
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lines(self, name: str) -> list[dict]:
        path = self.dir / name
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by a crash
                rows.append(json.loads(line))
        return rows
