"""Local multi-node Ray clusters for the tests: `ray start` nodes on this machine, each with
its own --temp-dir, so that one node's processes can be found and killed without
touching any other Ray on the host.

Only a node's raylet and log monitor (and on the head GCS, dashboard, monitor) name its
temp dir on their command line; its agents and workers rename themselves ``ray::...``,
so they are found as the raylet's descendants.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def _mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


class LocalCluster:
    """A head and worker nodes started with `ray start`, each with its own temp dir."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Path] = []

    def _start(self, args: list[str], resources: dict, env: dict | None) -> Path:
        temp = Path(f"/tmp/cdfkd-node-{self.port}-{len(self.nodes)}")
        self.nodes.append(temp)
        out = subprocess.run(
            [
                RAY,
                "start",
                *args,
                "--num-cpus=1",
                f"--resources={json.dumps(resources)}",
                f"--temp-dir={temp}",
                "--object-store-memory=150000000",
                "--disable-usage-stats",
            ],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return temp

    def start_head(self, resources: dict | None = None) -> Path:
        return self._start(["--head", f"--port={self.port}"], resources or {}, None)

    def add_worker(self, resources: dict, env: dict | None = None) -> Path:
        return self._start([f"--address={self.address}"], resources, env)

    def kill(self, node: Path) -> None:
        """SIGKILL every process of ``node``: its raylet, agents and workers."""
        tree = _children()
        todo, doomed = _mentioning(str(node)), set()
        while todo:
            pid = todo.pop()
            if pid not in doomed and pid != os.getpid():
                doomed.add(pid)
                todo.extend(tree.get(pid, []))
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
