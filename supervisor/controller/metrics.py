"""Prometheus metrics of the controller, read at scrape time: leadership, guards,
reports, token reviews, actions, capacity per model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from supervisor.metrics import P, build_info

if TYPE_CHECKING:
    from supervisor.controller.role import Controller


class ControllerCollector:
    """Controller state at scrape time: leadership, guards, reports, actions, capacity."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self.c
        yield build_info("controller")

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, value=value)

        yield gauge("controller_leader", "1 while this replica holds the Lease and may act",
                    1 if c.may_act() else 0)
        yield gauge("controller_suspect", "1 while the quorum guard stops this leader acting",
                    1 if c.suspect else 0)
        yield gauge("policy_breaker_open", "1 while the circuit breaker stops all actions",
                    1 if c.engine.breaker_open else 0)
        yield gauge("policy_reload_failed", "1 while the policy file on disk is invalid "
                    "(the last good policy stays in force)", 1 if c.policy_error else 0)
        yield gauge("incidents_open", "Open incidents", len(c.engine.incidents()))
        yield gauge("nodes_reporting", "Nodes whose agent has reported",
                    sum(1 for n in c.model.nodes.values() if n.last_report is not None))
        yield gauge("nodes_silent", "Nodes whose agent stopped reporting",
                    len(c.model.silent_nodes()))
        # Sparse on purpose: a series per silent node, not per node, so a 16k-node fleet
        # costs nothing here until agents go quiet (the alert fires on presence).
        silent = GaugeMetricFamily(f"{P}node_silent", "1 for each node whose agent stopped "
                                   "reporting (absent while it reports)", labels=["node"])
        for name in sorted(c.model.silent_nodes()):
            silent.add_metric([name], 1)
        yield silent
        degraded = GaugeMetricFamily(f"{P}model_degraded", "1 while a model's traffic is on "
                                     "its fallback model (degrade mode), for every model the "
                                     "policy can degrade", labels=["model"])
        for model, on in sorted(c.engine.degrade_states().items()):
            degraded.add_metric([model], 1 if on else 0)
        yield degraded
        blocked = GaugeMetricFamily(f"{P}degrade_blocked", "1 while a model's degrade or "
                                    "restore is held back because the side its traffic would "
                                    "move to has no ready endpoint (/status says which), for "
                                    "every model the policy can degrade", labels=["model"])
        for model in sorted(c.engine.degrade_states()):
            blocked.add_metric([model], 1 if model in c.executor.blocked else 0)
        yield blocked
        loops = GaugeMetricFamily(f"{P}workload_crash_loops", "Groups of a model whose "
                                  "application-class XIDs followed them to another node: the "
                                  "workload crash-loops, no GPU is blamed", labels=["model"])
        per_model = {g.model: 0 for g in c.model.view().groups.values()}
        for group in c.model.crash_loops:
            model = c.model_of_group(group)
            per_model[model] = per_model.get(model, 0) + 1
        for model, n in sorted(per_model.items()):
            loops.add_metric([model], n)
        yield loops
        reports = CounterMetricFamily(f"{P}reports", "Reports received, by outcome",
                                      labels=["outcome"])
        for outcome in ("accepted", "unauthenticated", "forbidden", "unbound",
                        "forbidden_finding", "unknown_sender", "malformed", "invalid",
                        "too_large", "bad_content_type", "auth_unavailable", "throttled",
                        "stale", "skewed"):
            reports.add_metric([outcome], c.ingest.outcomes.get(outcome, 0))
        yield reports
        yield CounterMetricFamily(f"{P}reports_held", "Accepted reports without this "
                                  "controller's epoch (made before it started, or by a "
                                  "reporter that has not heard it yet): their content is "
                                  "held, not acted on", value=c.ingest.held)
        refused = CounterMetricFamily(f"{P}report_findings_refused", "Reports refused for "
                                      "claiming more than their sender may: a fault class "
                                      "its role does not observe, or a subject that is not "
                                      "its own", labels=["route", "field"])
        for route in ("node", "pod"):
            for field in ("fault_class", "subject"):
                refused.add_metric([route, field], c.ingest.refused_findings.get(
                    (route, field), 0))
        yield refused
        yield CounterMetricFamily(f"{P}report_ticks", "Accepted reports that were ticks (a "
                                  "stream's \"my last report still holds\")",
                                  value=c.ingest.ticks)
        yield gauge("report_streams", "Report streams open (one per reporter and replica)",
                    len(c.ingest.streams))
        reviews = CounterMetricFamily(f"{P}token_reviews", "TokenReviews of report tokens "
                                      "not in the cache, by outcome", labels=["outcome"])
        reviews.add_metric(["reviewed"], c.tokens.reviews)
        reviews.add_metric(["not_plausible"], c.tokens.prefiltered)
        reviews.add_metric(["forged"], c.tokens.forged)
        reviews.add_metric(["throttled"], c.tokens.throttled)
        reviews.add_metric(["source_throttled"], c.tokens.source_throttled)
        yield reviews
        yield gauge("token_reviews_waiting", "TokenReviews sent and not answered yet",
                    c.tokens.review_waiting)
        yield gauge("issuer_keys", "Public keys of the cluster's ServiceAccount issuer "
                    "known (0: report tokens are checked by TokenReview only)",
                    len(c.keys.status()["keys"]))
        actions = CounterMetricFamily(f"{P}actions", "Actions carried out, by outcome",
                                      labels=["action", "outcome"])
        for (action, outcome), n in sorted(c.executor.outcomes.items()):
            actions.add_metric([action, outcome], n)
        yield actions
        view = c.model.view()
        healthy = GaugeMetricFamily(f"{P}model_healthy_groups",
                                    "Pipeline groups of a model that can serve now",
                                    labels=["model"])
        total = GaugeMetricFamily(f"{P}model_groups", "Pipeline groups of a model",
                                  labels=["model"])
        counts: dict[str, list[int]] = {}
        for g in view.groups.values():
            bucket = counts.setdefault(g.model, [0, 0])
            bucket[0] += 1 if g.healthy else 0
            bucket[1] += 1
        for model, (ok, n) in sorted(counts.items()):
            healthy.add_metric([model], ok)
            total.add_metric([model], n)
        yield healthy
        yield total
        lat = SummaryMetricFamily(f"{P}decision_latency_seconds",
                                  "Report received → first API request of the action",
                                  count_value=len(c.executor.latencies),
                                  sum_value=sum(c.executor.latencies))
        yield lat
        yield from self._self_watch()

    def _self_watch(self) -> Iterator[Metric]:
        """The controller's own lag (``selfwatch``)."""
        w = self.c.selfwatch
        yield GaugeMetricFamily(P + "controller_behind", "1 while the controller lags (its "
                                "event loop, a watch, the reports it decides on, or its token "
                                "reviews; /status says which)", value=1 if w.behind() else 0)
        loop = HistogramMetricFamily(P + "controller_loop_lag_seconds", "How late a timer "
                                     "of the controller's event loop fires (starvation)")
        w.loop_lag.add_to(loop, [])
        yield loop
        watch = HistogramMetricFamily(P + "controller_watch_lag_seconds", "Age of an object's "
                                      "latest change when its watch event arrives (whole "
                                      "seconds)", labels=["resource"])
        for resource, buckets in sorted(w.watch_lag.items()):
            buckets.add_to(watch, [resource])
        yield watch
        age = HistogramMetricFamily(P + "controller_report_age_seconds", "Age of the newest "
                                    "report of each node an action was about, when it was "
                                    "decided")
        w.report_age.add_to(age, [])
        yield age
        act = HistogramMetricFamily(P + "finding_to_action_seconds", "The report that first "
                                    "carried a fault → the action's first answered write")
        w.finding_to_action.add_to(act, [])
        yield act
