"""The fake libnvidia-ml.so.1, exercised through the real pynvml bindings.

Every scenario runs pynvml in a child process (``LD_LIBRARY_PATH`` pointing at
the built stand-in, ``GPUSUP_FAKENVML_DIR`` at a per-test state directory) so
library state never leaks between tests.  The child is driven over a JSON-lines
RPC on stdin/stdout; that lets the test change state between two pynvml calls
of the *same* process, which is what "picked up live" means.  No assertion
depends on tight timing; the few that measure time use bounds of seconds.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import probes.nvml_standin as standin
from probes.nvml_standin import SONAME, STATE_DIR_ENV, StandinBuildError, build, library_dir
from probes.nvml_standin.control import (
    StandinControl,
    default_pci_bus_id,
    default_serial,
    default_uuid,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RPC_TIMEOUT_S = 60.0
XID = 0x8
NO_INSTANCE = 0xFFFFFFFF

# The child: a tiny RPC server around pynvml.  Device arguments are passed as
# GPU indices and turned into handles here; results are made JSON-friendly.
CHILD = r"""
import ctypes, json, os, sys, threading, time
import pynvml

handles = {}
addr_to_gpu = {}
sets = {}
background = {}

def handle(i):
    if i not in handles:
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        handles[i] = h
        addr_to_gpu[ctypes.cast(h, ctypes.c_void_p).value] = i
    return handles[i]

def conv(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple, ctypes.Array)):
        return [conv(x) for x in v]
    if isinstance(v, dict):
        return {k: conv(x) for k, x in v.items()}
    if isinstance(v, (ctypes.Structure, ctypes.Union)):
        return {f[0]: conv(getattr(v, f[0])) for f in v._fields_}
    if isinstance(v, ctypes._Pointer):
        return {"gpu": addr_to_gpu.get(ctypes.cast(v, ctypes.c_void_p).value, -1)}
    return repr(v)

def err(e):
    return {"error": type(e).__name__, "code": e.value, "message": str(e)}

def timed(fn):
    t0 = time.perf_counter()
    try:
        out = {"value": conv(fn())}
    except pynvml.NVMLError as e:
        out = err(e)
    out["elapsed"] = time.perf_counter() - t0
    return out

def op_call(req):
    def run():
        args = list(req.get("args", []))
        if req.get("gpu") is not None:
            args.insert(0, handle(req["gpu"]))
        return getattr(pynvml, req["fn"])(*args)
    return timed(run)

def op_reads(req):
    return {"value": [op_call(c) for c in req["calls"]]}

def op_wait(req):
    return timed(lambda: pynvml.nvmlEventSetWait_v2(sets[req["set"]], req["timeout_ms"]))

def op_drain(req):
    events, counts, n = [], {}, 0
    while True:
        try:
            d = pynvml.nvmlEventSetWait_v2(sets[req["set"]], req["timeout_ms"])
        except pynvml.NVMLError as e:
            end = type(e).__name__
            return {"value": {"count": n, "counts": counts, "events": events, "end": end}}
        n += 1
        ev = [addr_to_gpu.get(ctypes.cast(d.device, ctypes.c_void_p).value, -1),
              d.eventType, d.eventData, d.gpuInstanceId, d.computeInstanceId]
        key = json.dumps(ev)
        counts[key] = counts.get(key, 0) + 1
        if len(events) < 100:
            events.append(ev)

