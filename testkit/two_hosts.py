"""Two simulated hosts on one machine, for the tests and benchmarks of jobs on several hosts.

Each host is a network namespace made here (``ip netns``), joined to the other by a veth pair
with its own addresses (10.213.N.1 and .2, inside the namespaces only), and its ranks run in
a mount namespace of their own (``ip netns exec`` makes one) with a private ``/dev/shm``
(a tmpfs mounted there), so ranks share memory only with their host. The ranks join one gloo
group over the veth (``GLOO_SOCKET_IFNAME``); the disk is shared, as a network file system
would be. Bytes between the hosts are counted by the veth's counters
(:func:`network_bytes`); bytes between ranks of one host over sockets by its ``lo``'s.

Needs root (namespaces, mounts). ``python -m testkit.two_hosts SPEC HOST`` is the launcher of
one host's ranks (run inside its namespace by :class:`TwoHosts`).
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

IFACE_ENV = "DCP_HF_HOST_IFACE"  # the veth end of a rank's host (its counters: network_bytes)
HOST_ENV = "DCP_HF_HOST"  # the host number of a rank (0 or 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def available() -> str | None:
    """Why two hosts cannot be simulated here, or None where they can."""
    if os.geteuid() != 0:
        return "simulating two hosts needs root (network and mount namespaces)"
    if shutil.which("ip") is None:
        return "simulating two hosts needs the ip command (iproute2)"
    return None


def network_bytes() -> dict[str, int]:
    """This host's bytes so far: received and sent over the veth (to and from the other host),
    and through its loopback (sockets between ranks of the host)."""

    def stat(iface: str, name: str) -> int:
        with open(f"/sys/class/net/{iface}/statistics/{name}") as f:
            return int(f.read())

    iface = os.environ[IFACE_ENV]
    return {"rx": stat(iface, "rx_bytes"), "tx": stat(iface, "tx_bytes"), "lo": stat("lo", "tx_bytes")}


@dataclass(frozen=True)
class _Spec:
    fn: Callable[..., Any]
    args: tuple
    per_host: int
    addresses: tuple[str, str]
    ifaces: tuple[str, str]
    port: int
    pg_timeout: float
    timeout: float
    out: str  # results folder: rank-N.pkl holds (ok, value or traceback)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class TwoHosts:
    """Two hosts of ``per_host`` ranks each (ranks 0.. on host 0, the next on host 1); use as a
    context manager: the namespaces (and any process left in them) go on exit."""

    def __init__(self, per_host: int = 2):
        tag = secrets.token_hex(3)
        self.per_host = per_host
        self.namespaces = (f"dcphf-{tag}-0", f"dcphf-{tag}-1")
        self.ifaces = (f"dh{tag}a", f"dh{tag}b")
        subnet = 1 + secrets.randbelow(254)
        self.addresses = (f"10.213.{subnet}.1", f"10.213.{subnet}.2")

    def __enter__(self) -> TwoHosts:
        try:
            for ns in self.namespaces:
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "add", self.ifaces[0], "type", "veth", "peer", "name", self.ifaces[1])
            for ns, iface, address in zip(self.namespaces, self.ifaces, self.addresses):
                _sh("ip", "link", "set", iface, "netns", ns)
                _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", iface)
                _sh("ip", "-n", ns, "link", "set", iface, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in self.namespaces:
            try:
                pids = subprocess.run(
                    ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30
                ).stdout.split()
            except (OSError, subprocess.SubprocessError):
                pids = []
            for pid in pids:  # only processes this object started live in its namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # its veth end goes too

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = 120, pg_timeout: float = 60
    ) -> dict[int, tuple[bool, Any]]:
        """``fn(rank, world, *args)`` on every rank (``fn`` importable by name); per rank that
        finished, (True, its result) or (False, its traceback); ranks that died or ran past
        ``timeout`` are missing."""
        with tempfile.TemporaryDirectory(prefix="dcp-hf-hosts-") as tmp:
            spec = _Spec(
                fn,
                args,
                self.per_host,
                self.addresses,
                self.ifaces,
                20000 + secrets.randbelow(40000),  # the namespaces are new: any port is free
                pg_timeout,
                timeout,
                tmp,
            )
            spec_path = os.path.join(tmp, "spec.pkl")
            with open(spec_path, "wb") as f:
                pickle.dump(spec, f)
            env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
            launchers = [
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "sh",
                        "-c",
                        'mount -t tmpfs -o size=4g dcp-hf-shm /dev/shm && exec "$0" -m testkit.two_hosts "$@"',
                        sys.executable,
                        spec_path,
                        str(host),
                    ],
                    cwd=REPO,
                    env=env,
                    start_new_session=True,
                )
                for host, ns in enumerate(self.namespaces)
            ]
            deadline = time.monotonic() + timeout + 15
            for p in launchers:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=30)
            results = {}
            for rank in range(2 * self.per_host):
                path = os.path.join(tmp, f"rank-{rank}.pkl")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        results[rank] = pickle.load(f)
            return results


def _rank(spec: _Spec, host: int, rank: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update({"GLOO_SOCKET_IFNAME": spec.ifaces[host], IFACE_ENV: spec.ifaces[host], HOST_ENV: str(host)})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{spec.addresses[0]}:{spec.port}",
            rank=rank,
            world_size=2 * spec.per_host,
            timeout=timedelta(seconds=spec.pg_timeout),
        )
        outcome = (True, spec.fn(rank, 2 * spec.per_host, *spec.args))
    except BaseException:  # noqa: BLE001 - reported to the test
        outcome = (False, traceback.format_exc())
    path = os.path.join(spec.out, f"rank-{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(outcome, f)
    os.rename(path + ".tmp", path)
    if dist.is_initialized():
        dist.destroy_process_group()


def _launch(spec_path: str, host: int) -> None:
    """One host's ranks, each in a process of its own; the launcher waits for them (at most
    the run's timeout) and kills any left."""
    import multiprocessing as mp

    with open(spec_path, "rb") as f:
        spec: _Spec = pickle.load(f)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank, args=(spec, host, host * spec.per_host + i), daemon=True)
        for i in range(spec.per_host)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + spec.timeout
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


if __name__ == "__main__":
    _launch(sys.argv[1], int(sys.argv[2]))
