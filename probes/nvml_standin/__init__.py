"""Fault-injectable stand-in for ``libnvidia-ml.so.1`` (NVML).

Why this exists: no machine that runs the gpu-supervisor tests has a GPU, yet
the supervisor must be exercised through the *real* ``pynvml`` bindings
(package ``nvidia-ml-py``) so that struct layouts, error classes and call
patterns are the ones production sees.  ``fakenvml.c`` is a small C library
with soname ``libnvidia-ml.so.1`` that answers the NVML calls the supervisor
uses from a plain-text state directory, which tests rewrite while the process
under test runs (ECC counts, throttle reasons, a lost GPU, a hanging call, XID
events through the event-set API).

Loading it
----------
* ``LD_LIBRARY_PATH=$(python -m probes.nvml_standin build | xargs dirname)``
  (or :func:`library_dir`) before the process starts, or
* :func:`preload` (``ctypes.CDLL(path, RTLD_GLOBAL)``) before the first
  ``pynvml.nvmlInit()``: pynvml does ``CDLL("libnvidia-ml.so.1")`` and glibc's
  dlopen returns an already loaded object whose soname matches.

``$GPUSUP_FAKENVML_DIR`` names the state directory.  It is read at every
``nvmlInit*`` call, so one process can init, shut down and re-init against a
different directory.  Unset or not a directory: init fails with
``NVML_ERROR_DRIVER_NOT_LOADED`` (9), like a host without the driver.
Use :class:`probes.nvml_standin.control.StandinControl` to write it.

``state`` file
--------------
Text, one ``key=value`` per line; blank lines and lines starting with ``#``
are ignored; surrounding whitespace is stripped; the last occurrence of a key
wins; unknown keys and unparsable values are ignored (the default stays).
Integers are decimal or ``0x`` hex.  Writers must replace the file atomically
(write a temporary file in the same directory, then ``rename``); the library
``stat``\\ s it on every call and re-parses when device, inode, size, mtime or
ctime changed.  Missing keys take the defaults of a healthy H100 SXM.

Global keys:

=========================  ====================  =========================================
key                        default               answers
=========================  ====================  =========================================
``gpu_count``              0 (max 256)           nvmlDeviceGetCount_v2 (live: may change)
``driver_version``         ``550.54.15``         nvmlSystemGetDriverVersion
``nvml_version``           ``12.550.54.15``      nvmlSystemGetNVMLVersion
``cuda_driver_version``    12040                 nvmlSystemGetCudaDriverVersion(_v2)
``init_error``             0                     nonzero: nvmlInit* returns this NVML code
=========================  ====================  =========================================

Per-GPU keys ``gpu.<N>.<key>`` (N < gpu_count; others are ignored):

=============================  ===========================  ========================================
key                            default                      answers
=============================  ===========================  ========================================
``name``                       ``NVIDIA H100 80GB HBM3``    nvmlDeviceGetName
``uuid``                       ``GPU-fa4e0000-0000-4000-    nvmlDeviceGetUUID, GetHandleByUUID
                               8000-<N as %012x>``
``serial``                     ``1654922<N as %06u>``       nvmlDeviceGetSerial
``pci_bus_id``                 ``00000000:<bus>:00.0``;     nvmlDeviceGetPciInfo_v3 (busId, domain,
                               bus 18,2A,3A,5D,9A,AB,BA,DB  bus, device, busIdLegacy),
                               for N<8, else domain 1,      GetHandleByPciBusId_v2
                               bus N
``pci_device_id``              0x233010DE                   PciInfo.pciDeviceId
``pci_subsystem_id``           0x16C110DE                   PciInfo.pciSubSystemId
``minor``                      N                            nvmlDeviceGetMinorNumber
``ecc_mode``                   1                            nvmlDeviceGetEccMode (current=pending);
                                                            0 makes GetTotalEccErrors NOT_SUPPORTED
``ecc.corrected.volatile``     0                            GetTotalEccErrors(CORRECTED=0,
                                                            VOLATILE=0)
``ecc.corrected.aggregate``    0                            GetTotalEccErrors(0, AGGREGATE=1)
``ecc.uncorrected.volatile``   0                            GetTotalEccErrors(UNCORRECTED=1, 0)
``ecc.uncorrected.aggregate``  0                            GetTotalEccErrors(1, 1)
``retired.sbe``                0                            GetRetiredPages(_v2)(cause 0) count
``retired.dbe``                0                            GetRetiredPages(_v2)(cause 1) count
``retired.pending``            0                            GetRetiredPagesPendingStatus
``remap.correctable``          0                            GetRemappedRows corrRows
``remap.uncorrectable``        0                            GetRemappedRows uncRows
``remap.pending``              0                            GetRemappedRows isPending
``remap.failure``              0                            GetRemappedRows failureOccurred
``temp``                       45                           GetTemperature(GPU=0); other sensors:
                                                            INVALID_ARGUMENT
``temp.slowdown``              87                           GetTemperatureThreshold(SLOWDOWN=1)
``temp.shutdown``              92                           GetTemperatureThreshold(SHUTDOWN=0);
                                                            other thresholds: NOT_SUPPORTED
``clocks_event_reasons``       0                            GetCurrentClocksEventReasons and
                                                            GetCurrentClocksThrottleReasons (NVML
                                                            bits: SwPowerCap 0x4, HwSlowdown 0x8,
                                                            SwThermal 0x20, HwThermal 0x40,
                                                            HwPowerBrake 0x80, ...)
``power_mw``                   250000                       GetPowerUsage (mW)
``power_limit_mw``             700000                       GetEnforcedPowerLimit (mW)
``energy_mj``                  0                            GetTotalEnergyConsumption (mJ)
``memory.total_bytes``         85899345920                  GetMemoryInfo (v1) total
``memory.used_bytes``          0                            GetMemoryInfo used; free = total - used
``nvlink.count``               18 (max 36)                  links that exist; link >= count gives
                                                            INVALID_ARGUMENT, count 0 NOT_SUPPORTED
``nvlink.<K>.active``          1                            GetNvLinkState(K)
``nvlink.<K>.replay``          0                            GetNvLinkErrorCounter(K, DL_REPLAY=0)
``nvlink.<K>.recovery``        0                            GetNvLinkErrorCounter(K, DL_RECOVERY=1)
``nvlink.<K>.crc_flit``        0                            GetNvLinkErrorCounter(K, DL_CRC_FLIT=2)
``nvlink.<K>.crc_data``        0                            GetNvLinkErrorCounter(K, DL_CRC_DATA=3)
``nvlink.<K>.ecc_data``        0                            GetNvLinkErrorCounter(K, DL_ECC_DATA=4)
(NVLink counters)              summed over the links        nvmlDeviceGetFieldValues: the NVLink
                                                            *_ERROR_COUNT_TOTAL fields (replay 52,
                                                            recovery 59, CRC flit 38, CRC data 45,
                                                            ECC data 160); other fields answer
                                                            NOT_SUPPORTED in their entry
``pcie.gen`` / ``gen_max``     5 / 5                        GetCurrPcieLinkGeneration / GetMax...
``pcie.width`` / ``width_max`` 16 / 16                      GetCurrPcieLinkWidth / GetMax...
``pcie.replay``                0                            GetPcieReplayCounter
``supported_events``           0xF                          GetSupportedEventTypes; RegisterEvents
                                                            of other bits: NOT_SUPPORTED
=============================  ===========================  ========================================

Fault knobs (per GPU):

``lost`` (0/1)
    Every call taking that GPU's handle returns ``NVML_ERROR_GPU_IS_LOST``
    (15).  ``nvmlDeviceGetHandleByIndex_v2`` still succeeds, and event sets
    the GPU was registered on keep delivering its events.
``hang_ms``
    Every call taking that GPU's handle first sleeps this long, holding no
    lock, then answers from the state current at that moment.  The knob is
    re-read every 20 ms while sleeping, so clearing it releases blocked calls.
``hang_until_ms``
    Nonzero: the hang ends at this wall-clock time (Unix milliseconds): calls blocked in
    it return then and later calls do not block (``control hang GPU SECONDS``).
``hang_calls``
    Comma list of NVML function names the hang applies to; empty (or ``*``)
    means all handle-taking calls.  A name matches with or without its
    ``_vN`` suffix (``nvmlDeviceGetPciInfo`` covers ``..._v3``).
    ``nvmlDeviceGetHandleByIndex`` hangs only when named explicitly.
``handle_error``
    Nonzero: ``nvmlDeviceGetHandleByIndex(_v2)`` of that GPU returns this NVML
    code (e.g. 999 ``NVML_ERROR_UNKNOWN``), as for a GPU the driver enumerates but
    cannot open.
``unsupported``
    Comma list of function names (same matching; ``*`` = all handle-taking
    calls) that return ``NVML_ERROR_NOT_SUPPORTED`` (3) for that GPU.

Order of checks in a device call: uninitialized (1), bad handle (2), handle
of a GPU index >= the current ``gpu_count`` (15), hang, ``lost`` (15),
``unsupported`` (3), argument-specific errors, answer.

``events`` file
---------------
Append-only text; each complete (newline-terminated) line is one of::

    xid <gpu> <code> [count]                   # count defaults to 1
    event <gpu> <eventType> <eventData> [count] # any NVML event type bit

Blank lines, ``#`` comments and malformed lines are skipped.  An event set
delivers, in file order, every line appended after ``nvmlEventSetCreate``
(the file size is recorded then) and after the GPU was registered on that set
with a matching type (XID is ``nvmlEventTypeXidCriticalError`` = 0x8).  Each
``nvmlEventSetWait_v2`` returns one event: ``device`` = that GPU's handle,
``eventType``, ``eventData`` = the XID code, ``gpuInstanceId`` =
``computeInstanceId`` = 0xFFFFFFFF; a line with ``count`` N yields N events
from an in-memory counter.  With nothing pending it waits up to
``timeoutms`` (inotify on the directory, so appends wake it at once) and
returns ``NVML_ERROR_TIMEOUT`` (10); without inotify (or with
``GPUSUP_FAKENVML_NO_INOTIFY=1`` in the environment at nvmlEventSetCreate) it
polls the file every 2 ms instead.  Sets are independent of one another.
If the file shrinks below a set's read position it is treated as a new file
read from the start.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = [
    "SONAME",
    "STATE_DIR_ENV",
    "StandinBuildError",
    "build",
    "library_dir",
    "preload",
]

SONAME = "libnvidia-ml.so.1"
"""File name and soname of the built library: what pynvml dlopens."""

STATE_DIR_ENV = "GPUSUP_FAKENVML_DIR"
"""Environment variable naming the state directory, read at each nvmlInit."""

_SOURCE = Path(__file__).with_name("fakenvml.c")
_COMPILER = "cc"
_CFLAGS: tuple[str, ...] = (
    "-shared",
    "-fPIC",
    "-O2",
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    f"-Wl,-soname,{SONAME}",
)
_LIBS: tuple[str, ...] = ("-lpthread",)

_preload_lock = threading.Lock()
_preloaded: dict[str, tuple[str, ctypes.CDLL]] = {}  # resolved path -> (sha256, handle)


class StandinBuildError(RuntimeError):
    """Compiling fakenvml.c failed; the message carries the compiler's stderr."""


