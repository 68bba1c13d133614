"""XID handling: NVIDIA's catalog actions, dedup, burst escalation and expiry."""

from __future__ import annotations

import pytest

from probes.observations import GpuIdentity, XidEvent
from supervisor.config import DetectorSettings
from supervisor.detectors.xid import XidDetector, classify
from supervisor.findings import FaultClass, FindingBook, Severity

GPUS = {i: GpuIdentity(index=i, uuid=f"GPU-{i}", pci_bus_id=f"0:{i}", name="H100")
        for i in range(2)}


def event(gpu: int, xid: int, t: float) -> XidEvent:
    return XidEvent(gpu_index=gpu, xid=xid, received_at=t, received_wall=1.7e9 + t)


class TestCatalog:
    @pytest.mark.parametrize(
        ("xid", "action", "severity"),
        [
            (79, "reboot_node", Severity.CRITICAL),
            (48, "reset_gpu", Severity.CRITICAL),
            (95, "reset_gpu", Severity.CRITICAL),
            (94, "restart_application", Severity.WARNING),
            (13, "restart_application", Severity.WARNING),
            (31, "restart_application", Severity.WARNING),
            (109, "reset_gpu", Severity.CRITICAL),
            (74, "reset_gpu", Severity.CRITICAL),
            (145, "reset_gpu", Severity.CRITICAL),
            (154, "follow_driver_recovery_action", Severity.CRITICAL),
            (45, "investigate", Severity.WARNING),
            (43, "ignore", None),
            (63, "ignore", None),
            (92, "ignore", None),
            (999, "investigate", Severity.WARNING),
        ],
    )
    def test_catalog_action_and_severity(self, xid: int, action: str,
                                         severity: Severity | None) -> None:
        """Each XID maps to the immediate action of NVIDIA's catalog and a severity."""
        rule = classify(xid)
        assert (rule.action, rule.severity) == (action, severity)

    def test_configured_ignore_list_extends_catalog(self) -> None:
        """Operators can silence extra XIDs; they then produce no finding."""
        assert classify(13, frozenset({13})).severity is None


class TestDedup:
    def test_ten_thousand_identical_xids_are_one_finding(self) -> None:
        """10,000 identical XIDs, delivered one by one, give one finding with count 10,000."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        book = FindingBook()
        raised = []
        book.subscribe(lambda tr, f: raised.append(tr))
        for i in range(10_000):
            verdict = det.observe(event(0, 79, i * 0.0001))
            assert verdict is not None
            book.apply([verdict], 0)
        (finding,) = book.active()
        assert finding.count == 10_000
        assert finding.evidence["occurrences"] == 10_000
        assert [str(t) for t in raised] == ["raised"]

    def test_coalesced_batch_counts_every_event(self) -> None:
        """A batch of repeats reported at once counts each of them."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        book = FindingBook()
        verdict = det.observe(event(1, 48, 0), repeat=250)
        assert verdict is not None
        book.apply([verdict], 0)
        assert book.active()[0].count == 250
        assert det.events_total == 250

    def test_different_codes_and_gpus_are_separate_findings(self) -> None:
        """(GPU, XID) is the dedup key."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        book = FindingBook()
        for gpu, xid in [(0, 79), (0, 48), (1, 79), (1, 79)]:
            v = det.observe(event(gpu, xid, 0))
            assert v is not None
            book.apply([v], 0)
        assert sorted((f.subject.index, f.key.detail) for f in book.active()) == [
            (0, "48"), (0, "79"), (1, "79")]

    def test_ignored_xids_make_no_finding(self) -> None:
        """Catalog 'ignore' XIDs are counted but yield no verdict."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        assert det.observe(event(0, 43, 0)) is None
        assert det.ignored_total == 1



class TestIncidents:
    """Escalation counts separate incidents, not events within one burst."""

    def severity_after(self, det: XidDetector, xid: int, times: list[float],
                       repeat: int = 1) -> tuple[Severity, str, dict[str, object]]:
        verdict = None
        for t in times:
            verdict = det.observe(event(0, xid, t), repeat=repeat)
        assert verdict is not None
        return verdict.severity, verdict.reason, verdict.evidence

    def test_one_crashing_application_is_not_a_hardware_verdict(self) -> None:
        """Six XID 13 within one second — what one crashing application emits — stay a
        warning: one incident, six occurrences."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        severity, reason, evidence = self.severity_after(det, 13, [0.1 * i for i in range(6)])
        assert (severity, reason) == (Severity.WARNING, "XidDetected")
        assert (evidence["occurrences"], evidence["incidents"]) == (6, 1)

    def test_a_burst_of_xid_45_stays_a_warning(self) -> None:
        """Twenty XID 45 at once, and XID 45 again in later incidents: 45 is cleanup after
        other errors and never escalates on its own."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        assert self.severity_after(det, 45, [0.0], repeat=20)[0] is Severity.WARNING
        assert self.severity_after(det, 45, [60.0, 120.0, 180.0])[0] is Severity.WARNING

    def test_recurring_in_separate_incidents_escalates(self) -> None:
        """The same application-class XID in three incidents 60 s apart on one GPU is the
        GPU's problem: critical, XidRepeated, with the incident count as evidence."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        assert self.severity_after(det, 13, [0.0, 0.2])[0] is Severity.WARNING
        assert self.severity_after(det, 13, [60.0, 60.3])[0] is Severity.WARNING
        severity, reason, evidence = self.severity_after(det, 13, [120.0])
        assert (severity, reason, evidence["incidents"]) == (
            Severity.CRITICAL, "XidRepeated", 3)

    def test_incidents_older_than_the_window_do_not_count(self) -> None:
        """Incidents at 0, 400 and 800 s with a 600 s window: only two are recent."""
        det = XidDetector(GPUS, "n", DetectorSettings())
        severity, _, evidence = self.severity_after(det, 31, [0.0, 400.0, 800.0])
        assert (severity, evidence["incidents"]) == (Severity.WARNING, 2)


class TestExpiry:
    def test_finding_clears_after_quiet_window(self) -> None:
        """Without a repeat for xid_clear_after_seconds the XID finding clears."""
        det = XidDetector(GPUS, "n", DetectorSettings(xid_clear_after_seconds=60))
        book = FindingBook()
        v = det.observe(event(0, 79, 100))
        assert v is not None
        book.apply([v], 0)
        book.apply(det.expire(159), 0)
        assert len(book.active()) == 1
        book.apply(det.expire(160), 0)
        assert book.active() == []
        assert book.recently_cleared[-1].key.fault_class is FaultClass.XID

    def test_repeat_after_clear_is_a_new_finding(self) -> None:
        """Once cleared, the next occurrence starts a fresh count."""
        det = XidDetector(GPUS, "n", DetectorSettings(xid_clear_after_seconds=10))
        det.observe(event(0, 13, 0), repeat=4)
        det.expire(20)
        v = det.observe(event(0, 13, 21))
        assert v is not None and v.evidence["occurrences"] == 1
        assert v.severity is Severity.WARNING
