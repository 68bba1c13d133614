"""All-reduce checks across a group's members, in their own process group — never the
engine's — through ``torch.distributed``: NCCL on GPUs, gloo where there are none.

This module is a *worker process* (``python -m probes.collective``), one per sidecar, and
the only place in the project that imports ``torch``. It runs in its own process because a
collective that hangs blocks its thread in C++ and cannot be cancelled: the sidecar keeps
its own loops free and, if the worker stops answering, kills it and starts another.

Rendezvous is at the group leader: rank 0's worker hosts a ``TCPStore`` on
``--store``; every worker connects to it. Work comes as *plans*, numbered 1, 2, 3…:
``plan/<k>`` holds ``{"groups": [[ranks], …], "sizes": [bytes, …], "deadline": s}``. Every
member waits for the next plan — skipping any whose deadline passed while it was away (the
others gave up on it; the members' clocks must agree within a fraction of the deadline,
as NTP keeps them) — and if it is in one of its groups, marks itself arrived
(``arr/<k>/<rank>``), builds a gloo (or NCCL) process group for that subgroup over a
prefixed store — the deadline bounds the rendezvous and every collective — runs one
all-reduce per size, and writes its timings (``res/<k>/<rank>``). A member whose collective
times out writes ``alive/<k>/<rank>``: whoever wrote neither result nor alive marker within
the deadline is the one that hung; whoever never arrived never took part at all.

Only the leader is told, on its stdin, to run a plan (``{"op": "run", "plan": {...}}``); it
publishes it, takes part, gathers what every rank wrote and answers on stdout with the raw
outcome (``{"op": "present"}`` asks which ranks' workers have connected). Every worker
reports each plan it took part in (``{"event": "participated"}``).
This module measures and reports; the sidecar decides what the numbers mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import sys
import threading
import time
from typing import Any

GRACE_SECONDS = 0.5  # after the deadline, how long the leader waits for alive markers


def _say(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, rank: int, world: int, store_addr: str, backend: str, node: str,
                 connect_timeout: float) -> None:
        import torch
        import torch.distributed as dist

        self.torch = torch
        self.dist = dist
        self.rank = rank
        self.world = world
        self.node = node
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        self.device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        host, _, port = store_addr.rpartition(":")
        self.store = dist.TCPStore(host, int(port), world, rank == 0,
                                   timeout=datetime.timedelta(seconds=connect_timeout),
                                   wait_for_workers=False)
        self.store.set(f"node/{rank}", node)
        self.next_plan = self._first_plan()

    def _first_plan(self) -> int:
        """A restarted worker joins at the next plan, not at plan 1."""
        if self.store.check(["latest"]):
            return int(self.store.get("latest").decode()) + 1
        return 1

    # --- taking part -----------------------------------------------------------------------

    def take_part(self, k: int, plan: dict[str, Any]) -> dict[str, Any] | None:
        """Run my part of plan ``k``; my timings, or None when I am not in it."""
        mine = next((g for g in plan["groups"] if self.rank in g), None)
        if mine is None:
            return None
        deadline = float(plan["deadline"])
        self.store.set(f"arr/{k}/{self.rank}", str(time.time()))
        dist, torch = self.dist, self.torch
        started = time.monotonic()
        try:
            prefix = dist.PrefixStore(f"pg/{k}/{plan['groups'].index(mine)}", self.store)
            pg = self._process_group(prefix, mine.index(self.rank), len(mine), deadline)
            times = []
            for size in plan["sizes"]:
                data = torch.ones(max(1, int(size) // 4), dtype=torch.float32,
                                  device=self.device)
                t0 = time.monotonic()
                pg.allreduce([data]).wait()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.monotonic() - t0)
        except Exception as exc:  # a timeout or a peer gone: say we are alive, and why
            self.store.set(f"alive/{k}/{self.rank}", json.dumps(
                {"error": str(exc)[:300], "after": time.monotonic() - started}))
            return {"ok": False, "error": str(exc)[:300], "group": mine}
        result = {"ok": True, "times": times, "group": mine}
        self.store.set(f"res/{k}/{self.rank}", json.dumps(result))
        return result

    def _process_group(self, prefix: Any, rank: int, size: int, deadline: float) -> Any:
        """The sub-group's process group, within ``deadline``. Its rendezvous honours the
        timeout only while waiting for the others' addresses: a peer stopped *after*
        publishing its address accepts the TCP connection (the kernel does) and then never
        answers, and gloo waits its own 30 s for that. So the building runs on a thread we
        stop waiting for at the deadline (it ends by itself later)."""
        timeout = datetime.timedelta(seconds=deadline)
        box: dict[str, Any] = {}

        def build() -> None:
            try:
                if self.backend == "nccl":
                    box["pg"] = self.dist.ProcessGroupNCCL(prefix, rank, size, timeout=timeout)
                else:
                    box["pg"] = self.dist.ProcessGroupGloo(prefix, rank, size, timeout)
            except Exception as exc:
                box["error"] = exc

        thread = threading.Thread(target=build, name="pg-rendezvous", daemon=True)
        thread.start()
        thread.join(deadline)
        if "pg" in box:
            return box["pg"]
        if "error" in box:
            raise box["error"]
        raise TimeoutError(f"rendezvous of the process group did not complete within "
                           f"{deadline:g}s")

    def follow(self) -> None:
        """A member's life: wait for each plan, take part, report. If the leader's store
        goes away (the leader restarted) the worker exits, and the sidecar starts a new
        one that connects to the new store."""
        while True:
            key = f"plan/{self.next_plan}"
            try:
                self.store.wait([key], datetime.timedelta(seconds=600))
            except Exception as exc:  # a quiet ten minutes, or the store is gone
                try:
                    self.next_plan = max(self.next_plan, self._first_plan())
                except Exception:
                    _say({"event": "lost", "error": f"rendezvous store gone: {exc}"[:300]})
                    os._exit(3)
                continue
            # Behind (stopped, or slow to start)? Only the newest plan is worth taking part
            # in: the others have given up on the older ones already.
            k = max(self.next_plan, int(self.store.get("latest").decode()))
            self.next_plan = k + 1
            plan = json.loads(self.store.get(f"plan/{k}").decode())
            if time.time() - float(plan.get("published", 0)) > float(plan["deadline"]):
                continue  # its deadline passed while we were away: nobody waits for us
            result = self.take_part(k, plan)
            if result is not None:
                _say({"event": "participated", "plan": k, **result})

    # --- leading ---------------------------------------------------------------------------

    def present(self) -> list[int]:
        """Ranks whose worker has connected to the store."""
        return [r for r in range(self.world) if self.store.check([f"node/{r}"])]

    def lead(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Publish plan k, take part, gather every member's outcome."""
        k = self.next_plan
        self.next_plan += 1
        started = time.monotonic()
        self.store.set(f"plan/{k}", json.dumps({**plan, "published": time.time()}))
        self.store.set("latest", str(k))
        mine = self.take_part(k, plan)
        # If our own part timed out, the others' have too, within a moment: wait that
        # moment for their alive markers, not the whole budget.
        failed_at = time.monotonic() if mine is not None and not mine["ok"] else None
        members = sorted({r for g in plan["groups"] for r in g})
        limit = started + float(plan["deadline"]) * (len(plan["sizes"]) + 1) + GRACE_SECONDS
        results: dict[int, Any] = {}
        while True:
            for r in members:
                if r not in results and self.store.check([f"res/{k}/{r}"]):
                    results[r] = json.loads(self.store.get(f"res/{k}/{r}").decode())
            now = time.monotonic()
            if len(results) == len(members) or now >= limit or (
                    failed_at is not None and now >= failed_at + GRACE_SECONDS):
                break
            time.sleep(0.01)
        alive = {r: json.loads(self.store.get(f"alive/{k}/{r}").decode())
                 for r in members if self.store.check([f"alive/{k}/{r}"])}
        arrived = [r for r in members if self.store.check([f"arr/{k}/{r}"])]
        nodes = {r: self.store.get(f"node/{r}").decode() for r in range(self.world)
                 if self.store.check([f"node/{r}"])}
        return {"event": "outcome", "plan": k, "groups": plan["groups"],
                "sizes": plan["sizes"], "deadline": plan["deadline"],
                "results": {str(r): v for r, v in results.items()},
                "alive": {str(r): v for r, v in alive.items()}, "arrived": arrived,
                "nodes": {str(r): n for r, n in nodes.items()},
                "elapsed": time.monotonic() - started}


