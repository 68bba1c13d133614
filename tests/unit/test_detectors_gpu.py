"""Per-GPU detectors: each fault class raises on its condition and clears when it clears."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from probes.observations import GpuIdentity, GpuSample, NvLinkSample
from supervisor.config import DetectorSettings
from supervisor.detectors.gpu import GpuDetectors
from supervisor.findings import GPU_FAULT_CLASSES, FaultClass, Severity, Verdict

IDENT = GpuIdentity(index=2, uuid="GPU-2", pci_bus_id="00000000:3A:00.0",
                    name="NVIDIA H100 80GB HBM3")
LINKS = NvLinkSample(links=18, active=18, replay_errors=0, recovery_errors=0,
                     crc_flit_errors=0, crc_data_errors=0)


def healthy(t: float, **fields: Any) -> GpuSample:
    base = GpuSample(
        index=2, taken_at=t, duration=0.001, ecc_corrected_volatile=0,
        ecc_corrected_aggregate=0, ecc_uncorrected_volatile=0, ecc_uncorrected_aggregate=0,
        retired_pages_sbe=0, retired_pages_dbe=0, retired_pages_pending=False,
        remap_correctable=0, remap_uncorrectable=0, remap_pending=False, remap_failure=False,
        temperature_celsius=45, slowdown_celsius=87, shutdown_celsius=92,
        clocks_event_reasons=0, power_watts=250.0, power_limit_watts=700.0, energy_joules=0.0,
        nvlink=LINKS, pcie_generation=5, pcie_generation_max=5, pcie_width=16,
        pcie_width_max=16, pcie_replays=0)
    return replace(base, **fields)


def active(verdicts: list[Verdict], fault_class: FaultClass) -> Verdict | None:
    found = [v for v in verdicts if v.key.fault_class is fault_class]
    assert len(found) == 1, f"expected exactly one verdict for {fault_class}"
    return found[0] if found[0].active else None


@pytest.fixture(name="det")
def _det() -> GpuDetectors:
    return GpuDetectors(IDENT, "node-a", DetectorSettings())


class TestHealthy:
    def test_healthy_gpu_has_no_active_verdict(self, det: GpuDetectors) -> None:
        """A healthy sample yields one clear verdict per fault class and nothing active."""
        verdicts = det.observe(healthy(0))
        assert not [v for v in verdicts if v.active]
        classes = {v.key.fault_class for v in verdicts}
        assert classes == set(GPU_FAULT_CLASSES) - {FaultClass.XID}  # XIDs are events

    def test_unsupported_fields_are_not_faults(self, det: GpuDetectors) -> None:
        """An older GPU that supports none of the optional fields raises nothing."""
        bare = GpuSample(index=2, taken_at=0, duration=0.001)
        assert not [v for v in det.observe(bare) if v.active]


class TestMemory:
    def test_uncorrectable_ecc_is_critical_and_clears(self, det: GpuDetectors) -> None:
        """Any volatile uncorrectable ECC error raises critical; a reset (0) clears it."""
        v = active(det.observe(healthy(0, ecc_uncorrected_volatile=2)),
                   FaultClass.ECC_UNCORRECTABLE)
        assert v is not None and v.severity is Severity.CRITICAL
        assert v.evidence["volatile"] == 2
        assert active(det.observe(healthy(1)), FaultClass.ECC_UNCORRECTABLE) is None

    def test_correctable_storm_needs_rate_and_duration(self) -> None:
        """A correctable-ECC rate above the limit raises only after `for:` has elapsed."""
        det = GpuDetectors(IDENT, "n", DetectorSettings(ecc_correctable_storm_per_minute=60,
                                                        ecc_correctable_storm_for_seconds=10))
        count = 0
        results = []
        for t in range(0, 30, 2):
            count += 10  # 5 per second = 300 per minute
            results.append(active(det.observe(healthy(t, ecc_corrected_volatile=count)),
                                  FaultClass.ECC_CORRECTABLE_STORM))
        assert results[0] is None and results[5] is None
        assert results[-1] is not None and results[-1].evidence["per_minute"] >= 60
        # A slow trickle afterwards clears it once the window has moved on.
        for t in range(30, 120, 2):
            last = active(det.observe(healthy(t, ecc_corrected_volatile=count)),
                          FaultClass.ECC_CORRECTABLE_STORM)
        assert last is None

    def test_counter_reset_is_not_a_storm(self, det: GpuDetectors) -> None:
        """A counter that goes backwards (driver reload) restarts the window."""
        det.observe(healthy(0, ecc_corrected_volatile=100000))
        v = active(det.observe(healthy(1, ecc_corrected_volatile=0)),
                   FaultClass.ECC_CORRECTABLE_STORM)
        assert v is None

    def test_retired_pages_pending_then_limit(self, det: GpuDetectors) -> None:
        """A pending retirement warns; reaching the page limit is critical."""
        v = active(det.observe(healthy(0, retired_pages_pending=True)), FaultClass.RETIRED_PAGES)
        assert v is not None and v.severity is Severity.WARNING
        assert v.reason == "RetiredPagePending"
        v = active(det.observe(healthy(1, retired_pages_sbe=40, retired_pages_dbe=20)),
                   FaultClass.RETIRED_PAGES)
        assert v is not None and v.severity is Severity.CRITICAL
        assert v.reason == "RetiredPagesLimit"

    @pytest.mark.parametrize(
        ("fields", "reason", "severity"),
        [
            ({"remap_failure": True}, "RowRemapFailure", Severity.CRITICAL),
            ({"remap_uncorrectable": 513}, "RowRemapLimit", Severity.CRITICAL),
            ({"remap_pending": True}, "RowRemapPending", Severity.WARNING),
        ],
    )
    def test_row_remap(self, det: GpuDetectors, fields: dict[str, Any], reason: str,
                       severity: Severity) -> None:
        """Row-remap failure, too many uncorrectable rows and pending remaps are findings."""
        v = active(det.observe(healthy(0, **fields)), FaultClass.ROW_REMAP)
        assert v is not None and (v.reason, v.severity) == (reason, severity)


class TestHeat:
    def test_thermal_uses_gpu_threshold_hysteresis_and_for(self) -> None:
        """Raise at slowdown-margin after `for:`, stay raised until below the hysteresis band."""
        det = GpuDetectors(IDENT, "n", DetectorSettings(thermal_for_seconds=10))
        assert active(det.observe(healthy(0, temperature_celsius=83)), FaultClass.THERMAL) is None
        assert active(det.observe(healthy(5, temperature_celsius=84)), FaultClass.THERMAL) is None
        v = active(det.observe(healthy(10, temperature_celsius=84)), FaultClass.THERMAL)
        assert v is not None and v.evidence["slowdown_celsius"] == 87
        # 80 °C is below the raise point (82) but inside the 3 °C band: still raised.
        assert active(det.observe(healthy(11, temperature_celsius=80)), FaultClass.THERMAL)
        assert active(det.observe(healthy(12, temperature_celsius=78)), FaultClass.THERMAL) is None

    def test_throttle_reasons_respect_mask(self) -> None:
        """SW power cap alone is normal at load; HW slowdown raises after `for:`."""
        det = GpuDetectors(IDENT, "n", DetectorSettings(throttle_for_seconds=0))
        assert active(det.observe(healthy(0, clocks_event_reasons=0x4)),
                      FaultClass.CLOCK_THROTTLE) is None
        v = active(det.observe(healthy(1, clocks_event_reasons=0x4 | 0x8)),
                   FaultClass.CLOCK_THROTTLE)
        assert v is not None and v.evidence["reasons"] == ["hw_slowdown"]


class TestLinks:
    def test_nvlink_down_is_critical(self, det: GpuDetectors) -> None:
        """One inactive NVLink raises critical at once and clears when it is back."""
        down = replace(LINKS, active=17)
        v = active(det.observe(healthy(0, nvlink=down)), FaultClass.NVLINK_DOWN)
        assert v is not None and v.severity is Severity.CRITICAL and v.evidence["active"] == 17
        assert active(det.observe(healthy(1)), FaultClass.NVLINK_DOWN) is None

    def test_nvlink_error_storm(self) -> None:
        """NVLink CRC errors above the per-second limit for `for:` raise a warning."""
        det = GpuDetectors(IDENT, "n", DetectorSettings(nvlink_errors_for_seconds=2))
        verdicts = [active(det.observe(healthy(t, nvlink=replace(LINKS, crc_flit_errors=t * 500))),
                           FaultClass.NVLINK_ERRORS) for t in range(5)]
        assert verdicts[0] is None and verdicts[1] is None
        assert verdicts[-1] is not None and verdicts[-1].evidence["per_second"] >= 100

    def test_pcie_width_degraded_after_for(self) -> None:
        """A link below its rated width raises after `for:`; generation is ignored by default."""
        det = GpuDetectors(IDENT, "n", DetectorSettings(pcie_width_for_seconds=5))
        assert active(det.observe(healthy(0, pcie_width=8)), FaultClass.PCIE_DEGRADED) is None
        v = active(det.observe(healthy(5, pcie_width=8)), FaultClass.PCIE_DEGRADED)
        assert v is not None and v.reason == "PCIeLinkWidthDegraded"
        assert active(det.observe(healthy(6, pcie_generation=1)),
                      FaultClass.PCIE_DEGRADED) is None

    def test_pcie_generation_check_when_enabled(self) -> None:
        """With the generation check on, a link below its rated generation raises."""
        det = GpuDetectors(IDENT, "n", DetectorSettings(pcie_generation_check=True,
                                                        pcie_generation_for_seconds=0))
        v = active(det.observe(healthy(0, pcie_generation=3)), FaultClass.PCIE_DEGRADED)
        assert v is not None and v.reason == "PCIeLinkGenerationDegraded"

    def test_pcie_replay_storm(self, det: GpuDetectors) -> None:
        """PCIe replays growing faster than the per-minute limit raise a warning."""
        det.observe(healthy(0, pcie_replays=0))
        v = active(det.observe(healthy(2, pcie_replays=1000)), FaultClass.PCIE_REPLAYS)
        assert v is not None and v.evidence["per_minute"] == pytest.approx(30000)


class TestLostAndStuck:
    def test_lost_gpu_is_critical_and_leaves_other_findings_alone(self,
                                                                  det: GpuDetectors) -> None:
        """A lost sample raises gpu_lost and says nothing about the fields it could not read."""
        verdicts = det.observe(GpuSample(index=2, taken_at=0, duration=0.001, lost=True))
        lost = active(verdicts, FaultClass.GPU_LOST)
        assert lost is not None and lost.severity is Severity.CRITICAL
        assert {v.key.fault_class for v in verdicts} == {FaultClass.GPU_LOST,
                                                         FaultClass.GPU_UNRESPONSIVE}

    def test_unresponsive_names_the_stuck_duration(self, det: GpuDetectors) -> None:
        """A deadline miss is a critical finding on that GPU with the stuck time as evidence."""
        (v,) = det.unresponsive(stuck_for=7.5, timeout=5.0)
        assert v.key.fault_class is FaultClass.GPU_UNRESPONSIVE and v.active
        assert v.evidence == {"deadline_seconds": 5.0, "stuck_seconds": 7.5}
        assert "GPU 2" in v.message
