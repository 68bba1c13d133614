"""Per-GPU detectors over NVML samples.

One ``GpuDetectors`` per GPU holds one small checker per fault class. Every checker returns
exactly one verdict per sample for the key it owns — active with evidence, or clear — so a
finding clears as soon as its condition does (after hysteresis), and a field the GPU does
not support (``None``) simply yields "clear". A lost GPU short-circuits the rest: its
other fields are unknown, not healthy, so their findings are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable

from probes.observations import CLOCKS_EVENT_REASON_BITS, GpuIdentity, GpuSample
from supervisor.config import DetectorSettings
from supervisor.detectors.signals import Hysteresis, Rate, Sustained
from supervisor.findings import FaultClass, FindingKey, Severity, Subject, Verdict

Check = Callable[[GpuSample], Verdict]


def gpu_subject(identity: GpuIdentity, node: str) -> Subject:
    return Subject(kind="gpu", id=identity.uuid, node=node, index=identity.index)


class GpuDetectors:
    """Every per-GPU check of one GPU, configured from ``DetectorSettings``."""

    def __init__(self, identity: GpuIdentity, node: str, settings: DetectorSettings) -> None:
        self.identity = identity
        self.subject = gpu_subject(identity, node)
        self.settings = settings
        self._storm = Sustained(settings.ecc_correctable_storm_for_seconds)
        self._ecc_rate = Rate(60.0)
        self._thermal_level = Hysteresis()
        self._thermal_for = Sustained(settings.thermal_for_seconds)
        self._throttle_for = Sustained(settings.throttle_for_seconds)
        self._nvlink_rate = Rate(60.0)
        self._nvlink_for = Sustained(settings.nvlink_errors_for_seconds)
        self._width_for = Sustained(settings.pcie_width_for_seconds)
        self._gen_for = Sustained(settings.pcie_generation_for_seconds)
        self._replay_rate = Rate(60.0)
        self._mask = 0
        for reason in settings.throttle_reasons:
            self._mask |= CLOCKS_EVENT_REASON_BITS[reason]
        # Keys and "clear" verdicts are immutable: build them once, not on every sample.
        self._keys = {fc: FindingKey(fc, self.subject.id) for fc in FaultClass}
        self._clear = {fc: Verdict.clear(key) for fc, key in self._keys.items()}
        self._checks: list[Check] = [
            self._ecc_uncorrectable, self._ecc_storm, self._retired_pages, self._row_remap,
            self._thermal, self._throttle, self._nvlink_down, self._nvlink_errors,
            self._pcie_degraded, self._pcie_replays,
        ]

    def key(self, fault_class: FaultClass) -> FindingKey:
        return self._keys[fault_class]

    def _verdict(self, fault_class: FaultClass, severity: Severity, reason: str, message: str,
                 **evidence: object) -> Verdict:
        return Verdict(key=self.key(fault_class), active=True, subject=self.subject,
                       severity=severity, reason=reason,
                       message=f"GPU {self.identity.index} ({self.identity.uuid}): {message}",
                       evidence=dict(evidence))

    def observe(self, sample: GpuSample) -> list[Verdict]:
        """Verdicts for one completed sample (the GPU answered, though maybe 'lost')."""
        responsive = self._clear[FaultClass.GPU_UNRESPONSIVE]
        if sample.lost:
            lost = self._verdict(FaultClass.GPU_LOST, Severity.CRITICAL, "GPUFellOffBus",
                                 "NVML reports the GPU is lost (fallen off the bus)",
                                 nvml_error="NVML_ERROR_GPU_IS_LOST")
            return [responsive, lost]
        verdicts = [responsive, self._clear[FaultClass.GPU_LOST]]
        verdicts.extend(check(sample) for check in self._checks)
        return verdicts

    def unresponsive(self, stuck_for: float, timeout: float) -> list[Verdict]:
        """The sample missed its deadline: the monitor itself is stuck on this GPU."""
        return [self._verdict(
            FaultClass.GPU_UNRESPONSIVE, Severity.CRITICAL, "NVMLCallTimedOut",
            f"probe stuck: NVML has not answered for {stuck_for:.1f}s",
            deadline_seconds=timeout, stuck_seconds=round(stuck_for, 3))]

    # --- memory ---------------------------------------------------------------------------

    def _ecc_uncorrectable(self, s: GpuSample) -> Verdict:
        count = s.ecc_uncorrected_volatile
        if count is None or count <= self.settings.ecc_uncorrectable_max:
            return self._clear[FaultClass.ECC_UNCORRECTABLE]
        return self._verdict(FaultClass.ECC_UNCORRECTABLE, Severity.CRITICAL,
                             "UncorrectableECCError",
                             f"{count} uncorrectable ECC errors since driver load",
                             volatile=count, aggregate=s.ecc_uncorrected_aggregate)

    def _ecc_storm(self, s: GpuSample) -> Verdict:
        if s.ecc_corrected_volatile is None:
            return self._clear[FaultClass.ECC_CORRECTABLE_STORM]
        rate = self._ecc_rate.update(s.ecc_corrected_volatile, s.taken_at)
        per_minute = None if rate is None else rate * 60
        storming = per_minute is not None and \
            per_minute >= self.settings.ecc_correctable_storm_per_minute
        if not self._storm.update(storming, s.taken_at):
            return self._clear[FaultClass.ECC_CORRECTABLE_STORM]
        return self._verdict(FaultClass.ECC_CORRECTABLE_STORM, Severity.WARNING,
                             "CorrectableECCStorm",
                             f"{per_minute:.0f} correctable ECC errors per minute",
                             per_minute=round(per_minute or 0, 1),
                             volatile=s.ecc_corrected_volatile)

    def _retired_pages(self, s: GpuSample) -> Verdict:
        total = (s.retired_pages_sbe or 0) + (s.retired_pages_dbe or 0)
        evidence = {"sbe": s.retired_pages_sbe, "dbe": s.retired_pages_dbe,
                    "pending": s.retired_pages_pending}
        if s.retired_pages_sbe is not None and total >= self.settings.retired_pages_max:
            return self._verdict(FaultClass.RETIRED_PAGES, Severity.CRITICAL,
                                 "RetiredPagesLimit", f"{total} pages retired", **evidence)
        if s.retired_pages_pending:
            return self._verdict(FaultClass.RETIRED_PAGES, Severity.WARNING,
                                 "RetiredPagePending",
                                 "a page retirement is pending until the GPU is reset",
                                 **evidence)
        return self._clear[FaultClass.RETIRED_PAGES]

    def _row_remap(self, s: GpuSample) -> Verdict:
        evidence = {"correctable": s.remap_correctable, "uncorrectable": s.remap_uncorrectable,
                    "pending": s.remap_pending, "failure": s.remap_failure}
        if s.remap_failure:
            return self._verdict(FaultClass.ROW_REMAP, Severity.CRITICAL, "RowRemapFailure",
                                 "row remapping failed; the GPU needs replacement", **evidence)
        if (s.remap_uncorrectable or 0) > self.settings.row_remap_uncorrectable_max:
            return self._verdict(FaultClass.ROW_REMAP, Severity.CRITICAL, "RowRemapLimit",
                                 f"{s.remap_uncorrectable} rows remapped for uncorrectable "
                                 "errors", **evidence)
        if s.remap_pending:
            return self._verdict(FaultClass.ROW_REMAP, Severity.WARNING, "RowRemapPending",
                                 "a row remap is pending until the GPU is reset", **evidence)
        return self._clear[FaultClass.ROW_REMAP]

    # --- heat and clocks ------------------------------------------------------------------

    def _thermal(self, s: GpuSample) -> Verdict:
        if s.temperature_celsius is None or s.slowdown_celsius is None:
            return self._clear[FaultClass.THERMAL]
        raise_at = s.slowdown_celsius - self.settings.thermal_margin_celsius
        clear_below = raise_at - self.settings.thermal_hysteresis_celsius
        hot = self._thermal_level.update(s.temperature_celsius, raise_at, clear_below)
        if not self._thermal_for.update(hot, s.taken_at):
            return self._clear[FaultClass.THERMAL]
        return self._verdict(FaultClass.THERMAL, Severity.WARNING, "GPUTemperatureHigh",
                             f"{s.temperature_celsius}°C, slowdown at {s.slowdown_celsius}°C",
                             temperature_celsius=s.temperature_celsius,
                             slowdown_celsius=s.slowdown_celsius,
                             shutdown_celsius=s.shutdown_celsius)

    def _throttle(self, s: GpuSample) -> Verdict:
        reasons = (s.clocks_event_reasons or 0) & self._mask
        if not self._throttle_for.update(reasons != 0, s.taken_at):
            return self._clear[FaultClass.CLOCK_THROTTLE]
        names = [n for n, bit in CLOCKS_EVENT_REASON_BITS.items() if reasons & bit]
        return self._verdict(FaultClass.CLOCK_THROTTLE, Severity.WARNING, "ClocksThrottled",
                             f"clocks slowed by {', '.join(names)}", reasons=names,
                             bitmask=s.clocks_event_reasons)

    # --- links ----------------------------------------------------------------------------

    def _nvlink_down(self, s: GpuSample) -> Verdict:
        link = s.nvlink
        if link is None or link.active >= link.links:
            return self._clear[FaultClass.NVLINK_DOWN]
        return self._verdict(FaultClass.NVLINK_DOWN, Severity.CRITICAL, "NVLinkDown",
                             f"{link.links - link.active} of {link.links} NVLinks down",
                             links=link.links, active=link.active)

    def _nvlink_errors(self, s: GpuSample) -> Verdict:
        if s.nvlink is None:
            return self._clear[FaultClass.NVLINK_ERRORS]
        rate = self._nvlink_rate.update(s.nvlink.errors, s.taken_at)
        storming = rate is not None and rate >= self.settings.nvlink_errors_per_second
        if not self._nvlink_for.update(storming, s.taken_at):
            return self._clear[FaultClass.NVLINK_ERRORS]
        link = s.nvlink
        return self._verdict(FaultClass.NVLINK_ERRORS, Severity.WARNING, "NVLinkErrorStorm",
                             f"{rate:.0f} NVLink errors per second",
                             per_second=round(rate or 0, 1), replay=link.replay_errors,
                             recovery=link.recovery_errors, crc_flit=link.crc_flit_errors,
                             crc_data=link.crc_data_errors)

    def _pcie_degraded(self, s: GpuSample) -> Verdict:
        narrow = (s.pcie_width is not None and s.pcie_width_max is not None
                  and s.pcie_width < s.pcie_width_max)
        slow = (self.settings.pcie_generation_check and s.pcie_generation is not None
                and s.pcie_generation_max is not None
                and s.pcie_generation < s.pcie_generation_max)
        width_due = self._width_for.update(narrow, s.taken_at)
        gen_due = self._gen_for.update(slow, s.taken_at)
        evidence = {"width": s.pcie_width, "width_max": s.pcie_width_max,
                    "generation": s.pcie_generation, "generation_max": s.pcie_generation_max}
        if width_due:
            return self._verdict(FaultClass.PCIE_DEGRADED, Severity.WARNING,
                                 "PCIeLinkWidthDegraded",
                                 f"PCIe link x{s.pcie_width} of x{s.pcie_width_max}", **evidence)
        if gen_due:
            return self._verdict(FaultClass.PCIE_DEGRADED, Severity.WARNING,
                                 "PCIeLinkGenerationDegraded",
                                 f"PCIe gen {s.pcie_generation} of {s.pcie_generation_max}",
                                 **evidence)
        return self._clear[FaultClass.PCIE_DEGRADED]

    def _pcie_replays(self, s: GpuSample) -> Verdict:
        if s.pcie_replays is None:
            return self._clear[FaultClass.PCIE_REPLAYS]
        rate = self._replay_rate.update(s.pcie_replays, s.taken_at)
        if rate is None or rate * 60 < self.settings.pcie_replays_per_minute:
            return self._clear[FaultClass.PCIE_REPLAYS]
        return self._verdict(FaultClass.PCIE_REPLAYS, Severity.WARNING, "PCIeReplayStorm",
                             f"{rate * 60:.0f} PCIe replays per minute",
                             per_minute=round(rate * 60, 1), counter=s.pcie_replays)
