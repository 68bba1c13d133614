"""Hosts in network namespaces on one bridge, and iptables to cut the links between them.

For the partition tests and benchmarks: each host is a network namespace with one veth
interface on a bridge in the root namespace (``10.77.K.1``), at ``10.77.K.(10+i)``. The
root namespace reaches every host through the bridge, so a test reads a sidecar's
``/status`` however the hosts are cut from each other. Cuts are iptables rules in the
receiving host's INPUT chain (a datagram from A to B is dropped where B receives it):

- ``cut(a, b)`` both ways; ``cut(a, b, one_way=True)`` only A → B;
- ``isolate(a)`` from every other host (the bridge address still answers);
- ``loss(p)`` drops a random fraction of the group protocol's datagrams everywhere
  (iptables ``statistic``; this kernel has no netem);
- ``slow(a, rate)`` limits host A's link to ``rate`` both ways with a ``tc`` token bucket
  (tbf) — a fail-slow NIC or cable;
- ``heal()`` removes every rule and limit.

Needs root, ``ip`` and ``tc`` (iproute2) and ``iptables``; traffic never leaves the
bridge.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import subprocess

_live: list[Hosts] = []
_instances = itertools.count()


@atexit.register
def _tear_down_leftovers() -> None:
    for hosts in list(_live):
        hosts.down()


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Hosts:
    def __init__(self, n: int, peer_port: int = 8088) -> None:
        self.n = n
        self.peer_port = peer_port
        # Distinct per process and per instance: a test module's hosts may not be gone
        # (namespaces die only when their last process does) when the next module's come up.
        self.k = 100 + (os.getpid() * 7 + next(_instances)) % 150
        self.bridge = f"gsbr{self.k}"
        self.names = [f"gs{self.k}h{i}" for i in range(n)]
        self.ips = [f"10.77.{self.k}.{10 + i}" for i in range(n)]
        self.gateway = f"10.77.{self.k}.1"
        self.subnet = f"10.77.{self.k}.0/24"
        self._slowed: set[int] = set()

    def up(self) -> Hosts:
        self.down()  # leftovers of a run that was killed
        _live.append(self)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips, strict=True)):
            veth = self._veth(i)
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def down(self) -> None:
        for ns in self.names:
            # A namespace lives on while any process runs in it: end those first.
            with contextlib.suppress(subprocess.CalledProcessError):
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True, check=True).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(subprocess.CalledProcessError):
                _run("ip", "netns", "del", ns)
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "link", "del", self.bridge)
        if self in _live:
            _live.remove(self)

    def _iptables(self, host: int, *rule: str) -> None:
        _run("ip", "netns", "exec", self.names[host], "iptables", "-w", *rule)

    def cut(self, a: int, b: int, *, one_way: bool = False) -> None:
        self._iptables(b, "-A", "INPUT", "-s", self.ips[a], "-j", "DROP")
        if not one_way:
            self._iptables(a, "-A", "INPUT", "-s", self.ips[b], "-j", "DROP")

    def isolate(self, a: int) -> None:
        for b in range(self.n):
            if b != a:
                self.cut(a, b)

    def loss(self, probability: float) -> None:
        for host in range(self.n):
            self._iptables(host, "-A", "INPUT", "-p", "udp", "--dport", str(self.peer_port),
                           "-m", "statistic", "--mode", "random", "--probability",
                           str(probability), "-j", "DROP")

    def slow(self, a: int, rate: str = "20mbit") -> None:
        limit = ["tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"]
        _run("tc", "qdisc", "replace", "dev", self._veth(a), "root", *limit)
        _run("ip", "netns", "exec", self.names[a], "tc", "qdisc", "replace", "dev", "eth0",
             "root", *limit)
        self._slowed.add(a)

    def _veth(self, a: int) -> str:
        return f"gs{self.k}v{a}"

    def heal(self) -> None:
        for host in range(self.n):
            self._iptables(host, "-F", "INPUT")
        for a in sorted(self._slowed):
            for args in (("tc", "qdisc", "del", "dev", self._veth(a), "root"),
                         ("ip", "netns", "exec", self.names[a], "tc", "qdisc", "del", "dev",
                          "eth0", "root")):
                with contextlib.suppress(subprocess.CalledProcessError):
                    _run(*args)
        self._slowed.clear()
