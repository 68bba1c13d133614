"""Prometheus metrics of the sidecar, read at scrape time: findings, the engine's load and
progress, canaries, and the group's reachability matrix."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from supervisor.findings import POD_FAULT_CLASSES
from supervisor.metrics import P, build_info, finding_families, maybe
from supervisor.sidecar.role import Sidecar


class SidecarCollector:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.sidecar
        ident = s.identity
        now = s.clock.monotonic()
        yield build_info("sidecar")
        yield from finding_families(s.book, sorted(POD_FAULT_CLASSES), "on this pod")
        ready = GaugeMetricFamily(f"{P}sidecar_ready", "1 while this pod should receive "
                                  "traffic (engine serving, group reachable)",
                                  labels=["group", "rank"])
        ready.add_metric([ident.group, str(ident.rank)], 1 if all(s.readiness().values())
                         else 0)
        yield ready
        if s.engine is not None:
            load = s.engine_detector.last_load
            running = GaugeMetricFamily(f"{P}engine_requests_running",
                                        "Requests the engine says are running")
            waiting = GaugeMetricFamily(f"{P}engine_requests_waiting",
                                        "Requests the engine says are waiting")
            since = GaugeMetricFamily(f"{P}engine_progress_age_seconds",
                                      "Seconds since a progress metric of the engine moved")
            if load is not None:
                running.add_metric([], load.running)
                waiting.add_metric([], load.waiting)
            last = s.engine_detector.last_progress
            maybe(since, [], None if last is None else now - last)
            yield from (running, waiting, since)
            canary = CounterMetricFamily(f"{P}engine_canaries", "Canary completions sent "
                                         "while the engine was idle, by outcome",
                                         labels=["outcome"])
            for outcome, n in sorted(s.canaries.items()):
                canary.add_metric([outcome], n)
            yield canary
        if ident.size > 1:
            reach = GaugeMetricFamily(f"{P}peer_reachable", "1 when member from_rank hears "
                                      "member to_rank (this member's view of the group)",
                                      labels=["group", "from_rank", "to_rank"])
            for a, row in enumerate(s.peers.matrix(now)):
                for b, heard in enumerate(row):
                    if a != b and heard is not None:
                        reach.add_metric([ident.group, str(a), str(b)], 1 if heard else 0)
            yield reach
            phi = GaugeMetricFamily(f"{P}peer_phi", "Accrual failure detector's phi for "
                                    "each peer (suspected at sidecar.phi_threshold)",
                                    labels=["group", "peer_rank"])
            for rank in sorted(s.peers.peers):
                phi.add_metric([ident.group, str(rank)], s.peers.phi(rank, now))
            yield phi
            yield GaugeMetricFamily(
                f"{P}sidecar_local_health", "This sidecar's local health score: late wakes "
                "lately (0 = on time; each point slows its judging of peers)",
                value=s.peers.local_health)
            yield CounterMetricFamily(
                f"{P}sidecar_pauses", "Times this sidecar woke late enough to have missed "
                "heartbeats (CPU starvation, throttling, a stop)", value=s.peers.pauses)
            yield CounterMetricFamily(
                f"{P}sidecar_paused_seconds", "Time this sidecar was not running when it "
                "meant to (not counted as any peer's silence)", value=s.peers.paused_seconds)
            messages = CounterMetricFamily(f"{P}peer_messages", "Group protocol datagrams, "
                                           "by kind", labels=["kind"])
            for kind, n in sorted(s.membership.counts.items()):
                messages.add_metric([kind], n)
            yield messages
        if s.collective is not None:
            c = s.collective
            checks = CounterMetricFamily(f"{P}collective_checks", "All-reduce checks by kind "
                                         "and assessment (leader) or participation (member)",
                                         labels=["result"])
            for result, n in sorted(c.counts.items()):
                checks.add_metric([result], n)
            yield checks
            yield CounterMetricFamily(f"{P}collective_check_seconds", "Time spent running "
                                      "all-reduce checks (their duty cycle is its rate)",
                                      value=c.busy_seconds)
            busbw = GaugeMetricFamily(f"{P}collective_busbw_gbps", "Bus bandwidth of the "
                                      "last full check, by message size",
                                      labels=["size_bytes"])
            base = GaugeMetricFamily(f"{P}collective_baseline_busbw_gbps", "Baseline bus "
                                     "bandwidth (configured or learned)", labels=["size_bytes"])
            last_check: dict[str, Any] = c.last or {}
            if last_check.get("kind") == "full":
                for size, value in (last_check.get("busbw") or {}).items():
                    busbw.add_metric([str(size)], value)
            for size in s.settings.collective.sizes_bytes:
                maybe(base, [str(size)], c.judge.baseline(size))
            yield busbw
            yield base