def op_hammer(req):
    seen, errors = set(), set()
    def worker(gpu):
        for _ in range(req["iterations"]):
            try:
                seen.add(pynvml.nvmlDeviceGetTemperature(handle(gpu), 0))
            except pynvml.NVMLError as e:
                errors.add(type(e).__name__)
    threads = [threading.Thread(target=worker, args=(g,)) for g in req["gpus"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"value": {"seen": sorted(seen), "errors": sorted(errors)}}

def op_bg_start(req):
    box = {}
    t = threading.Thread(target=lambda: box.update(result=dispatch(req["req"])), daemon=True)
    background[req["id"]] = (t, box)
    t.start()
    return {"value": None}

def op_bg_join(req):
    t, box = background.pop(req["id"])
    t.join(req.get("timeout", 45))
    return box.get("result", {"crash": "background request still running"})

def op_set_create(req):
    def run():
        sets[req["id"]] = pynvml.nvmlEventSetCreate()
    return timed(run)

def op_register(req):
    return timed(lambda: pynvml.nvmlDeviceRegisterEvents(handle(req["gpu"]), req["types"],
                                                         sets[req["set"]]))

def op_set_free(req):
    return timed(lambda: pynvml.nvmlEventSetFree(sets.pop(req["id"])))

def op_setenv(req):
    os.environ[req["name"]] = req["value"]
    return {"value": None}

def op_error_str(req):
    return {"value": str(pynvml.NVMLError(req["code"]))}

OPS = {
    "init": lambda req: timed(pynvml.nvmlInit),
    "shutdown": lambda req: timed(pynvml.nvmlShutdown),
    "call": op_call, "reads": op_reads, "wait": op_wait, "drain": op_drain,
    "hammer": op_hammer, "bg_start": op_bg_start, "bg_join": op_bg_join,
    "set_create": op_set_create, "register": op_register, "set_free": op_set_free,
    "setenv": op_setenv, "error_str": op_error_str,
}

def dispatch(req):
    try:
        return OPS[req["op"]](req)
    except Exception as e:
        return {"crash": repr(e)}

for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "exit":
        break
    sys.stdout.write(json.dumps(dispatch(req)) + "\n")
    sys.stdout.flush()
"""


class ChildNvmlError(Exception):
    """A pynvml call in the child raised ``NVMLError_<name>`` with NVML code ``code``."""

    def __init__(self, name: str, code: int, message: str) -> None:
        super().__init__(f"{name} ({code}): {message}")
        self.name = name
        self.code = code


class NvmlChild:
    """A child Python process that runs pynvml against the stand-in on request."""

    def __init__(
        self,
        lib_dir: Path | None,
        state_dir: Path | None,
        stderr_path: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        env = dict(os.environ)
        env.pop("LD_LIBRARY_PATH", None)
        env.pop(STATE_DIR_ENV, None)
        if lib_dir is not None:
            env["LD_LIBRARY_PATH"] = str(lib_dir)
        if state_dir is not None:
            env[STATE_DIR_ENV] = str(state_dir)
        env["PYTHONPATH"] = str(REPO_ROOT)
        env.update(extra_env or {})
        self._stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )

    def __enter__(self) -> NvmlChild:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fail(self, why: str) -> None:
        self._proc.kill()
        self._proc.wait()
        self._stderr.flush()
        pytest.fail(f"{why}; child stderr:\n{self._stderr_path.read_text()}")

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the child's JSON answer."""
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], RPC_TIMEOUT_S)
        if not ready:
            self._fail(f"no answer to {op} within {RPC_TIMEOUT_S}s")
        line = self._proc.stdout.readline()
        if not line:
            self._fail(f"child exited during {op}")
        out: dict[str, Any] = json.loads(line)
        if "crash" in out:
            self._fail(f"child crashed in {op}: {out['crash']}")
        return out

    def call(self, fn: str, gpu: int | None = None, *args: Any) -> Any:
        """Call ``pynvml.<fn>(handle(gpu), *args)`` in the child; re-raise NVML errors."""
        return unwrap(self.request("call", fn=fn, gpu=gpu, args=list(args)))

    def close(self) -> None:
        """Ask the child to exit and reap it (never leaves a zombie or open pipe)."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write('{"op": "exit"}\n')
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        try:
            self._proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
        self._stderr.close()


def unwrap(out: dict[str, Any]) -> Any:
    """Return a call result's value or raise its NVML error."""
    if "error" in out:
        raise ChildNvmlError(out["error"], out["code"], out["message"])
    return out["value"]


def outcome(out: dict[str, Any]) -> Any:
    """A call result as one comparable value: the value, or ``!<error class>``."""
    return f"!{out['error']}" if "error" in out else out["value"]


# ---- fixtures ----