def _default_cache_dir() -> Path:
    """Return the per-user build cache, so repeated test runs skip compiling."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpu-supervisor" / "fakenvml"


def _build_key(source: bytes) -> str:
    """Hash the source and the compile command so either change forces a rebuild."""
    h = hashlib.sha256(source)
    h.update(b"\0" + " ".join((_COMPILER, *_CFLAGS, *_LIBS)).encode())
    return h.hexdigest()[:16]


def build(cache_dir: Path | None = None) -> Path:
    """Compile the stand-in (once per source version) and return the .so path.

    The library lands in ``<cache_dir>/<hash>/libnvidia-ml.so.1`` (default
    cache dir ``${XDG_CACHE_HOME:-~/.cache}/gpu-supervisor/fakenvml``).  It is
    compiled in a private temporary directory that is then renamed into
    place, so concurrent builders (pytest-xdist workers, CI jobs) never see a
    half-written library; the loser of the rename race reuses the winner's.
    """
    source = _SOURCE.read_bytes()
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    key = _build_key(source)
    final_dir = root / key
    lib = final_dir / SONAME
    if lib.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        # Compile the exact bytes that were hashed, even if the file changes meanwhile.
        src_copy = tmp / _SOURCE.name
        src_copy.write_bytes(source)
        cmd = [_COMPILER, *_CFLAGS, "-o", str(tmp / SONAME), str(src_copy), *_LIBS]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError as exc:
            raise StandinBuildError(f"C compiler {_COMPILER!r} not found: {exc}") from exc
        if proc.returncode != 0:
            raise StandinBuildError(
                f"building {SONAME} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr}"
            )
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not lib.is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


def library_dir(cache_dir: Path | None = None) -> Path:
    """Build if needed and return the directory to put on ``LD_LIBRARY_PATH``."""
    return build(cache_dir).parent


def preload(path: Path) -> None:
    """Load the stand-in globally so a later ``pynvml.nvmlInit()`` binds to it.

    pynvml opens ``libnvidia-ml.so.1`` by name; glibc hands back an object
    already loaded with that soname, so this works without ``LD_LIBRARY_PATH``
    as long as it runs before pynvml's first ``nvmlInit``.  Calling it again
    with the same library (same path or identical bytes) is a no-op; a
    *different* library raises, because the first one would silently win.
    """
    resolved = str(Path(path).resolve())
    digest = hashlib.sha256(Path(resolved).read_bytes()).hexdigest()
    with _preload_lock:
        if resolved in _preloaded:
            return
        for other, (other_digest, _) in _preloaded.items():
            if other_digest == digest:
                return
            raise RuntimeError(
                f"{SONAME} from {other} is already preloaded; {resolved} would be shadowed by it"
            )
        _preloaded[resolved] = (digest, ctypes.CDLL(resolved, mode=ctypes.RTLD_GLOBAL))
