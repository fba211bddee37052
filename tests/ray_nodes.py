"""Local multi-node Ray clusters for the tests: `ray start` nodes on this machine, each with
its own --temp-dir, so that one node's processes can be found and killed without
touching any other Ray on the host.

Only a node's raylet and log monitor (and on the head GCS, dashboard, monitor) name its
temp dir on their command line; its agents and workers rename themselves ``ray::...``,
so they are found as the raylet's descendants. Nodes that a head's autoscaler starts
(Ray's ``fake_multinode`` provider) live in the head's temp dir, so killing the head's
folder kills them too.

Every port a node would take by default (dashboard 8265, its agent 52365, the Ray client
server 10001) is a free one instead: other Ray clusters may run on the same machine.

``python ray_nodes.py watch ADDRESS OUT`` appends ``<seconds> <alive nodes>`` to OUT every
half second (a separate process, so that this process's own Ray state is not touched).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
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
        self.dashboard_url: str | None = None  # http://127.0.0.1:PORT with dashboard=True
        self.nodes: list[Path] = []

    def _start(self, args: list[str], resources: dict, env: dict | None, num_cpus: int) -> Path:
        temp = Path(f"/tmp/cdfkd-node-{self.port}-{len(self.nodes)}")
        self.nodes.append(temp)
        out = subprocess.run(
            [
                RAY,
                "start",
                *args,
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}",
                f"--temp-dir={temp}",
                "--object-store-memory=150000000",
                f"--dashboard-agent-listen-port={_free_port()}",
                "--disable-usage-stats",
            ],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return temp

    def start_head(
        self,
        resources: dict | None = None,
        *,
        num_cpus: int = 1,
        dashboard: bool = False,
        autoscaling_config: Path | None = None,
        env: dict | None = None,
    ) -> Path:
        """The head node. ``dashboard``: the full dashboard with the Ray Jobs server (needs
        ``ray[default]``) on a free port, at ``self.dashboard_url``; without it no dashboard
        runs (nothing here needs one). ``autoscaling_config``: a cluster config for the head's
        autoscaler (``RAY_FAKE_CLUSTER=1`` in ``env`` for Ray's fake_multinode provider)."""
        args = ["--head", f"--port={self.port}"]
        if importlib.util.find_spec("grpc") is not None:  # ray[client]: its server starts too
            args.append(f"--ray-client-server-port={_free_port()}")
        if dashboard:
            port = _free_port()
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1"]
            args += [f"--dashboard-port={port}"]
            self.dashboard_url = f"http://127.0.0.1:{port}"
        else:
            args += ["--include-dashboard=false"]
        if autoscaling_config is not None:
            args.append(f"--autoscaling-config={autoscaling_config}")
        return self._start(args, resources or {}, env, num_cpus)

    def add_worker(self, resources: dict, env: dict | None = None) -> Path:
        return self._start([f"--address={self.address}"], resources, env, 1)

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
        """Kill every node, then remove their temp dirs (logs, sockets, session files)."""
        for node in reversed(self.nodes):
            self.kill(node)
        for node in self.nodes:
            shutil.rmtree(node, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """PIDs still naming one of this cluster's temp dirs (none once ``stop`` is done)."""
        return [pid for node in self.nodes for pid in _mentioning(str(node)) if pid != os.getpid()]


def watch(address: str, out: Path, every: float = 0.5) -> None:
    """Append ``<seconds since start> <alive nodes>`` to ``out`` until killed."""
    import time

    from ray._raylet import GcsClient

    client = GcsClient(address=address)
    start = time.time()
    with out.open("a") as f:
        while True:
            try:
                nodes = client.get_all_node_info(timeout=5).values()
                alive = sum(1 for n in nodes if n.state == 0)  # GcsNodeInfo.ALIVE
            except Exception:  # the head is going away
                alive = -1
            f.write(f"{time.time() - start:.1f} {alive}\n")
            f.flush()
            time.sleep(every)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        watch(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit("usage: ray_nodes.py watch ADDRESS OUT")