@pytest.fixture(scope="session")
def lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the stand-in once per session into a private cache."""
    return library_dir(tmp_path_factory.mktemp("fakenvml-cache"))


@pytest.fixture
def ctl(tmp_path: Path) -> StandinControl:
    """A fresh state directory describing two healthy GPUs."""
    control = StandinControl(tmp_path / "nvml")
    control.reset(2)
    return control


@pytest.fixture
def child(lib_dir: Path, ctl: StandinControl, tmp_path: Path) -> Iterator[NvmlChild]:
    """A pynvml child process bound to the stand-in, already through nvmlInit."""
    with NvmlChild(lib_dir, ctl.state_dir, tmp_path / "child.stderr") as proc:
        unwrap(proc.request("init"))
        yield proc


def new_set(child: NvmlChild, name: str, gpus: list[int], types: int = XID) -> None:
    """Create event set ``name`` in the child and register ``gpus`` on it."""
    unwrap(child.request("set_create", id=name))
    for gpu in gpus:
        unwrap(child.request("register", set=name, gpu=gpu, types=types))


def drain(child: NvmlChild, name: str, timeout_ms: int = 300) -> dict[str, Any]:
    """Collect events from set ``name`` until a wait of ``timeout_ms`` fails."""
    result: dict[str, Any] = unwrap(child.request("drain", set=name, timeout_ms=timeout_ms))
    return result


# ---- enumeration and identity ----


def test_enumerates_gpus_with_identity_and_pci_info(child: NvmlChild) -> None:
    """Count, handles, index, name, UUID, serial, minor and PCI info come back through pynvml."""
    assert child.call("nvmlDeviceGetCount") == 2
    assert child.call("nvmlSystemGetDriverVersion") == "550.54.15"
    assert child.call("nvmlSystemGetNVMLVersion") == "12.550.54.15"
    assert child.call("nvmlSystemGetCudaDriverVersion") == 12040
    assert child.call("nvmlSystemGetCudaDriverVersion_v2") == 12040
    for gpu in (0, 1):
        assert child.call("nvmlDeviceGetIndex", gpu) == gpu
        assert child.call("nvmlDeviceGetName", gpu) == "NVIDIA H100 80GB HBM3"
        assert child.call("nvmlDeviceGetUUID", gpu) == default_uuid(gpu)
        assert child.call("nvmlDeviceGetSerial", gpu) == default_serial(gpu)
        assert child.call("nvmlDeviceGetMinorNumber", gpu) == gpu
        pci = child.call("nvmlDeviceGetPciInfo", gpu)
        bus_id = default_pci_bus_id(gpu)
        assert pci["busId"] == bus_id
        assert pci["busIdLegacy"] == bus_id[4:]
        assert (pci["domain"], pci["bus"], pci["device"]) == (0, int(bus_id[9:11], 16), 0)
        assert pci["pciDeviceId"] == 0x233010DE
        assert pci["pciSubSystemId"] == 0x16C110DE
    by_uuid = child.call("nvmlDeviceGetHandleByUUID", None, default_uuid(1))
    by_bus = child.call("nvmlDeviceGetHandleByPciBusId", None, default_pci_bus_id(1))
    assert by_uuid == by_bus == {"gpu": 1}
    with pytest.raises(ChildNvmlError) as excinfo:
        child.call("nvmlDeviceGetHandleByIndex", None, 2)
    assert excinfo.value.name == "NVMLError_InvalidArgument"


# ---- every field, changed while the process runs ----


@dataclass(frozen=True)
class Field:
    """One state change and the pynvml read that must reflect it."""

    gpu: int | None  # None: ``updates`` are raw global keys
    updates: dict[str, int | str]
    fn: str
    args: tuple[Any, ...]
    before: Any
    after: Any
    project: Callable[[Any], Any] = lambda v: v


def _mem(v: Any) -> Any:
    return (v["total"], v["free"], v["used"]) if isinstance(v, dict) else v


def _pci(v: Any) -> Any:
    return (v["busId"], v["busIdLegacy"], v["bus"]) if isinstance(v, dict) else v


def _count(v: Any) -> Any:
    return len(v) if isinstance(v, list) else v


FIELDS = [
    Field(
        0,
        {"name": "NVIDIA A100-SXM4-80GB"},
        "nvmlDeviceGetName",
        (),
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-80GB",
    ),
    Field(
        0,
        {"uuid": "GPU-00000000-1111-2222-3333-444444444444"},
        "nvmlDeviceGetUUID",
        (),
        default_uuid(0),
        "GPU-00000000-1111-2222-3333-444444444444",
    ),
    Field(
        0,
        {"serial": "1320000000001"},
        "nvmlDeviceGetSerial",
        (),
        default_serial(0),
        "1320000000001",
    ),
    Field(0, {"minor": 7}, "nvmlDeviceGetMinorNumber", (), 0, 7),
    Field(
        0,
        {"pci_bus_id": "00000000:C1:00.0"},
        "nvmlDeviceGetPciInfo",
        (),
        ("00000000:18:00.0", "0000:18:00.0", 0x18),
        ("00000000:C1:00.0", "0000:C1:00.0", 0xC1),
        _pci,
    ),
    Field(0, {"ecc.corrected.volatile": 11}, "nvmlDeviceGetTotalEccErrors", (0, 0), 0, 11),
    Field(0, {"ecc.corrected.aggregate": 12}, "nvmlDeviceGetTotalEccErrors", (0, 1), 0, 12),
    Field(0, {"ecc.uncorrected.volatile": 13}, "nvmlDeviceGetTotalEccErrors", (1, 0), 0, 13),
    Field(0, {"ecc.uncorrected.aggregate": 2**40}, "nvmlDeviceGetTotalEccErrors", (1, 1), 0, 2**40),
    Field(0, {"retired.sbe": 2}, "nvmlDeviceGetRetiredPages", (0,), 0, 2, _count),
    Field(0, {"retired.dbe": 3}, "nvmlDeviceGetRetiredPages", (1,), 0, 3, _count),
    Field(0, {"retired.pending": 1}, "nvmlDeviceGetRetiredPagesPendingStatus", (), 0, 1),
    Field(
        0,
        {"remap.correctable": 4, "remap.uncorrectable": 5, "remap.pending": 1, "remap.failure": 1},
        "nvmlDeviceGetRemappedRows",
        (),
        [0, 0, 0, 0],
        [4, 5, 1, 1],
    ),
    Field(0, {"temp": 95}, "nvmlDeviceGetTemperature", (0,), 45, 95),
    Field(0, {"temp.shutdown": 90}, "nvmlDeviceGetTemperatureThreshold", (0,), 92, 90),
    Field(0, {"temp.slowdown": 80}, "nvmlDeviceGetTemperatureThreshold", (1,), 87, 80),
    Field(0, {"clocks_event_reasons": 0x48}, "nvmlDeviceGetCurrentClocksEventReasons", (), 0, 0x48),
    Field(
        0, {"clocks_event_reasons": 0x48}, "nvmlDeviceGetCurrentClocksThrottleReasons", (), 0, 0x48
    ),
    Field(0, {"power_mw": 400000}, "nvmlDeviceGetPowerUsage", (), 250000, 400000),
    Field(0, {"power_limit_mw": 500000}, "nvmlDeviceGetEnforcedPowerLimit", (), 700000, 500000),
    Field(
        0, {"energy_mj": 123456789012}, "nvmlDeviceGetTotalEnergyConsumption", (), 0, 123456789012
    ),
    Field(
        0,
        {"memory.total_bytes": 1000, "memory.used_bytes": 400},
        "nvmlDeviceGetMemoryInfo",
        (),
        (85899345920, 85899345920, 0),
        (1000, 600, 400),
        _mem,
    ),
    Field(0, {"nvlink.3.active": 0}, "nvmlDeviceGetNvLinkState", (3,), 1, 0),
    Field(0, {"nvlink.3.replay": 21}, "nvmlDeviceGetNvLinkErrorCounter", (3, 0), 0, 21),
    Field(0, {"nvlink.3.recovery": 22}, "nvmlDeviceGetNvLinkErrorCounter", (3, 1), 0, 22),
    Field(0, {"nvlink.3.crc_flit": 23}, "nvmlDeviceGetNvLinkErrorCounter", (3, 2), 0, 23),
    Field(0, {"nvlink.3.crc_data": 24}, "nvmlDeviceGetNvLinkErrorCounter", (3, 3), 0, 24),
    Field(
        0, {"nvlink.count": 4}, "nvmlDeviceGetNvLinkState", (17,), 1, "!NVMLError_InvalidArgument"
    ),
    Field(0, {"pcie.gen": 3}, "nvmlDeviceGetCurrPcieLinkGeneration", (), 5, 3),
    Field(0, {"pcie.gen_max": 4}, "nvmlDeviceGetMaxPcieLinkGeneration", (), 5, 4),
    Field(0, {"pcie.width": 8}, "nvmlDeviceGetCurrPcieLinkWidth", (), 16, 8),
    Field(0, {"pcie.width_max": 8}, "nvmlDeviceGetMaxPcieLinkWidth", (), 16, 8),
    Field(0, {"pcie.replay": 9}, "nvmlDeviceGetPcieReplayCounter", (), 0, 9),
    Field(0, {"supported_events": XID}, "nvmlDeviceGetSupportedEventTypes", (), 0xF, XID),
    Field(1, {"ecc_mode": 0}, "nvmlDeviceGetEccMode", (), [1, 1], [0, 0]),
    Field(1, {"ecc_mode": 0}, "nvmlDeviceGetTotalEccErrors", (0, 0), 0, "!NVMLError_NotSupported"),
    Field(
        None,
        {"driver_version": "535.161.08"},
        "nvmlSystemGetDriverVersion",
        (),
        "550.54.15",
        "535.161.08",
    ),
    Field(
        None,
        {"nvml_version": "12.535.161.08"},
        "nvmlSystemGetNVMLVersion",
        (),
        "12.550.54.15",
        "12.535.161.08",
    ),
    Field(None, {"cuda_driver_version": 12020}, "nvmlSystemGetCudaDriverVersion", (), 12040, 12020),
    Field(None, {"gpu_count": 3}, "nvmlDeviceGetCount", (), 2, 3),
]


def test_every_field_is_read_live_after_set(ctl: StandinControl, child: NvmlChild) -> None:
    """Each state key changes what pynvml reads, within one running process, without re-init."""
    calls = [{"fn": f.fn, "gpu": f.gpu, "args": list(f.args)} for f in FIELDS]

    def read_all() -> list[Any]:
        results = unwrap(child.request("reads", calls=calls))
        return [f.project(outcome(r)) for f, r in zip(FIELDS, results, strict=True)]

    assert read_all() == [f.before for f in FIELDS]
    updates: dict[str, int | str] = {}
    for f in FIELDS:
        prefix = "" if f.gpu is None else f"gpu.{f.gpu}."
        updates.update({prefix + key: value for key, value in f.updates.items()})
    ctl.update(updates)
    assert read_all() == [f.after for f in FIELDS]


def test_field_values_give_the_nvlink_error_totals_over_every_link(
        ctl: StandinControl, child: NvmlChild) -> None:
    """nvmlDeviceGetFieldValues answers the NVLink *_ERROR_COUNT_TOTAL fields with the sum
    over the GPU's links, in one call; a field it does not know is NOT_SUPPORTED in its own
    entry, and a GPU without NVLink answers every field so."""
    ctl.set(1, nvlink__count=4, nvlink__0__crc_flit=5, nvlink__3__crc_flit=7,
            nvlink__1__replay=11, nvlink__2__recovery=13, nvlink__3__crc_data=17)
    fields = [38, 45, 52, 59, 1]  # CRC flit, CRC data, replay, recovery totals; a temperature
    values = child.call("nvmlDeviceGetFieldValues", 1, fields)
    assert [v["fieldId"] for v in values] == fields
    assert [v["nvmlReturn"] for v in values] == [0, 0, 0, 0, 3]
    assert [v["value"]["ullVal"] for v in values[:4]] == [12, 17, 11, 13]
    assert all(v["valueType"] == 3 and v["timestamp"] > 0 for v in values[:4])
    ctl.set(1, nvlink__count=0)
    assert [v["nvmlReturn"] for v in child.call("nvmlDeviceGetFieldValues", 1, [38])] == [3]


def test_set_helper_maps_double_underscore_to_dots(ctl: StandinControl, child: NvmlChild) -> None:
    """``set(gpu, a__b=v)`` writes key ``gpu.N.a.b`` that the library honours."""
    ctl.set(1, ecc__uncorrected__volatile=3, nvlink__0__crc_flit=8, temp=77)
    assert child.call("nvmlDeviceGetTotalEccErrors", 1, 1, 0) == 3
    assert child.call("nvmlDeviceGetNvLinkErrorCounter", 1, 0, 2) == 8
    assert child.call("nvmlDeviceGetTemperature", 1, 0) == 77


def test_repeated_same_size_rewrites_are_all_seen(ctl: StandinControl, child: NvmlChild) -> None:
    """Back-to-back atomic rewrites of equal size are each picked up (no stale stat identity)."""
    for value in range(10, 60):
        ctl.set(0, temp=value)
        assert child.call("nvmlDeviceGetTemperature", 0, 0) == value


def test_retired_pages_follow_pynvml_two_call_pattern(
    ctl: StandinControl, child: NvmlChild
) -> None:
    """Retired pages answer the NULL-buffer size query, then fill distinct fake addresses."""
    assert child.call("nvmlDeviceGetRetiredPages", 0, 1) == []
    ctl.set(0, retired__dbe=3, retired__sbe=1)
    dbe = child.call("nvmlDeviceGetRetiredPages", 0, 1)
    sbe = child.call("nvmlDeviceGetRetiredPages", 0, 0)
    assert len(dbe) == 3
    assert len(sbe) == 1
    assert len(set(dbe) | set(sbe)) == 4
    v2 = child.call("nvmlDeviceGetRetiredPages_v2", 0, 1)
    assert [p["address"] for p in v2] == dbe


def test_out_of_range_arguments_are_rejected(ctl: StandinControl, child: NvmlChild) -> None:
    """Unknown sensors/counters are INVALID_ARGUMENT, other thresholds NOT_SUPPORTED."""
    cases = [
        ("nvmlDeviceGetTemperature", (1,), "NVMLError_InvalidArgument"),
        ("nvmlDeviceGetTemperatureThreshold", (3,), "NVMLError_NotSupported"),
        ("nvmlDeviceGetNvLinkState", (18,), "NVMLError_InvalidArgument"),
        ("nvmlDeviceGetNvLinkErrorCounter", (0, 7), "NVMLError_InvalidArgument"),
        ("nvmlDeviceGetTotalEccErrors", (2, 0), "NVMLError_InvalidArgument"),
    ]
    for fn, args, expected in cases:
        with pytest.raises(ChildNvmlError) as excinfo:
            child.call(fn, 0, *args)
        assert excinfo.value.name == expected, fn
    ctl.set(0, nvlink__count=0)
    with pytest.raises(ChildNvmlError) as excinfo:
        child.call("nvmlDeviceGetNvLinkState", 0, 0)
    assert excinfo.value.name == "NVMLError_NotSupported"


# ---- fault knobs ----


def test_unsupported_surfaces_as_not_supported(ctl: StandinControl, child: NvmlChild) -> None:
    """Functions listed in ``unsupported`` raise NVMLError_NotSupported on that GPU only."""
    ctl.unsupported(0, ["nvmlDeviceGetRemappedRows", "nvmlDeviceGetPciInfo"])
    for fn in ("nvmlDeviceGetRemappedRows", "nvmlDeviceGetPciInfo"):  # _v3 matched without suffix
        with pytest.raises(ChildNvmlError) as excinfo:
            child.call(fn, 0)
        assert excinfo.value.name == "NVMLError_NotSupported"
        assert excinfo.value.code == 3
    assert child.call("nvmlDeviceGetRemappedRows", 1) == [0, 0, 0, 0]
    assert child.call("nvmlDeviceGetTemperature", 0, 0) == 45
    ctl.unsupported(0, [])
    assert child.call("nvmlDeviceGetRemappedRows", 0) == [0, 0, 0, 0]


def test_lost_gpu_raises_gpu_is_lost_while_other_answers(
    ctl: StandinControl, child: NvmlChild
) -> None:
    """A lost GPU's calls raise NVMLError_GpuIsLost, its handle is still obtainable, GPU 0 works."""
    ctl.lose(1)
    with pytest.raises(ChildNvmlError) as excinfo:
        child.call("nvmlDeviceGetTemperature", 1, 0)
    assert excinfo.value.name == "NVMLError_GpuIsLost"
    assert excinfo.value.code == 15
    assert str(excinfo.value).endswith("GPU is lost")
    unwrap(child.request("call", fn="nvmlDeviceGetHandleByIndex", gpu=None, args=[1]))
    assert child.call("nvmlDeviceGetTemperature", 0, 0) == 45
    ctl.set(1, lost=0)
    assert child.call("nvmlDeviceGetTemperature", 1, 0) == 45