def _commands(into: queue.Queue[dict[str, Any] | None]) -> None:
    for line in sys.stdin:
        try:
            into.put(json.loads(line))
        except ValueError:
            continue
    into.put(None)  # the sidecar went away: so do we


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes.collective")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", required=True, help="leader host:port (rank 0 hosts it)")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    parser.add_argument("--node", default=os.environ.get("NODE_NAME", ""))
    parser.add_argument("--connect-timeout", type=float, default=3600.0)
    parser.add_argument("--interface", default="",
                        help="network interface for gloo and NCCL (default: the one the "
                             "host name resolves to)")
    args = parser.parse_args(argv)
    if args.interface:
        # Gloo listens where the host name resolves unless told; in a pod that is the pod
        # IP, but elsewhere (a network namespace, a multi-homed host) it may not be the
        # network the group shares.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", args.interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", args.interface)
    worker = Worker(args.rank, args.world, args.store, args.backend, args.node,
                    args.connect_timeout)
    _say({"event": "ready", "rank": args.rank, "backend": worker.backend})
    commands: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_commands, args=(commands,), daemon=True).start()
    if args.rank != 0:
        threading.Thread(target=worker.follow, daemon=True).start()
    while True:
        command = commands.get()
        if command is None:
            # The sidecar went away. Leave at once: a normal interpreter exit would run
            # torch's teardown, which can block for good on a gloo thread stuck mid-call.
            os._exit(0)
        if command.get("op") == "run" and args.rank == 0:
            _say(worker.lead(command["plan"]))
        elif command.get("op") == "present" and args.rank == 0:
            _say({"event": "present", "ranks": worker.present()})


if __name__ == "__main__":
    sys.exit(main())
