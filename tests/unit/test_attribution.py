"""Application-class XIDs told apart: the workload's crash loop, or the GPU's fault — from
where they recur, as the health model sees the reports and the pods."""

from __future__ import annotations

from typing import Any

from supervisor.controller.ingest import NodeReport, ReportedFinding
from supervisor.controller.model import LWS_GROUP, LWS_NAME, LWS_WORKER, HealthModel
from supervisor.runtime.clock import ManualClock


def pod(name: str, group: int, node: str, uid: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "serving", "uid": uid,
                         "labels": {LWS_NAME: "app", LWS_GROUP: str(group), LWS_WORKER: "0"}},
            "spec": {"nodeName": node},
            "status": {"conditions": [{"type": "ContainersReady", "status": "True"}]}}


class Fleet:
    """A health model fed as the watches and agents would feed it."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.model = HealthModel(self.clock, silence_seconds=60)
        self.seq = 0

    def place(self, group: int, node: str, uid: str) -> None:
        """Group ``group``'s (single) pod runs on ``node`` now; any earlier pod is gone."""
        for g in list(self.model.groups.values()):
            for p in list(g.pods.values()):
                if g.key == f"serving/app/{group}":
                    self.model.delete_pod({"metadata": {"namespace": "serving",
                                                        "name": p.name, "uid": p.uid}})
        self.model.upsert_pod(pod(f"app-{group}", group, node, uid))

    def xid(self, node: str, gpu: str, code: int = 13, severity: str = "critical",
            ago: float = 0.0) -> None:
        """The node's agent reports XID ``code`` on ``gpu``, last seen ``ago`` seconds
        before the report."""
        self.seq += 1
        now = self.clock.wall()
        finding = ReportedFinding("xid", severity, "gpu", gpu, str(code), "XidRepeated", "",
                                  now - 60, now - ago, node)
        self.model.accept_report(NodeReport(node, "boot", self.seq, now, 8, (finding,)),
                                 self.clock.monotonic())

    def healthy(self, node: str) -> None:
        self.seq += 1
        self.model.accept_report(NodeReport(node, "boot", self.seq, self.clock.wall(), 8, ()),
                                 self.clock.monotonic())

    def signals(self) -> list[tuple[str, str | None, bool, bool, tuple[str, ...]]]:
        return sorted((s.fault_class, s.node, s.node_local, s.suspect, s.groups)
                      for s in self.model.signals())


def test_first_sighting_under_one_group_makes_the_node_only_a_suspect() -> None:
    """One group, one GPU: unproven — not node-local (no quarantine), a suspect."""
    f = Fleet()
    f.place(0, "n1", "u1")
    f.xid("n1", "GPU-a")
    assert f.signals() == [("xid", "n1", False, True, ("serving/app/0",))]


def test_xids_that_follow_a_group_to_another_node_are_the_workloads() -> None:
    """The group crashed on n1, was recreated on n2 and crashes there too: neither node is
    blamed; one workload_crash_loop signal about the group stands in their place."""
    f = Fleet()
    f.place(0, "n1", "u1")
    f.xid("n1", "GPU-a")
    f.clock.advance(30)
    f.place(0, "n2", "u2")
    f.xid("n2", "GPU-b")
    assert f.signals() == [("workload_crash_loop", None, False, False, ("serving/app/0",))]
    loop = f.model.crash_loops["serving/app/0"]
    assert loop.nodes == {"n1", "n2"} and loop.codes == {13}


def test_xids_that_stay_with_one_gpu_under_two_groups_are_the_gpus() -> None:
    """Group 0 crashed on n1's GPU-a and left; group 1, placed there since, crashes on the
    same GPU: the GPU is at fault, node-local again (quarantine)."""
    f = Fleet()
    f.place(0, "n1", "u1")
    f.xid("n1", "GPU-a")
    f.clock.advance(5)
    f.place(0, "n2", "u2")  # restarted elsewhere, runs fine there
    f.place(1, "n1", "u3")
    f.xid("n1", "GPU-a")  # a new XID on the same GPU
    assert f.signals() == [("xid", "n1", True, False, ("serving/app/1",))]


def moved_on_with_a_newcomer_under_the_old_finding() -> Fleet:
    """Group 0 crashed on n1's GPU-a and was recreated on n2; group 1 is placed on n1 since,
    and n1's agent reports the same finding again, with no new XID."""
    f = Fleet()
    f.place(0, "n1", "u1")
    f.xid("n1", "GPU-a")
    f.clock.advance(5)
    f.place(0, "n2", "u2")
    f.place(1, "n1", "u3")
    f.xid("n1", "GPU-a", ago=5)
    return f


def test_an_old_finding_is_not_pinned_on_the_group_that_arrives_after_it() -> None:
    """The finding stays active for minutes after the last XID: a group placed on the node
    meanwhile, with no new XID, is not a second workload under the GPU."""
    f = moved_on_with_a_newcomer_under_the_old_finding()
    assert f.signals() == [("xid", "n1", False, True, ())]


def test_sightings_older_than_the_window_are_forgotten() -> None:
    """A group that crashed on another node hours ago is not a crash loop now."""
    f = Fleet()
    f.model.attribution.window = 600
    f.place(0, "n1", "u1")
    f.xid("n1", "GPU-a")
    f.healthy("n1")
    f.clock.advance(700)
    f.place(0, "n2", "u2")
    f.xid("n2", "GPU-b")
    assert f.signals() == [("xid", "n2", False, True, ("serving/app/0",))]


def test_gpu_class_xids_are_not_attributed() -> None:
    """XID 79 (fell off the bus) is the GPU's whatever runs on it: node-local as ever."""
    f = Fleet()
    f.place(0, "n1", "u1")
    f.xid("n1", "GPU-a", code=79)
    assert f.signals() == [("xid", "n1", True, False, ("serving/app/0",))]


def test_the_view_counts_a_finding_only_against_the_groups_it_is_evidence_about() -> None:
    """Group 0 crashed on n1 and moved on; group 1 placed on n1 since, with no new XID, is
    healthy in the view (capacity, budgets and degrade count it) — as the signals say."""
    view = moved_on_with_a_newcomer_under_the_old_finding().model.view()
    assert view.groups["serving/app/1"].healthy
    assert view.groups["serving/app/0"].healthy


def test_an_xid_first_heard_of_long_after_it_happened_is_not_a_sighting() -> None:
    """A restarted controller's first report carries an XID from before it started: the
    groups on the node now are not the ones it happened under, so nobody is blamed for it —
    the finding stays an unattributed suspect until it recurs."""
    f = Fleet()
    f.place(1, "n1", "u3")
    f.xid("n1", "GPU-a", ago=120)
    assert f.signals() == [("xid", "n1", False, True, ())]
    assert not f.model.crash_loops