def test_gpu_beyond_shrunk_gpu_count_is_lost(ctl: StandinControl, child: NvmlChild) -> None:
    """A handle taken before gpu_count shrank below its index reports GPU_IS_LOST."""
    assert child.call("nvmlDeviceGetTemperature", 1, 0) == 45
    ctl.update({"gpu_count": 1})
    with pytest.raises(ChildNvmlError) as excinfo:
        child.call("nvmlDeviceGetTemperature", 1, 0)
    assert excinfo.value.name == "NVMLError_GpuIsLost"


def test_hang_delays_that_gpu_while_another_answers_promptly(
    ctl: StandinControl, child: NvmlChild
) -> None:
    """A 1.5 s hang on GPU 0 holds no lock: a concurrent GPU 1 call returns in well under 1 s."""
    for gpu in (0, 1):  # take both handles before the hang starts
        child.call("nvmlDeviceGetTemperature", gpu, 0)
    ctl.hang(0, 1.5)
    hung_req = {"op": "call", "fn": "nvmlDeviceGetTemperature", "gpu": 0, "args": [0]}
    child.request("bg_start", id="hung", req=hung_req)
    time.sleep(0.2)  # makes the overlap likely; nothing below depends on it
    other = child.request("call", fn="nvmlDeviceGetTemperature", gpu=1, args=[0])
    hung = child.request("bg_join", id="hung")
    assert outcome(other) == 45
    assert other["elapsed"] < 1.0
    assert outcome(hung) == 45
    assert hung["elapsed"] >= 1.5


