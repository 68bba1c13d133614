"""The controller's health model: group discovery, signals and the healthy-capacity view."""

from __future__ import annotations

from typing import Any

from supervisor.controller.ingest import NodeReport, ReportedFinding, parse_node_report
from supervisor.controller.model import (
    LWS_GROUP,
    LWS_NAME,
    LWS_WORKER,
    GroupKind,
    HealthModel,
    _matches,
)
from supervisor.runtime.clock import ManualClock


def pod(name: str, node: str, labels: dict[str, str], ready: bool = True,
        ns: str = "serving", uid: str = "") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "uid": uid or name, "labels": labels},
            "spec": {"nodeName": node},
            "status": {"conditions": [{"type": "ContainersReady",
                                       "status": "True" if ready else "False"}]}}


def lws_pod(group: int, worker: int, node: str, **kw: Any) -> dict[str, Any]:
    name = f"llama-{group}" if worker == 0 else f"llama-{group}-{worker}"
    return pod(name, node, {LWS_NAME: "llama", LWS_GROUP: str(group),
                            LWS_WORKER: str(worker)}, **kw)


def report(node: str, *classes: str, severity: str = "critical") -> NodeReport:
    return NodeReport(node=node, boot_id="b", sequence=1, sent_at=1000.0, gpus=8, findings=tuple(
        ReportedFinding(fault_class=c, severity=severity, subject_kind="gpu",
                        subject_id=f"GPU-{node}", detail="", reason="", message="",
                        first_seen=990.0, last_seen=1000.0) for c in classes))


class TestGroups:
    def test_lws_pods_form_groups_with_leader(self) -> None:
        """Pods sharing LWS name and group-index form one group; worker 0 is its leader."""
        model = HealthModel(ManualClock(), silence_seconds=30)
        for w, node in enumerate(["n1", "n2", "n3"]):
            model.upsert_pod(lws_pod(0, w, node))
        model.upsert_pod(lws_pod(1, 0, "n4"))
        assert sorted(model.groups) == ["serving/llama/0", "serving/llama/1"]
        group = model.groups["serving/llama/0"]
        leader = group.leader()
        assert leader is not None and leader.name == "llama-0"
        assert group.nodes == ("n1", "n2", "n3")
        assert model.groups_on("n2") == ("serving/llama/0",)

    def test_generic_kind_groups_by_label(self) -> None:
        """A generic kind groups pods matching its selector by the named label."""
        kind = GroupKind("ray", "ray.io/node-type=worker", "ray.io/group", "llama-70b")
        model = HealthModel(ManualClock(), silence_seconds=30, kinds=[kind])
        model.upsert_pod(pod("a", "n1", {"ray.io/node-type": "worker", "ray.io/group": "g"}))
        model.upsert_pod(pod("b", "n2", {"ray.io/node-type": "head", "ray.io/group": "g"}))
        assert list(model.groups) == ["serving/ray/g"]
        assert model.groups["serving/ray/g"].model == "llama-70b"

    def test_deleted_pods_leave_their_group(self) -> None:
        """A deleted member leaves; the last one takes the group with it."""
        model = HealthModel(ManualClock(), silence_seconds=30)
        p = lws_pod(0, 0, "n1")
        model.upsert_pod(p)
        model.delete_pod(p)
        assert model.groups == {} and model.groups_on("n1") == ()

    def test_the_delete_of_a_replaced_node_keeps_its_successor(self) -> None:
        """A Node deleted and registered again under its name: the old object's delete,
        which a relist learns of after the new one's upsert, leaves the new one."""
        model = HealthModel(ManualClock(), silence_seconds=30)
        model.upsert_node({"metadata": {"name": "n1", "uid": "old"}})
        model.upsert_node({"metadata": {"name": "n1", "uid": "new"}})
        model.delete_node({"metadata": {"name": "n1", "uid": "old"}})
        assert "n1" in model.nodes
        model.delete_node({"metadata": {"name": "n1", "uid": "new"}})
        assert "n1" not in model.nodes

    def test_selector_semantics(self) -> None:
        """Equality, inequality, existence and non-existence terms, as Kubernetes reads them."""
        labels = {"a": "1", "b": "2"}
        assert _matches(labels, "a=1,b")
        assert not _matches(labels, "a!=1")
        assert not _matches(labels, "!b")
        assert not _matches(labels, "c")


