"""FindingBook transitions and the NodeConditions derived from findings."""

from __future__ import annotations

from supervisor.agent.conditions import CONDITION_TYPES, OUR_TYPES, evaluate
from supervisor.findings import (
    POD_FAULT_CLASSES,
    FaultClass,
    FindingBook,
    FindingKey,
    Severity,
    Subject,
    Transition,
    Verdict,
)

GPU3 = Subject(kind="gpu", id="GPU-3", node="n", index=3)
KEY = FindingKey(FaultClass.NVLINK_DOWN, "GPU-3")


def raise_(severity: Severity = Severity.CRITICAL, reason: str = "NVLinkDown") -> Verdict:
    return Verdict(key=KEY, active=True, subject=GPU3, severity=severity, reason=reason,
                   message="GPU 3: 1 of 18 NVLinks down")


class TestBook:
    def test_transitions_only_on_change(self) -> None:
        """Raise once, stay quiet on repeats, report a severity change, then the clear."""
        book = FindingBook()
        seen: list[Transition] = []
        book.subscribe(lambda tr, f: seen.append(tr))
        book.apply([raise_()], 10)
        book.apply([raise_()], 11)
        book.apply([raise_(Severity.WARNING)], 12)
        book.apply([Verdict.clear(KEY)], 13)
        book.apply([Verdict.clear(KEY)], 14)
        assert seen == [Transition.RAISED, Transition.CHANGED, Transition.CLEARED]
        cleared = book.recently_cleared[-1]
        assert (cleared.first_seen, cleared.last_seen, cleared.cleared_at) == (10, 12, 13)
        assert cleared.as_dict()["cleared_at"] == 13  # /status says when it cleared
        book.apply([raise_()], 15)
        assert "cleared_at" not in book.active()[0].as_dict()

    def test_repeats_refresh_last_seen(self) -> None:
        """A repeated verdict keeps first_seen and moves last_seen."""
        book = FindingBook()
        book.apply([raise_()], 10)
        book.apply([raise_()], 20)
        (finding,) = book.active()
        assert (finding.first_seen, finding.last_seen) == (10, 20)


class TestConditions:
    def test_all_our_types_published_false_when_healthy(self) -> None:
        """With no findings every condition type is False with its healthy reason."""
        conds = evaluate([])
        assert set(conds) == OUR_TYPES
        for ctype in CONDITION_TYPES:
            assert conds[ctype.type].status is False
            assert conds[ctype.type].reason == ctype.healthy_reason

    def test_finding_sets_its_condition_true(self) -> None:
        """An NVLink finding makes GPUNVLinkProblem True with the finding's reason."""
        book = FindingBook()
        book.apply([raise_()], 0)
        conds = evaluate(book.active())
        assert conds["GPUNVLinkProblem"].status is True
        assert conds["GPUNVLinkProblem"].reason == "NVLinkDown"
        assert conds["GPUNVLinkProblem"].message == "GPU 3: 1 of 18 NVLinks down"
        assert conds["GPUXidError"].status is False

    def test_the_condition_message_names_each_gpu_once(self) -> None:
        """A finding whose message names its GPU is not prefixed again; one without is; with
        several GPUs affected the message lists them before the worst one's."""
        book = FindingBook()
        xid = FindingKey(FaultClass.XID, "GPU-3", "79")
        book.apply([Verdict(key=xid, active=True, subject=GPU3, severity=Severity.CRITICAL,
                            reason="XidCriticalDetected", message="XID 79, fell off the bus")],
                   0)
        assert evaluate(book.active())["GPUXidError"].message == \
            "GPU 3: XID 79, fell off the bus"
        gpu1 = Subject(kind="gpu", id="GPU-1", node="n", index=1)
        book.apply([Verdict(key=FindingKey(FaultClass.XID, "GPU-1", "79"), active=True,
                            subject=gpu1, severity=Severity.CRITICAL,
                            reason="XidCriticalDetected", message="XID 79, fell off the bus")],
                   1)
        assert evaluate(book.active())["GPUXidError"].message == \
            "GPUs 1, 3: XID 79, fell off the bus (+1 more)"

    def test_info_findings_do_not_set_conditions(self) -> None:
        """Informational findings are visible in /status but do not flip a condition."""
        book = FindingBook()
        book.apply([raise_(Severity.INFO)], 0)
        assert evaluate(book.active())["GPUNVLinkProblem"].status is False

    def test_every_fault_class_of_the_agent_maps_to_a_condition(self) -> None:
        """No agent fault class is left without a NodeCondition (the sidecar's are about
        pods and groups, not nodes: they have none)."""
        mapped = set().union(*(c.classes for c in CONDITION_TYPES))
        assert mapped == set(FaultClass) - POD_FAULT_CLASSES