def test_hang_calls_limits_the_hang_to_named_functions(
    ctl: StandinControl, child: NvmlChild
) -> None:
    """With ``hang_calls`` set, only the named functions block on that GPU."""
    child.call("nvmlDeviceGetTemperature", 0, 0)
    ctl.hang(0, 1.5, calls=["nvmlDeviceGetPowerUsage"])
    temp = child.request("call", fn="nvmlDeviceGetTemperature", gpu=0, args=[0])
    power = child.request("call", fn="nvmlDeviceGetPowerUsage", gpu=0)
    assert temp["elapsed"] < 1.0
    assert power["elapsed"] >= 1.5
    assert outcome(power) == 250000


def test_an_ending_hang_blocks_until_its_end_and_no_call_after_it(
    ctl: StandinControl, child: NvmlChild
) -> None:
    """``hang(..., ending=True)`` (the CLI's ``hang GPU SECONDS``): the GPU hangs for that
    long — a call made in it returns at the end, a call made after it does not block —
    where an every-call hang would block each call again."""
    child.call("nvmlDeviceGetTemperature", 0, 0)
    ctl.hang(0, 1.5, ending=True)
    first = child.request("call", fn="nvmlDeviceGetTemperature", gpu=0, args=[0])
    second = child.request("call", fn="nvmlDeviceGetTemperature", gpu=0, args=[0])
    assert outcome(first) == outcome(second) == 45
    assert first["elapsed"] >= 1.0
    assert second["elapsed"] < 1.0


