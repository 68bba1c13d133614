"""What probes hand upwards: immutable samples, with "not supported" kept apart from zero.

A field is ``None`` when the GPU or driver does not support it (an older GPU without row
remapping, a PCIe-only card without NVLink). ``None`` is never a fault; detectors skip it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    """The stable identity of one GPU, with the labels DCGM puts on its series."""

    index: int
    uuid: str
    pci_bus_id: str
    name: str
    minor: int | None = None

    @property
    def device(self) -> str:
        """DCGM's ``device`` label: the /dev node name."""
        return f"nvidia{self.minor if self.minor is not None else self.index}"


@dataclass(frozen=True, slots=True)
class NvLinkSample:
    """Per-GPU NVLink totals: how many links exist, how many are up, summed error counters."""

    links: int
    active: int
    replay_errors: int
    recovery_errors: int
    crc_flit_errors: int
    crc_data_errors: int

    @property
    def errors(self) -> int:
        return self.replay_errors + self.recovery_errors + self.crc_flit_errors + \
            self.crc_data_errors


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One read of every health field of one GPU. ``lost`` short-circuits the rest."""

    index: int
    taken_at: float  # monotonic seconds
    duration: float  # seconds the NVML calls took
    lost: bool = False
    ecc_corrected_volatile: int | None = None
    ecc_corrected_aggregate: int | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    remap_correctable: int | None = None
    remap_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    temperature_celsius: int | None = None
    slowdown_celsius: int | None = None
    shutdown_celsius: int | None = None
    clocks_event_reasons: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    nvlink: NvLinkSample | None = None
    pcie_generation: int | None = None
    pcie_generation_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    pcie_replays: int | None = None
    errors: dict[str, str] = field(default_factory=dict)  # field → NVML error other than N/S


@dataclass(frozen=True, slots=True)
class XidEvent:
    """One XID delivered by the NVML event set."""

    gpu_index: int
    xid: int
    received_at: float  # monotonic seconds
    received_wall: float  # wall-clock seconds, for evidence shown to people


# NVML's clocks event (throttle) reason bits, by our config names.
CLOCKS_EVENT_REASON_BITS: dict[str, int] = {
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}
