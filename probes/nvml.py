"""NVML through the real ``pynvml`` bindings — the only module that imports ``pynvml``.

Every function here *blocks* (it is a C call into the driver) and may block forever when
the driver is wedged. Nothing in this module times out on its own: the caller runs each
call on a per-GPU worker thread under a deadline (``supervisor.runtime.deadline``).

Errors are sorted the way a health monitor needs them:

- ``NVML_ERROR_NOT_SUPPORTED`` / a missing entry point (old driver): the field is ``None``;
  an older GPU lacking row remapping is not a fault.
- ``NVML_ERROR_GPU_IS_LOST``: the GPU fell off the bus; the sample says ``lost=True``.
- anything else: recorded per field in ``GpuSample.errors`` and the field left ``None``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from probes.observations import GpuIdentity, GpuSample, NvLinkSample, XidEvent

T = TypeVar("T")

_NOT_A_VALUE = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)


_ECC_VOLATILE = (
    ("ecc_corrected_volatile", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC),
    ("ecc_uncorrected_volatile", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
     pynvml.NVML_VOLATILE_ECC),
)
_ECC_AGGREGATE = (
    ("ecc_corrected_aggregate", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
     pynvml.NVML_AGGREGATE_ECC),
    ("ecc_uncorrected_aggregate", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
     pynvml.NVML_AGGREGATE_ECC),
)
# NVLink error totals over every link, in the order NvLinkSample takes them.
_NVLINK_TOTAL_FIELDS = (
    pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
    pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
    pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
    pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
)


def _ecc_count(handle: Any, error_type: int, counter_type: int) -> int:
    return int(pynvml.nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type))


class NvmlUnavailable(Exception):
    """NVML could not be initialised: no driver, or the library is missing."""


class NvmlCallFailed(Exception):
    """An NVML call failed in a way that is neither "not supported" nor "GPU lost"."""


class GpuLost(Exception):
    """The GPU answered NVML_ERROR_GPU_IS_LOST (fallen off the bus, XID 79)."""


@dataclass(frozen=True, slots=True)
class Enumeration:
    """What ``Nvml.enumerate`` found: the GPUs it can probe, and those it could not open."""

    gpus: list[GpuIdentity]
    refused: dict[int, str]  # GPU index → why NVML gave no handle for it


@dataclass(frozen=True, slots=True)
class DriverInfo:
    driver_version: str
    nvml_version: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """One NVML session: initialise once, then sample GPUs by index from any thread."""

    def __init__(self) -> None:
        self._handles: dict[int, Any] = {}
        self._slow: dict[int, dict[str, Any]] = {}  # last detailed read per GPU

    def init(self) -> DriverInfo:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML initialisation failed: {exc}") from exc
        return DriverInfo(
            driver_version=_text(pynvml.nvmlSystemGetDriverVersion()),
            nvml_version=_text(pynvml.nvmlSystemGetNVMLVersion()),
        )

    def shutdown(self) -> None:
        self._handles.clear()
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # shutting down anyway; nothing useful to do with the error

    def enumerate(self) -> Enumeration:
        """Every GPU the driver counts. A GPU already lost here keeps its index, unknown
        UUID; a GPU NVML cannot open at all is in ``refused`` with the reason, and the
        others are still returned — one broken GPU must not blind the agent to the rest."""
        result = []
        refused: dict[int, str] = {}
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise NvmlCallFailed(f"cannot count GPUs: {exc}") from exc
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                refused[index] = f"cannot get a handle: {exc}"
                continue
            self._handles[index] = handle
            try:
                ident = GpuIdentity(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    minor=self._minor(handle),
                )
            except pynvml.NVMLError:
                ident = GpuIdentity(index=index, uuid=f"unknown-{index}", pci_bus_id="unknown",
                                    name="unknown")
            result.append(ident)
        return Enumeration(result, refused)

    @staticmethod
    def _minor(handle: Any) -> int | None:
        try:
            return int(pynvml.nvmlDeviceGetMinorNumber(handle))
        except pynvml.NVMLError:
            return None

    def sample(self, index: int, detail: bool = True) -> GpuSample:
        """Read the health fields of GPU ``index``. Blocks; run it under a deadline.

        With ``detail=False`` the slow-moving fields — NVLink state and error counters (5
        calls per link, 90 on an 18-link H100), lifetime ECC counts, retired pages,
        temperature thresholds, power limit and the rated PCIe limits — are taken from the
        last detailed sample of this GPU. Reading them every second was most of the
        agent's CPU; the caller decides how often a detailed sample is due. (A link that
        goes down also raises XID 74, which arrives at once through the event set.)
        """
        handle = self._handles[index]
        started = time.monotonic()
        errors: dict[str, str] = {}

        def read(name: str, fn: Callable[[], T]) -> T | None:
            try:
                return fn()
            except pynvml.NVMLError as exc:
                code = exc.value
                if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise GpuLost(f"GPU {index} is lost") from exc
                if code not in _NOT_A_VALUE:
                    errors[name] = str(exc)
                return None

        slow = self._slow.get(index)
        try:
            if detail or slow is None:
                slow = self._read_slow(handle, read)
                self._slow[index] = slow
            values: dict[str, Any] = dict(slow)
            for key, err, cnt in _ECC_VOLATILE:
                values[key] = read(key, functools.partial(_ecc_count, handle, err, cnt))
            remap = read("remapped_rows", lambda: pynvml.nvmlDeviceGetRemappedRows(handle))
            if remap is not None:
                corr, unc, pending, failure = remap
                values.update(remap_correctable=int(corr), remap_uncorrectable=int(unc),
                              remap_pending=bool(pending), remap_failure=bool(failure))
            values["temperature_celsius"] = read("temperature", lambda: int(
                pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)))
            values["clocks_event_reasons"] = read("clocks_event_reasons",
                                                  lambda: self._clock_reasons(handle))
            power = read("power", lambda: int(pynvml.nvmlDeviceGetPowerUsage(handle)))
            values["power_watts"] = None if power is None else power / 1000
            energy = read("energy",
                          lambda: int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
            values["energy_joules"] = None if energy is None else energy / 1000
            values["pcie_generation"] = read("pcie_generation", lambda: int(
                pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)))
            values["pcie_width"] = read("pcie_width", lambda: int(
                pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)))
            values["pcie_replays"] = read("pcie_replays", lambda: int(
                pynvml.nvmlDeviceGetPcieReplayCounter(handle)))
        except GpuLost:
            self._slow.pop(index, None)
            return GpuSample(index=index, taken_at=started,
                             duration=time.monotonic() - started, lost=True)
        return GpuSample(index=index, taken_at=started, duration=time.monotonic() - started,
                         errors=errors, **values)

    def _read_slow(self, handle: Any, read: Callable[[str, Callable[[], Any]], Any]
                   ) -> dict[str, Any]:
        slow: dict[str, Any] = {}
        for key, err, cnt in _ECC_AGGREGATE:
            slow[key] = read(key, functools.partial(_ecc_count, handle, err, cnt))
        slow["retired_pages_sbe"] = read("retired_pages_sbe", lambda: len(
            pynvml.nvmlDeviceGetRetiredPages(
                handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)))
        slow["retired_pages_dbe"] = read("retired_pages_dbe", lambda: len(
            pynvml.nvmlDeviceGetRetiredPages(
                handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)))
        slow["retired_pages_pending"] = read("retired_pages_pending", lambda: bool(
            pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle)))
        slow["slowdown_celsius"] = read("slowdown_threshold", lambda: int(
            pynvml.nvmlDeviceGetTemperatureThreshold(
                handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)))
        slow["shutdown_celsius"] = read("shutdown_threshold", lambda: int(
            pynvml.nvmlDeviceGetTemperatureThreshold(
                handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)))
        limit = read("power_limit", lambda: int(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)))
        slow["power_limit_watts"] = None if limit is None else limit / 1000
        slow["nvlink"] = read("nvlink_counters", lambda: self._nvlink_counters(handle))
        slow["pcie_generation_max"] = read("pcie_generation_max", lambda: int(
            pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)))
        slow["pcie_width_max"] = read("pcie_width_max", lambda: int(
            pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)))
        return slow

    @staticmethod
    def _clock_reasons(handle: Any) -> int:
        try:
            return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
        except pynvml.NVMLError_FunctionNotFound:  # drivers before the 535 rename
            return int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    @staticmethod
    def _link_count_and_states(handle: Any) -> list[bool]:
        states = []
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                states.append(bool(pynvml.nvmlDeviceGetNvLinkState(handle, link)))
            except (pynvml.NVMLError_InvalidArgument, pynvml.NVMLError_NotSupported):
                break  # past the last link this GPU has
        return states

    def _nvlink_counters(self, handle: Any) -> NvLinkSample | None:
        states = self._link_count_and_states(handle)
        if not states:
            return None
        totals = self._nvlink_totals(handle)
        if totals is None:  # no field values (older drivers): each link's counters in turn
            totals = [0, 0, 0, 0]
            counters = (pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
                        pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
                        pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
                        pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA)
            for link in range(len(states)):
                for i, counter in enumerate(counters):
                    with contextlib.suppress(pynvml.NVMLError_NotSupported):
                        totals[i] += int(pynvml.nvmlDeviceGetNvLinkErrorCounter(
                            handle, link, counter))
        return NvLinkSample(links=len(states), active=sum(states), replay_errors=totals[0],
                            recovery_errors=totals[1], crc_flit_errors=totals[2],
                            crc_data_errors=totals[3])

    @staticmethod
    def _nvlink_totals(handle: Any) -> list[int] | None:
        """The four error counters summed over every link, in one call (NVML's field
        values, as DCGM reads them) rather than one call per link and counter — 72 on an
        H100, the largest part of a detail sample. None where the driver cannot."""
        try:
            values = pynvml.nvmlDeviceGetFieldValues(handle, list(_NVLINK_TOTAL_FIELDS))
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
            return None
        if any(v.nvmlReturn != pynvml.NVML_SUCCESS for v in values):
            return None
        return [int(v.value.ullVal) for v in values]

    def open_xid_events(self, indices: list[int]) -> XidEventSet:
        """Register every GPU in ``indices`` for XID events. GPUs that refuse are skipped."""
        try:
            event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as exc:
            raise NvmlCallFailed(f"cannot create an NVML event set: {exc}") from exc
        registered: dict[int, int] = {}
        refused: dict[int, str] = {}
        for index in indices:
            handle = self._handles[index]
            try:
                pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError,
                                                event_set)
            except pynvml.NVMLError as exc:
                refused[index] = str(exc)
                continue
            address = ctypes.cast(handle, ctypes.c_void_p).value
            if address is not None:
                registered[address] = index
        return XidEventSet(event_set, registered, refused)


class XidEventSet:
    """A registered NVML event set. ``wait`` blocks up to ``timeout_ms`` for one XID."""

    def __init__(self, event_set: Any, by_address: dict[int, int], refused: dict[int, str]
                 ) -> None:
        self._set = event_set
        self._by_address = by_address
        self.refused = refused

    @property
    def gpus(self) -> list[int]:
        return sorted(self._by_address.values())

    def wait(self, timeout_ms: int) -> XidEvent | None:
        try:
            data = pynvml.nvmlEventSetWait(self._set, timeout_ms)
        except pynvml.NVMLError_Timeout:
            return None
        except pynvml.NVMLError as exc:
            raise NvmlCallFailed(f"waiting for NVML events failed: {exc}") from exc
        received_at, wall = time.monotonic(), time.time()
        if not data.eventType & pynvml.nvmlEventTypeXidCriticalError:
            return None
        address = ctypes.cast(data.device, ctypes.c_void_p).value
        index = self._by_address.get(address if address is not None else -1, -1)
        return XidEvent(gpu_index=index, xid=int(data.eventData), received_at=received_at,
                        received_wall=wall)

    def close(self) -> None:
        try:
            pynvml.nvmlEventSetFree(self._set)
        except pynvml.NVMLError:
            pass  # closing on the way out; a failing free changes nothing