def test_clear_hang_releases_a_blocked_call(ctl: StandinControl, child: NvmlChild) -> None:
    """Clearing a 120 s hang lets the call already blocked in it return long before that."""
    child.call("nvmlDeviceGetTemperature", 0, 0)
    ctl.hang(0, 120)
    hung_req = {"op": "call", "fn": "nvmlDeviceGetTemperature", "gpu": 0, "args": [0]}
    child.request("bg_start", id="hung", req=hung_req)
    time.sleep(0.3)
    ctl.clear_hang(0)
    hung = child.request("bg_join", id="hung")
    assert outcome(hung) == 45
    assert hung["elapsed"] < 30


def test_concurrent_calls_during_rewrites_never_fail(ctl: StandinControl, child: NvmlChild) -> None:
    """Threads hammering the library while state is rewritten only ever see written values."""
    req = {"op": "hammer", "gpus": [0, 1, 0, 1], "iterations": 3000}
    child.request("bg_start", id="hammer", req=req)
    for i in range(100):
        ctl.set(i % 2, temp=50 + i % 10)
    result = unwrap(child.request("bg_join", id="hammer"))
    assert result["errors"] == []
    assert set(result["seen"]) <= {45, *range(50, 60)}


# ---- init / shutdown / errors ----


def test_calls_after_shutdown_are_uninitialized(child: NvmlChild) -> None:
    """After the last nvmlShutdown the library answers NVML_ERROR_UNINITIALIZED."""
    unwrap(child.request("init"))  # refcounted: two inits need two shutdowns
    unwrap(child.request("shutdown"))
    assert child.call("nvmlDeviceGetCount") == 2
    unwrap(child.request("shutdown"))
    with pytest.raises(ChildNvmlError) as excinfo:
        child.call("nvmlDeviceGetCount")
    assert excinfo.value.name == "NVMLError_Uninitialized"


def test_reinit_reads_a_different_state_dir(
    ctl: StandinControl, child: NvmlChild, tmp_path: Path
) -> None:
    """nvmlInit reads GPUSUP_FAKENVML_DIR each time, so re-init can switch directories."""
    other = StandinControl(tmp_path / "other")
    other.reset(3)
    other.set(2, name="NVIDIA L40S")
    unwrap(child.request("shutdown"))
    child.request("setenv", name=STATE_DIR_ENV, value=str(other.state_dir))
    unwrap(child.request("init"))
    assert child.call("nvmlDeviceGetCount") == 3
    assert child.call("nvmlDeviceGetName", 2) == "NVIDIA L40S"


def test_init_fails_without_state_dir(lib_dir: Path, tmp_path: Path) -> None:
    """Without GPUSUP_FAKENVML_DIR, nvmlInit fails like a host without a driver."""
    with NvmlChild(lib_dir, None, tmp_path / "child.stderr") as proc:
        out = proc.request("init")
    assert out["error"] == "NVMLError_DriverNotLoaded"


def test_init_error_knob_fails_init(lib_dir: Path, ctl: StandinControl, tmp_path: Path) -> None:
    """``init_error`` makes nvmlInit return that NVML code (here a driver/library mismatch)."""
    ctl.update({"init_error": 18})
    with NvmlChild(lib_dir, ctl.state_dir, tmp_path / "child.stderr") as proc:
        out = proc.request("init")
    assert out["error"] == "NVMLError_LibRmVersionMismatch"


def test_error_strings_come_from_the_library(child: NvmlChild) -> None:
    """pynvml formats codes it has no text for via nvmlErrorString, which returns real text."""
    assert unwrap(child.request("error_str", code=19)) == "In use by another client"
    assert unwrap(child.request("error_str", code=27)) == "The system is not ready for the request"
    assert child.call("nvmlErrorString", None, 15) == "GPU is lost"


# ---- events ----


def test_xid_event_carries_code_and_device(ctl: StandinControl, child: NvmlChild) -> None:
    """An injected XID arrives via nvmlEventSetWait_v2 with its code, type and device handle."""
    new_set(child, "s", [0, 1])
    ctl.inject_xid(1, 79)
    event = unwrap(child.request("wait", set="s", timeout_ms=20000))
    assert event == {
        "device": {"gpu": 1},
        "eventType": XID,
        "eventData": 79,
        "gpuInstanceId": NO_INSTANCE,
        "computeInstanceId": NO_INSTANCE,
    }
    unwrap(child.request("set_free", id="s"))


