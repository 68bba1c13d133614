"""XID events → findings, following NVIDIA's XID catalog, with dedup and burst windows.

NVIDIA's XID catalog (the "XID Errors" table of its GPU documentation, "Immediate Action"
for H100) sorts XIDs by what to do about them; that action sets the severity here:

- ignore (14, 37, 38, 43, 44, 63, 66, 67, 92, 137, 141): counted, logged, no finding;
- restart the application (8, 11, 13, 25, 31, 32, 39-41, 68-72, 80, 94): warning. One
  crashing application emits a burst of them within a second, and that is the
  application's problem, not the GPU's: the catalog's workflow for 13 and 31 is to restart
  the application and look again. So escalation counts *incidents*, not events: XIDs of
  one code on one GPU less than ``xid_incident_gap_seconds`` apart are one incident, and
  only when the XID recurs in ``xid_escalation_incidents`` separate incidents within the
  clear window (after the application was restarted, or in the next one) is it critical.
  Whether that is the GPU faulting applications or an application crash-looping on it,
  one GPU cannot tell: the controller does, from where the XIDs recur — following one
  group from node to node, or staying with one GPU under different groups
  (``supervisor.controller.attribution``);
- reset the GPU (46, 62, 64, 95, 109, 110, 119, 120, 136, 140, 143, 156, 158): critical;
- reboot the node (79, fallen off the bus): critical;
- decision workflows: 48 (DBE) critical / reset; 74 and 144-150 (NVLink) critical;
  154 (follow the driver's recovery action) critical; 45 warning and never escalated by
  itself (preemptive cleanup after other errors — NVSentinel flagging it fatal cordoned 77
  nodes after one crash);
- anything not in the catalog: warning, investigate; escalated by incidents like the
  application class.

Dedup: one finding per (GPU, XID code). Identical XIDs while the finding is active only
refresh ``last_seen`` and ``count`` — 10,000 identical XIDs are one finding with count
10,000. The finding clears after ``xid_clear_after_seconds`` without a repeat.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from probes.observations import GpuIdentity, XidEvent
from supervisor.config import DetectorSettings
from supervisor.detectors.gpu import gpu_subject
from supervisor.findings import FaultClass, FindingKey, Severity, Verdict


@dataclass(frozen=True, slots=True)
class XidRule:
    action: str
    severity: Severity | None  # None: ignore
    description: str


_IGNORE = {14, 37, 38, 43, 44, 63, 66, 67, 92, 137, 141}
XID_PREEMPTIVE_CLEANUP = 45
_RESTART_APP = {8, 11, 13, 25, 31, 32, 39, 40, 41, 68, 69, 70, 71, 72, 80, 94}
_RESET_GPU = {46, 62, 64, 95, 109, 110, 119, 120, 136, 140, 143, 156, 158}
_NVLINK = {74, *range(144, 151)}


def classify(xid: int, extra_ignore: frozenset[int] = frozenset()) -> XidRule:
    """The catalog's immediate action for ``xid``."""
    if xid in _IGNORE or xid in extra_ignore:
        return XidRule("ignore", None, "informational per NVIDIA's XID catalog")
    if xid == 79:
        return XidRule("reboot_node", Severity.CRITICAL, "GPU has fallen off the bus")
    if xid == 48:
        return XidRule("reset_gpu", Severity.CRITICAL, "double-bit ECC error")
    if xid == 95:
        return XidRule("reset_gpu", Severity.CRITICAL, "uncontained ECC error")
    if xid == 94:
        return XidRule("restart_application", Severity.WARNING, "contained ECC error")
    if xid in _NVLINK:
        return XidRule("reset_gpu", Severity.CRITICAL, "NVLink error")
    if xid == 154:
        return XidRule("follow_driver_recovery_action", Severity.CRITICAL,
                       "GPU recovery action changed")
    if xid == 45:
        return XidRule("investigate", Severity.WARNING,
                       "preemptive cleanup after earlier errors")
    if xid in _RESET_GPU:
        return XidRule("reset_gpu", Severity.CRITICAL, "GPU needs a reset")
    if xid in _RESTART_APP:
        return XidRule("restart_application", Severity.WARNING, "application-level GPU fault")
    return XidRule("investigate", Severity.WARNING, "XID not in the catalog")


def application_class(xid: int) -> bool:
    """An XID the catalog answers with "restart the application" (or does not list), whose
    recurrence may be the application's fault as much as the GPU's: the controller tells
    which from where it recurs (``supervisor.controller.attribution``)."""
    return classify(xid).action in ("restart_application", "investigate")


@dataclass(slots=True)
class _History:
    """One (GPU, XID) while its finding is active."""

    last: float  # monotonic time of the latest event
    events: int = 0
    incidents: deque[float] = field(default_factory=deque)  # start times, within the window


class XidDetector:
    """Dedup, burst escalation and expiry of XID findings for one node."""

    def __init__(self, gpus: dict[int, GpuIdentity], node: str,
                 settings: DetectorSettings) -> None:
        self._subjects = {i: gpu_subject(ident, node) for i, ident in gpus.items()}
        self._settings = settings
        self._ignore = frozenset(settings.xid_ignore)
        self._seen: dict[FindingKey, _History] = {}
        self.events_total = 0
        self.ignored_total = 0

    def observe(self, event: XidEvent, repeat: int = 1) -> Verdict | None:
        """Verdict for ``repeat`` identical deliveries of ``event``; None when ignored."""
        self.events_total += repeat
        rule = classify(event.xid, self._ignore)
        subject = self._subjects.get(event.gpu_index)
        if rule.severity is None or subject is None:
            self.ignored_total += repeat
            return None
        key = FindingKey(FaultClass.XID, subject.id, str(event.xid))
        history = self._seen.get(key)
        if history is None:
            history = self._seen[key] = _History(last=event.received_at)
            history.incidents.append(event.received_at)
        elif event.received_at - history.last >= self._settings.xid_incident_gap_seconds:
            history.incidents.append(event.received_at)
        history.last = event.received_at
        history.events += repeat
        window = self._settings.xid_clear_after_seconds
        while history.incidents and event.received_at - history.incidents[0] > window:
            history.incidents.popleft()
        incidents = len(history.incidents)
        severity, reason = rule.severity, "XidCriticalDetected"
        message = (f"XID {event.xid}, {rule.description}; catalog action: {rule.action}")
        if severity is Severity.WARNING:
            reason = "XidDetected"
            if event.xid != XID_PREEMPTIVE_CLEANUP and \
                    incidents >= self._settings.xid_escalation_incidents:
                severity, reason = Severity.CRITICAL, "XidRepeated"
                message = (f"XID {event.xid} recurred in {incidents} separate incidents "
                           f"within {window:g}s ({rule.description}): the GPU's fault or the "
                           f"application's — the controller tells which from where it "
                           f"recurs; catalog action: {rule.action}")
        return Verdict(
            key=key, active=True, subject=subject, severity=severity, reason=reason,
            message=message,
            evidence={"xid": event.xid, "occurrences": history.events,
                      "incidents": incidents, "last_event_wall": event.received_wall},
            action=rule.action, repeat=repeat,
        )

    def expire(self, now: float) -> list[Verdict]:
        """Clear XID findings that have not repeated within the clear window."""
        expired = [k for k, h in self._seen.items()
                   if now - h.last >= self._settings.xid_clear_after_seconds]
        for key in expired:
            del self._seen[key]
        return [Verdict.clear(key) for key in expired]
