"""The controller: reports and watches in, policy decisions out, actions on the cluster.

    agents ──POST /v1/reports/node──► Ingest (TokenReview) ─┐
    Node watch, Pod watch (LWS + generic kinds) ─────────────┼─► HealthModel
                                                             │    signals(), view()
                          decision loop (leader only) ◄──────┘
                 PolicyEngine.evaluate ─► ActionExecutor ─► Kubernetes API
                          ▲        confirm                 │ (every write fenced)
                          └──── StateStore (ConfigMap) ◄───┘ snapshot on change

Every replica ingests, watches and keeps its model warm; only the Lease holder evaluates
and acts. On taking the Lease a replica first loads the persisted incident state and
action intents, so it continues ladders where its predecessor stopped and replays a
half-done restart with the predecessor's UID preconditions instead of repeating it.

A leader that suspects itself does not act (the quorum guard): when its watches are not
synced, or when most of the agents that were reporting go silent at the same moment — far
likelier a network problem on our side than half the fleet failing together.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from policies.engine import PolicyEngine
from policies.model import Decision
from policies.schema import PolicyError, default_policy, load_policy_file
from supervisor import __version__
from supervisor.config import Settings
from supervisor.controller.actions import ActionExecutor
from supervisor.controller.auth import IssuerKeys, TokenCache
from supervisor.controller.election import LeaseElector
from supervisor.controller.ingest import Ingest, NodeReport
from supervisor.controller.model import LWS_NAME, HealthModel
from supervisor.controller.selfwatch import SelfWatch
from supervisor.controller.senders import Senders
from supervisor.controller.store import StateStore
from supervisor.controller.topology import Topology
from supervisor.errors import Fenced, KubeError, KubeTemporaryError
from supervisor.kube import KubeClient
from supervisor.runtime.clock import Clock
from supervisor.runtime.tasks import TaskGroup

log = structlog.get_logger(__name__)

LIST_PAGE = 500  # objects per page of a watch's (re)list
MIN_EVALUATION_GAP = 0.02  # seconds between two policy evaluations at most
HEAP_SWEEP_SECONDS = 600.0  # a full garbage collection over frozen objects, when quiet
INTENT_RETENTION_SECONDS = 86400.0


class Reflector:
    """List, then watch from the list's resourceVersion; relist on 410 or after errors."""

    def __init__(self, kube: KubeClient, path: str, selector: str,
                 upsert: Callable[[dict[str, Any]], None],
                 delete: Callable[[dict[str, Any]], None], *, optional: bool = False,
                 watched: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self._kube = kube
        self._watched = watched  # told of every change an event brings (its lag is kept)
        # optional: the resource may not exist in this cluster (no LWS CRD installed); a 404
        # then means "none of them", not an outage that should stop the leader acting.
        self.optional = optional
        self.path = path
        self.selector = selector
        self._upsert = upsert
        self._delete = delete
        self._known: dict[str, dict[str, Any]] = {}  # uid → identity stub of each object
        self.synced = False
        self.errors = 0

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                # Listed in pages: a whole fleet's Nodes in one answer is hundreds of MB as
                # Python objects at once, and the process keeps that high-water mark.
                query = {"labelSelector": self.selector} if self.selector else {}
                query["limit"] = str(LIST_PAGE)
                seen: set[str] = set()
                rv = ""
                while True:
                    page = await self._kube.request("GET", self.path, query=query)
                    for obj in page.get("items", []):
                        uid = obj["metadata"]["uid"]
                        seen.add(uid)
                        self._upsert(obj)
                        self._known[uid] = _stub(obj)
                    rv = page["metadata"]["resourceVersion"]
                    more = page["metadata"].get("continue")
                    del page
                    if not more:
                        break
                    query["continue"] = more
                for uid, stub in list(self._known.items()):
                    if uid not in seen:
                        del self._known[uid]
                        self._delete(stub)
                self.synced = True
                backoff = 0.5
                while True:
                    async for kind, obj in self._kube.watch(self.path, rv,
                                                            selector=self.selector):
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if kind == "BOOKMARK":
                            continue
                        uid = obj["metadata"]["uid"]
                        if kind == "DELETED":
                            self._known.pop(uid, None)
                            self._delete(obj)
                        else:
                            self._known[uid] = _stub(obj)
                            self._upsert(obj)
                            if self._watched is not None:
                                self._watched(self.resource, obj)
            except KubeError as exc:
                if self.optional and exc.status == 404:
                    for obj in self._known.values():
                        self._delete(obj)
                    self._known = {}
                    self.synced = True
                    await asyncio.sleep(60.0)
                    continue
                self.errors += 1
                gone = isinstance(exc, KubeTemporaryError) and exc.status == 410
                if not gone:
                    self.synced = False
                    log.warning("watch failed", path=self.path, error=str(exc))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)


    @property
    def resource(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _stub(obj: dict[str, Any]) -> dict[str, Any]:
    """What a delete needs of an object: its identity. Keeping whole objects (a GPU Node is
    ~20 KB of JSON, several times that as Python objects) cost ~100 KiB per node."""
    meta = obj["metadata"]
    return {"metadata": {k: meta[k] for k in ("name", "namespace", "uid") if k in meta}}


class Controller:
    def __init__(self, settings: Settings, kube: KubeClient, clock: Clock,
                 topology: Topology) -> None:
        c = settings.controller
        self.settings = settings
        self.kube = kube
        self.clock = clock
        self.identity = c.identity or settings.node_name
        self.model = HealthModel(clock, silence_seconds=c.silence_seconds, kinds=topology.kinds,
                                 quarantine_taint="gpu-supervisor.io/quarantine",
                                 attribution_window=c.crash_loop_window_seconds)
        self.elector = LeaseElector(kube, c.namespace, c.lease_name, self.identity, clock,
                                    lease_duration=c.lease_duration_seconds,
                                    renew_deadline=c.renew_deadline_seconds,
                                    retry_period=c.retry_period_seconds)
        self.store = StateStore(kube, c.namespace, c.state_configmap)
        self.policy_path = c.policy_file
        self.engine = PolicyEngine(self._load_policy(), clock.monotonic, clock.wall)
        self._policy_mtime = self._mtime()
        self.selfwatch = SelfWatch(clock, lambda: self.tokens.review_waiting)
        self.executor = ActionExecutor(kube, self.model, clock, fence=self,
                                       intents={}, save=self.persist,
                                       degrade_targets=topology.degrade,
                                       observe_latency=self.selfwatch.acted)
        self.keys = IssuerKeys(kube, clock)
        self.tokens = TokenCache(kube, clock, c.token_cache_seconds, c.token_audiences,
                                 c.token_reviews_per_second, keys=self.keys,
                                 source_failures_per_second=c.source_failures_per_second,
                                 source_reviews_per_second=c.source_reviews_per_second)
        self.senders = Senders(self.model, agents_watched=bool(c.agent_pod_selector))
        self.ingest = Ingest(self.tokens, c.allowed_reporters, c.report_max_bytes,
                             self._accept, clock, directory=self.senders,
                             accept_pod=self.model.accept_pod_report,
                             allowed_pods=c.allowed_pod_reporters,
                             max_skew=c.report_max_skew_seconds,
                             read_timeout=c.report_read_timeout_seconds,
                             stream_seconds=c.report_stream_seconds)
        watched = self.selfwatch.watch_event
        self.reflectors = [
            Reflector(kube, "/api/v1/nodes", "", self.model.upsert_node, self.model.delete_node,
                      watched=watched),
            Reflector(kube, "/api/v1/pods", LWS_NAME, self.model.upsert_pod,
                      self._pod_deleted, watched=watched),
            Reflector(kube, "/apis/leaderworkerset.x-k8s.io/v1/leaderworkersets", "",
                      self.model.upsert_lws, self.model.delete_lws, optional=True,
                      watched=watched),
            *(Reflector(kube, "/api/v1/pods", k.selector, self.model.upsert_pod,
                        self._pod_deleted, watched=watched) for k in topology.kinds),
        ]
        if c.agent_pod_selector:
            self.reflectors.append(Reflector(
                kube, f"/api/v1/namespaces/{c.namespace}/pods", c.agent_pod_selector,
                self.senders.upsert_agent, self._agent_deleted, watched=watched))
        self.state_loaded = False
        self.suspect: str | None = None
        self.policy_error: str | None = None
        self._inflight: dict[tuple[str, int, str, str], asyncio.Task[None]] = {}
        self._sem = asyncio.Semaphore(c.max_concurrent_actions)
        self._persist_lock = asyncio.Lock()
        self._persist_due = asyncio.Event()
        self.heap_sweeps = 0
        self.evaluation_seconds: list[float] = []  # the last thousand policy evaluations
        self._saved: str | None = None  # the state as last written, to skip unchanged saves
        self._refused: set[tuple[str, str, str]] = set()
        self.elector.listeners.append(self._on_leadership)
        self.evaluations = 0
        self.refusals: list[dict[str, str]] = []
        self._admitting: set[str] = set()  # pod UIDs whose gate we set (or are setting)
        self._admit_tasks: set[asyncio.Task[None]] = set()

    # --- policy ----------------------------------------------------------------------------

    def _mtime(self) -> float | None:
        try:
            return Path(self.policy_path).stat().st_mtime if self.policy_path else None
        except OSError:
            return None

    def _load_policy(self) -> Any:
        return load_policy_file(Path(self.policy_path)) if self.policy_path else default_policy()

    async def _policy_watch(self) -> None:
        """Hot reload: a changed file is validated first; a bad one keeps the last good."""
        while True:
            await asyncio.sleep(self.settings.controller.policy_reload_seconds)
            mtime = self._mtime()
            if mtime == self._policy_mtime:
                continue
            self._policy_mtime = mtime
            try:
                policy = self._load_policy()
            except (PolicyError, OSError) as exc:
                self.policy_error = str(exc)
                log.error("policy reload rejected; keeping the last good policy",
                          file=self.policy_path, error=str(exc))
                continue
            self.policy_error = None
            self.engine.replace_policy(policy)
            log.info("policy reloaded", file=self.policy_path)
            self.model.changed.set()

    # --- leadership and state --------------------------------------------------------------

    def remaining(self) -> float:
        """The fence of every write (``supervisor.kube.Fence``): how long this replica may
        still act — the time left on its Lease, once it has loaded the incident state."""
        return self.elector.remaining() if self.state_loaded else 0.0

    def may_act(self) -> bool:
        return self.remaining() > 0

    def _on_leadership(self, leading: bool) -> None:
        if not leading:
            self.state_loaded = False
        self.model.changed.set()  # the decision loop takes over (or stands down) at once

    async def _take_over(self) -> None:
        try:
            state = await self.store.load()
        except KubeError as exc:
            log.error("cannot load incident state; not acting", error=str(exc))
            return
        if state.get("engine"):  # a fresh cluster has no state yet
            try:
                self.engine.restore(state["engine"])
            except ValueError as exc:
                # Acting without knowing what was already done could repeat a restart:
                # stay hands-off and say so, until a person repairs or clears the state.
                self.policy_error = f"stored incident state unreadable: {exc}"
                log.error("cannot restore incident state; not acting", error=str(exc))
                return
        self.executor.intents = state.get("intents") or {}
        self.state_loaded = True
        log.info("took over", incidents=len(self.engine.incidents()),
                 intents=len(self.executor.intents))
        self.model.changed.set()

    async def _persister(self) -> None:
        """Saves the incident state when it changed: at once after a confirmation, and
        every ``state_save_seconds`` otherwise — an incident opening, or a ``for:`` turning
        into an open incident, is state a successor must not start again from scratch.
        The snapshot holds wall-clock times, so an unchanged state is the same JSON and
        costs no write. Confirmations are saved in batches: one ConfigMap write covers
        every action confirmed since the last one. Safe because every action is idempotent
        or carries a synchronous write-ahead intent (restart), so a successor re-deciding a
        confirmed but unsaved step does no harm."""
        period = self.settings.controller.state_save_seconds
        while True:
            try:
                await asyncio.wait_for(self._persist_due.wait(), timeout=period)
            except TimeoutError:
                pass
            self._persist_due.clear()
            if not self.may_act():
                continue
            # In a burst, the writes that take groups out of traffic go first; the state
            # (one ConfigMap of every incident, ~100 KB at 173 of them) is saved after.
            await self.executor.first_writes_drained()
            try:
                await self.persist(only_if_changed=True)
            except (Fenced, KubeError) as exc:
                log.error("incident state not saved", error=str(exc))

    async def persist(self, *, only_if_changed: bool = False) -> None:
        """Save now (the write-ahead path before a restart uses this directly)."""
        async with self._persist_lock:
            if not self.elector.is_leader():
                raise Fenced("not the leader")
            # A restart's intent matters only until a successor could replay it; a day
            # later it is history, and the ConfigMap must stay far below its 1 MiB cap.
            horizon = self.clock.wall() - INTENT_RETENTION_SECONDS
            for key in [k for k, v in self.executor.intents.items()
                        if v.get("recorded_at", horizon) < horizon]:
                del self.executor.intents[key]
            state = {"engine": self.engine.snapshot(), "intents": self.executor.intents}
            text = json.dumps(state, sort_keys=True)
            if only_if_changed and text == self._saved:
                return
            try:
                await self.store.save(state, fence=self)
            except Fenced:
                self.state_loaded = False
                raise
            self._saved = text

    # --- decisions -------------------------------------------------------------------------

    def _accept(self, report: NodeReport, received: float) -> None:
        self.model.accept_report(report, received)

    def model_of_group(self, group: str) -> str:
        info = self.model.groups.get(group)
        return self.model.model_of(info) if info is not None else ""

    def _pod_deleted(self, obj: dict[str, Any]) -> None:
        """A group member is gone: out of the model, and its sidecar's token (valid for a
        while yet) speaks for nobody."""
        self.model.delete_pod(obj)
        self.ingest.sender_gone(obj.get("metadata", {}).get("uid", ""))

    def _agent_deleted(self, obj: dict[str, Any]) -> None:
        self.senders.delete_agent(obj)
        self.ingest.sender_gone(obj.get("metadata", {}).get("uid", ""))

    def quorum_problem(self) -> str | None:
        if not all(r.synced for r in self.reflectors):
            return "watches not synced"
        reporting = [n for n in self.model.nodes.values() if n.last_report is not None]
        c = self.settings.controller
        if len(reporting) >= c.quorum_min_nodes:
            silent = len(self.model.silent_nodes())
            if silent / len(reporting) > c.quorum_silent_fraction:
                return f"{silent} of {len(reporting)} agents went silent: suspecting ourselves"
        return None

    async def _decide_loop(self) -> None:
        interval = self.settings.controller.evaluation_interval_seconds
        last = 0.0
        while True:
            try:
                await asyncio.wait_for(self.model.changed.wait(), timeout=interval)
            except TimeoutError:
                pass
            periodic = not self.model.changed.is_set()
            # A burst of reports arrives over a second; one evaluation per ~20 ms covers all
            # of them at a fraction of the CPU of one evaluation per report.
            pause = MIN_EVALUATION_GAP - (self.clock.monotonic() - last)
            if pause > 0:
                await asyncio.sleep(pause)
            last = self.clock.monotonic()
            self.model.changed.clear()
            if self.elector.is_leader() and not self.state_loaded:
                await self._take_over()
            if not self.may_act():
                continue
            signals = self.model.signals()
            if periodic and not signals and not self.refusals and self.engine.idle() \
                    and not self.engine.breaker_open:
                # The periodic pass serves timers; a healthy fleet has none running. Skipping
                # it saves two walks over every node and group each second for nothing (the
                # quorum guard's count is only needed before acting).
                self._admit_new_pods()
                continue
            self.suspect = self.quorum_problem()
            if self.suspect is not None:
                continue
            if self.engine.breaker_open:
                await self._maybe_reset_breaker()
            began = time.perf_counter()
            evaluation = self.engine.evaluate(signals, self.model.view())
            self.evaluations += 1
            # The loop does nothing else meanwhile: its cost delays every report and write.
            self.evaluation_seconds.append(time.perf_counter() - began)
            del self.evaluation_seconds[:-1000]
            refused_now = set()
            for refusal in evaluation.refusals:
                seen = (refusal.decision.incident, str(refusal.decision.action), refusal.why)
                refused_now.add(seen)
                if seen not in self._refused:
                    log.warning("action refused", why=refusal.why, detail=refusal.detail,
                                action=str(refusal.decision.action),
                                target=refusal.decision.target,
                                incident=refusal.decision.incident)
            self._refused = refused_now
            self._admit_new_pods()
            self.refusals = [{"incident": r.decision.incident, "action": str(r.decision.action),
                              "target": r.decision.target, "why": r.why, "detail": r.detail}
                             for r in evaluation.refusals]
            for decision in evaluation.decisions:
                key = (decision.incident, decision.step, str(decision.action), decision.target)
                if key in self._inflight:
                    continue
                self._report_ages(decision.target)
                self._inflight[key] = asyncio.create_task(self._carry_out(key, decision),
                                                          name=f"action {key}")

    def _report_ages(self, target: str) -> None:
        """How old the newest report of each node behind ``target`` (a group or a node)
        was when the decision about it was taken."""
        group = self.model.groups.get(target)
        now = self.clock.monotonic()
        for name in group.nodes if group is not None else (target,):
            info = self.model.nodes.get(name)
            if info is not None and info.last_report is not None:
                self.selfwatch.decided_on(now - info.last_report)

    def _admit_new_pods(self) -> None:
        """Give every pod without our readiness-gate condition one: the group's state.

        Not in dry-run: dry-run writes nothing at all. Pods that list our gate then stay
        unready until the policy leaves dry-run — which is why the README says to add the
        gate to pod templates only once the controller acts."""
        ungated = self.model.ungated
        self._admitting &= ungated.keys()  # admitted (or gone): the set stays bounded
        dry_run = self.engine.policy.dry_run
        for uid, key in list(ungated.items()):
            group = self.model.groups.get(key)
            pod = group.pods.get(uid) if group is not None else None
            if group is None or pod is None or uid in self._admitting:
                continue
            failed_over = any(p.gate == "False" for p in group.pods.values())
            self._admitting.add(uid)
            if dry_run:
                log.info("dry-run: would admit pod", pod=f"{pod.namespace}/{pod.name}",
                         group=key, serving=not failed_over)
                self.executor.outcomes[("admit", "dry_run")] += 1
                continue
            task = asyncio.create_task(self._admit(key, pod, not failed_over),
                                       name=f"admit {pod.namespace}/{pod.name}")
            self._admit_tasks.add(task)
            task.add_done_callback(self._admit_tasks.discard)

    async def _heap_keeper(self) -> None:
        """Keep the garbage collector's full passes short.

        A full pass scans every tracked object: at 4,096 nodes the model, the watches'
        state and a report stream per agent are ~10^6 objects and a pass of hundreds of ms,
        during which nothing else runs — a tail on every decision it falls into. Objects
        that survived a full pass (or the first lists of the watches) live long, so they
        are frozen out of the next passes, which then scan only what came since.
        Frozen objects are freed by reference counting as usual, but cycles among them
        (a closed connection leaves a few) only when unfrozen: every ``HEAP_SWEEP_SECONDS``,
        at a quiet moment (nothing open, nothing changed), one full pass over everything
        reclaims them."""
        full = gc.get_stats()[2]["collections"]
        swept = self.clock.monotonic()
        synced = False
        while True:
            await asyncio.sleep(1.0)
            if not synced:
                synced = all(r.synced for r in self.reflectors)
                if synced:
                    gc.freeze()  # what the first lists built
                continue
            passes = gc.get_stats()[2]["collections"]
            if passes != full:
                gc.freeze()
            quiet = self.engine.idle() and not self.model.changed.is_set() \
                and not self._inflight
            if quiet and self.clock.monotonic() - swept >= HEAP_SWEEP_SECONDS:
                gc.unfreeze()
                gc.collect()
                gc.freeze()
                swept = self.clock.monotonic()
                self.heap_sweeps += 1
            full = gc.get_stats()[2]["collections"]

    async def _admit(self, key: str, pod: Any, serving: bool) -> None:
        try:
            await self.executor.admit(key, pod, serving)
        except (Fenced, KubeError) as exc:
            log.warning("readiness gate not set", pod=f"{pod.namespace}/{pod.name}",
                        error=str(exc))
            self._admitting.discard(pod.uid)  # try again on a later pass

    async def _maybe_reset_breaker(self) -> None:
        try:
            if await self.store.take_breaker_reset():
                self.engine.reset_breaker()
                log.warning("circuit breaker reset by annotation")
                await self.persist()
        except (Fenced, KubeError) as exc:
            log.warning("breaker reset check failed", error=str(exc))

    async def _carry_out(self, key: tuple[str, int, str, str], decision: Decision) -> None:
        try:
            async with self._sem:
                try:
                    ok = await self.executor.execute(decision)
                except Exception:  # a bug must not leave the decision in flight forever
                    log.exception("action crashed", action=str(decision.action),
                                  target=decision.target, incident=decision.incident)
                    ok = False
            if not self.elector.is_leader():
                return
            self.engine.confirm(decision, ok)
            self._persist_due.set()
        finally:
            self._inflight.pop(key, None)
            self.model.changed.set()

    # --- running ---------------------------------------------------------------------------

    def start(self, group: TaskGroup) -> None:
        group.start("lease", self.elector.run())
        group.start("issuer-keys", self.keys.run())
        group.start("self-watch", self.selfwatch.run())
        for i, reflector in enumerate(self.reflectors):
            group.start(f"watch-{i}-{reflector.path.rsplit('/', 1)[-1]}", reflector.run())
        group.start("decide", self._decide_loop())
        group.start("heap", self._heap_keeper())
        group.start("persist", self._persister())
        group.start("policy-watch", self._policy_watch())

    async def stop(self) -> None:
        for task in [*self._inflight.values(), *self._admit_tasks]:
            task.cancel()
        await self.keys.close()
        await self.elector.release()

    def ready(self) -> dict[str, bool]:
        return {"watches-synced": all(r.synced for r in self.reflectors)}

    def status(self) -> dict[str, Any]:
        lat = sorted(self.executor.latencies)
        return {
            "role": "controller",
            "version": __version__,
            "identity": self.identity,
            "leader": self.elector.is_leader(),
            "lease_holder": self.elector.holder,
            "state_loaded": self.state_loaded,
            "suspect": self.suspect,
            # Lagging (its event loop, its watches, its evidence or its token reviews):
            # what it decides may rest on stale news. Empty when it keeps up.
            "behind": self.selfwatch.behind(),
            "policy_error": self.policy_error,
            "breaker_open": self.engine.breaker_open,
            "nodes": len(self.model.nodes),
            "nodes_reporting": sum(1 for n in self.model.nodes.values()
                                   if n.report is not None),
            "gpus_reported": sum(n.report.gpus for n in self.model.nodes.values()
                                 if n.report is not None),
            "groups": len(self.model.groups),
            "silent_nodes": len(self.model.silent_nodes()),
            "pods_reporting": len(self.model.pod_reports),
            "reports": dict(self.ingest.outcomes),
            "report_ticks": self.ingest.ticks,
            "report_streams": len(self.ingest.streams),
            "report_epoch": self.ingest.epoch,
            "reports_held": self.ingest.held,
            "refused_findings": {f"{route}/{field}": n for (route, field), n
                                 in sorted(self.ingest.refused_findings.items())},
            "token_reviews": self.tokens.reviews,
            "token_reviews_waiting": self.tokens.review_waiting,
            "tokens_prefiltered": self.tokens.prefiltered,
            "tokens_forged": self.tokens.forged,
            "token_reviews_throttled": self.tokens.throttled,
            "tokens_source_throttled": self.tokens.source_throttled,
            "issuer_keys": self.keys.status(),
            "evaluations": self.evaluations,
            "gc": {"frozen_objects": gc.get_freeze_count(),
                   "full_passes": gc.get_stats()[2]["collections"],
                   "sweeps": self.heap_sweeps},
            "evaluation_ms": {"p50": round(statistics.median(self.evaluation_seconds) * 1000, 2)
                              if self.evaluation_seconds else None,
                              "max": round(max(self.evaluation_seconds) * 1000, 2)
                              if self.evaluation_seconds else None},
            "incidents": self.engine.incidents(),
            "refusals": self.refusals,
            # The controller's own findings: what holds a degrade or restore back.
            "degrade_blocked": [{"model": model, **info} for model, info
                                in sorted(self.executor.blocked.items())],
            # Groups whose application-class XIDs followed them across nodes.
            "workload_crash_loops": [
                {"group": g, "model": self.model_of_group(g), "nodes": sorted(loop.nodes),
                 "xids": sorted(loop.codes)}
                for g, loop in sorted(self.model.crash_loops.items())],
            "actions": {f"{a}/{o}": n for (a, o), n in sorted(self.executor.outcomes.items())},
            "decision_latency_ms": {
                "count": len(lat),
                "p50": round(statistics.median(lat) * 1000, 2) if lat else None,
                "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 2)
                if lat else None,
                "max": round(lat[-1] * 1000, 2) if lat else None,
            },
        }