def test_wait_without_events_times_out(child: NvmlChild) -> None:
    """With nothing pending, a wait raises NVMLError_Timeout."""
    new_set(child, "s", [0])
    out = child.request("wait", set="s", timeout_ms=100)
    assert out["error"] == "NVMLError_Timeout"
    assert out["code"] == 10


def test_xid_count_delivers_exactly_that_many(ctl: StandinControl, child: NvmlChild) -> None:
    """``xid 0 79 10000`` yields exactly 10000 events, then the wait times out."""
    new_set(child, "s", [0])
    ctl.inject_xid(0, 79, count=10000)
    result = drain(child, "s")
    assert result["count"] == 10000
    assert result["counts"] == {json.dumps([0, XID, 79, NO_INSTANCE, NO_INSTANCE]): 10000}
    assert result["end"] == "NVMLError_Timeout"


def test_events_file_order_filters_and_syntax(ctl: StandinControl, child: NvmlChild) -> None:
    """Only lines appended after set creation, for registered GPUs and types, arrive in order."""
    ctl.inject_xid(0, 13)  # before the set exists: never delivered
    new_set(child, "s", [0], types=XID | 0x2)
    with open(ctl.events_path, "a") as f:
        f.write("# comment\n\n")
        f.write("xid 1 43\n")  # GPU 1 is not registered on this set
        f.write("xid 0 48\n")
        f.write("bogus line here\n")
        f.write("xid 0 31 2\n")
        f.write("event 0 0x2 0\n")  # double-bit ECC event
        f.write("event 0 0x10 0\n")  # clock event: type not registered
    ctl.inject_xid(0, 94)
    result = drain(child, "s")
    assert [(e[0], e[1], e[2]) for e in result["events"]] == [
        (0, XID, 48),
        (0, XID, 31),
        (0, XID, 31),
        (0, 0x2, 0),
        (0, XID, 94),
    ]
    assert result["end"] == "NVMLError_Timeout"


def test_two_event_sets_are_independent(ctl: StandinControl, child: NvmlChild) -> None:
    """Each of two sets gets its own registered GPUs' events; draining one leaves the other."""
    new_set(child, "a", [0])
    new_set(child, "b", [0, 1])
    ctl.inject_xid(0, 48)
    ctl.inject_xid(1, 79)
    a = drain(child, "a")
    b = drain(child, "b")
    assert [(e[0], e[2]) for e in a["events"]] == [(0, 48)]
    assert [(e[0], e[2]) for e in b["events"]] == [(0, 48), (1, 79)]


def test_lost_gpu_still_delivers_xid(ctl: StandinControl, child: NvmlChild) -> None:
    """A set registered for a GPU that is then lost still delivers that GPU's XIDs."""
    new_set(child, "s", [0])
    ctl.lose(0)
    ctl.inject_xid(0, 79)
    event = unwrap(child.request("wait", set="s", timeout_ms=20000))
    assert (event["device"], event["eventData"]) == ({"gpu": 0}, 79)
    out = child.request("register", set="s", gpu=0, types=XID)
    assert out["error"] == "NVMLError_GpuIsLost"


def test_blocked_wait_wakes_on_append(ctl: StandinControl, child: NvmlChild) -> None:
    """A wait already blocked with a 30 s timeout returns the event appended meanwhile."""
    new_set(child, "s", [0])
    wait_req = {"op": "wait", "set": "s", "timeout_ms": 30000}
    child.request("bg_start", id="w", req=wait_req)
    time.sleep(0.3)
    ctl.inject_xid(0, 45)
    out = child.request("bg_join", id="w")
    assert outcome(out)["eventData"] == 45
    assert out["elapsed"] < 20


def test_polling_fallback_without_inotify_delivers(
    lib_dir: Path, ctl: StandinControl, tmp_path: Path
) -> None:
    """With inotify disabled, waits fall back to polling and still deliver bursts and timeouts."""
    no_inotify = {"GPUSUP_FAKENVML_NO_INOTIFY": "1"}
    with NvmlChild(lib_dir, ctl.state_dir, tmp_path / "child.stderr", no_inotify) as proc:
        unwrap(proc.request("init"))
        new_set(proc, "s", [1])
        wait_req = {"op": "wait", "set": "s", "timeout_ms": 30000}
        proc.request("bg_start", id="w", req=wait_req)
        time.sleep(0.3)
        ctl.inject_xid(1, 63, count=500)
        first = proc.request("bg_join", id="w")
        rest = drain(proc, "s")
    assert outcome(first)["eventData"] == 63
    assert first["elapsed"] < 20
    assert rest["count"] == 499
    assert rest["end"] == "NVMLError_Timeout"


def test_registering_unsupported_event_type_fails(child: NvmlChild) -> None:
    """Registering a type outside GetSupportedEventTypes raises NVMLError_NotSupported."""
    unwrap(child.request("set_create", id="s"))
    out = child.request("register", set="s", gpu=0, types=0x10)
    assert out["error"] == "NVMLError_NotSupported"


# ---- loading ----


def test_preload_binds_pynvml_without_ld_library_path(lib_dir: Path, ctl: StandinControl) -> None:
    """preload() (CDLL RTLD_GLOBAL) makes pynvml.nvmlInit() use the stand-in by soname."""
    lib = lib_dir / SONAME
    script = (
        "import json, pynvml\n"
        "from pathlib import Path\n"
        "from probes.nvml_standin import preload\n"
        f"preload(Path({str(lib)!r}))\n"
        f"preload(Path({str(lib)!r}))\n"
        "pynvml.nvmlInit()\n"
        "h = pynvml.nvmlDeviceGetHandleByIndex(0)\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps({'count': pynvml.nvmlDeviceGetCount(),\n"
        "                  'uuid': pynvml.nvmlDeviceGetUUID(h),\n"
        f"                  'mapped': {str(lib.resolve())!r} in maps}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env[STATE_DIR_ENV] = str(ctl.state_dir)
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=RPC_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"count": 2, "uuid": default_uuid(0), "mapped": True}