class TestView:
    def test_group_is_unhealthy_when_a_member_node_reports_a_fault(self) -> None:
        """A critical finding on one member's node makes the whole group unhealthy."""
        clock = ManualClock()
        model = HealthModel(clock, silence_seconds=30)
        for w, node in enumerate(["n1", "n2"]):
            model.upsert_pod(lws_pod(0, w, node))
        assert model.view().groups["serving/llama/0"].healthy
        model.accept_report(report("n2", "gpu_lost"), clock.monotonic())
        assert not model.view().groups["serving/llama/0"].healthy
        (signal,) = model.signals()
        assert (signal.fault_class, signal.node, signal.groups, signal.node_local) == (
            "gpu_lost", "n2", ("serving/llama/0",), True)
        assert signal.since == clock.monotonic() - 10  # the age the reporter stated

    def test_incomplete_lws_group_is_unhealthy(self) -> None:
        """An LWS of size 3 with two pods is not serving capacity; its label names the model."""
        model = HealthModel(ManualClock(), silence_seconds=30)
        model.upsert_lws({"metadata": {"name": "llama", "namespace": "serving",
                                       "labels": {"gpu-supervisor.io/model": "llama-70b"}},
                          "spec": {"leaderWorkerTemplate": {"size": 3}}})
        for w, node in enumerate(["n1", "n2"]):
            model.upsert_pod(lws_pod(0, w, node))
        view = model.view().groups["serving/llama/0"]
        assert (view.healthy, view.model) == (False, "llama-70b")
        model.upsert_pod(lws_pod(0, 2, "n3"))
        assert model.view().groups["serving/llama/0"].healthy

    def test_unready_container_makes_group_unhealthy(self) -> None:
        """A member whose containers are not ready cannot serve."""
        model = HealthModel(ManualClock(), silence_seconds=30)
        model.upsert_pod(lws_pod(0, 0, "n1"))
        model.upsert_pod(lws_pod(0, 1, "n2", ready=False))
        assert not model.view().groups["serving/llama/0"].healthy

    def test_node_down_needs_not_ready_and_silence(self) -> None:
        """A NotReady node whose agent also went silent yields a node_down signal."""
        clock = ManualClock()
        model = HealthModel(clock, silence_seconds=30)
        model.upsert_pod(lws_pod(0, 0, "n1"))
        model.accept_report(report("n1"), clock.monotonic())
        model.upsert_node({"metadata": {"name": "n1"}, "spec": {}, "status": {"conditions": [
            {"type": "Ready", "status": "False"}]}})
        assert model.signals() == []  # still reporting: the agent sees the node
        clock.advance(31)
        (signal,) = model.signals()
        assert (signal.fault_class, signal.groups) == ("node_down", ("serving/llama/0",))


class TestReports:
    def test_heartbeat_repeating_known_state_wakes_nobody(self) -> None:
        """Only a change in what a node reports triggers a policy evaluation."""
        clock = ManualClock()
        model = HealthModel(clock, silence_seconds=30)
        model.accept_report(report("n1", "thermal", severity="warning"), 0)
        model.changed.clear()
        model.accept_report(report("n1", "thermal", severity="warning"), 10)
        assert not model.changed.is_set()
        model.accept_report(report("n1", "thermal", severity="critical"), 20)
        assert model.changed.is_set()

    def test_parse_node_report_accepts_the_agents_body(self) -> None:
        """The body the agent sends (Agent.report + boot, sequence, sent_at) parses."""
        body = {"kind": "NodeReport", "node": "n1", "boot": {"id": "b1", "started_at": 1.0},
                "sequence": 3, "sent_at": 5.0,
                "gpus": [{"index": 0}], "findings": [{
                    "fault_class": "xid", "severity": "critical", "detail": "79",
                    "subject": {"kind": "gpu", "id": "GPU-1"}, "first_seen": 1.0,
                    "last_seen": 2.0}]}
        parsed = parse_node_report(body)
        assert (parsed.node, parsed.gpus, parsed.findings[0].detail) == ("n1", 1, "79")
        assert (parsed.boot_id, parsed.sequence) == ("b1", 3)