def test_build_reuses_cached_library(tmp_path: Path) -> None:
    """A second build() returns the same file untouched, and it carries the NVML soname."""
    first = build(tmp_path)
    mtime = first.stat().st_mtime_ns
    second = build(tmp_path)
    assert second == first
    assert second.stat().st_mtime_ns == mtime
    assert first.name == SONAME
    assert [p.name for p in tmp_path.iterdir()] == [first.parent.name]  # no temp dirs left
    readelf = shutil.which("readelf")
    if readelf is not None:
        dynamic = subprocess.run(
            [readelf, "-d", str(first)], capture_output=True, text=True, check=True
        ).stdout
        assert f"Library soname: [{SONAME}]" in dynamic


def test_build_failure_raises_with_compiler_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that does not compile raises StandinBuildError quoting the compiler's error."""
    broken = tmp_path / "fakenvml.c"
    broken.write_text("int broken( {\n")
    monkeypatch.setattr(standin, "_SOURCE", broken)
    cache = tmp_path / "cache"
    with pytest.raises(StandinBuildError, match="error"):
        build(cache)
    assert list(cache.iterdir()) == []


def test_module_cli_prints_library_path(tmp_path: Path) -> None:
    """``python -m probes.nvml_standin build`` prints the path of the built library."""
    proc = subprocess.run(
        [sys.executable, "-m", "probes.nvml_standin", "build", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=RPC_TIMEOUT_S,
        check=True,
    )
    path = Path(proc.stdout.strip())
    assert path.name == SONAME
    assert path.is_file()


# ---- control ----


def test_control_keeps_other_writers_changes(tmp_path: Path) -> None:
    """Two controls on one directory read each other's writes instead of clobbering them."""
    first = StandinControl(tmp_path / "d")
    first.reset(2)
    first.set(0, ecc__corrected__volatile=5, lost=True)
    second = StandinControl(tmp_path / "d")
    assert second.get("gpu.0.ecc.corrected.volatile") == "5"
    assert second.get("gpu.0.lost") == "1"
    second.update({"gpu.1.temp": 70})
    first.set(0, temp=80)
    assert first.get("gpu.1.temp") == "70"
    assert second.get("gpu.0.temp") == "80"
    assert (tmp_path / "d" / "events").is_file()
    assert [p.name for p in (tmp_path / "d").iterdir() if p.name.startswith(".state.")] == []


def test_control_rejects_values_the_parser_would_misread(ctl: StandinControl) -> None:
    """Keys with '=' or spaces, multi-line or negative values and bad names are refused."""
    with pytest.raises(ValueError, match="invalid state key"):
        ctl.update({"gpu.0.te mp": 1})
    with pytest.raises(ValueError, match="invalid state key"):
        ctl.update({"a=b": 1})
    with pytest.raises(ValueError, match="single line"):
        ctl.set(0, name="x\ny")
    with pytest.raises(ValueError, match="negative"):
        ctl.set(0, temp=-1)
    with pytest.raises(ValueError, match="invalid NVML function name"):
        ctl.unsupported(0, ["nvmlDeviceGetName,foo"])
    with pytest.raises(TypeError, match="sequence"):
        ctl.hang(0, 1, calls="nvmlDeviceGetName")


def test_control_cli_injects_faults(tmp_path: Path) -> None:
    """The control CLI writes the same state keys and event lines as the Python API."""
    state_dir = tmp_path / "d"

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "probes.nvml_standin.control", "--dir", str(state_dir), *args],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=RPC_TIMEOUT_S,
            check=True,
        )
        return proc.stdout

    cli("reset", "4")
    cli("set", "gpu.0.temp=95", "gpu.0.clocks_event_reasons=0x40")
    cli("xid", "0", "79", "--count", "3")
    cli("lose", "3")
    cli("hang", "2", "30", "--calls", "nvmlDeviceGetTemperature,nvmlDeviceGetPowerUsage")
    cli("unsupported", "1", "nvmlDeviceGetRemappedRows")
    assert cli("get", "gpu.0.temp").strip() == "95"
    values = StandinControl(state_dir).values()
    assert values["gpu_count"] == "4"
    assert values["gpu.0.clocks_event_reasons"] == "0x40"
    assert values["gpu.3.lost"] == "1"
    assert values["gpu.2.hang_ms"] == "30000"
    assert values["gpu.2.hang_calls"] == "nvmlDeviceGetTemperature,nvmlDeviceGetPowerUsage"
    assert values["gpu.1.unsupported"] == "nvmlDeviceGetRemappedRows"
    assert (state_dir / "events").read_text() == "xid 0 79 3\n"
    assert int(values["gpu.2.hang_until_ms"]) > time.time() * 1000  # ends in 30 s
    assert cli("clear-hang", "2").strip() == "GPU 2: hang cleared"
    assert StandinControl(state_dir).get("gpu.2.hang_ms") == "0"
    assert "every call blocks 30 s each, until clear-hang 2" in cli("hang", "2", "30",
                                                                    "--every-call")
    assert StandinControl(state_dir).get("gpu.2.hang_until_ms") == "0"
