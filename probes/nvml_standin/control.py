"""Write the NVML stand-in's state directory: health values, faults, XID events.

Why: tests (and humans, via the CLI) change what the fake ``libnvidia-ml.so.1``
reports while the supervisor keeps running.  The library re-reads ``state``
whenever its stat identity changes and tails ``events``; both formats are
documented in :mod:`probes.nvml_standin`.  This module owns the writer side:

* ``state`` is always rewritten whole and atomically (temporary file in the
  same directory + ``os.replace``) so the library never parses a torn file.
* The full key/value map is kept in memory; it is re-read (the file is a
  few KiB) under an ``flock`` on ``state.lock`` before every change, so
  several writers (other :class:`StandinControl` instances, the CLI, other
  processes) never lose each other's updates.
* ``events`` is only ever appended to, one whole line per ``write``.

CLI, for manual fault injection against a running supervisor::

    python -m probes.nvml_standin.control --dir D reset 8
    python -m probes.nvml_standin.control --dir D set gpu.0.temp=95 gpu.0.clocks_event_reasons=0x40
    python -m probes.nvml_standin.control --dir D xid 0 79 [--count N]
    python -m probes.nvml_standin.control --dir D lose 3
    python -m probes.nvml_standin.control --dir D hang 3 30 [--calls nvmlDeviceGetTemperature,...]
                                        # GPU 3's calls block for the next 30 s
    python -m probes.nvml_standin.control --dir D hang 3 30 --every-call
                                        # each call blocks 30 s, until clear-hang
    python -m probes.nvml_standin.control --dir D clear-hang 3
    python -m probes.nvml_standin.control --dir D unset gpu.5.temp   # back to its default
    python -m probes.nvml_standin.control --dir D unsupported 3 nvmlDeviceGetRemappedRows
    python -m probes.nvml_standin.control --dir D get gpu.0.temp
    python -m probes.nvml_standin.control --dir D show

``--dir`` defaults to ``$GPUSUP_FAKENVML_DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from probes.nvml_standin import STATE_DIR_ENV

__all__ = [
    "EVENTS_FILE",
    "STATE_FILE",
    "XID_EVENT_TYPE",
    "StandinControl",
    "default_pci_bus_id",
    "default_serial",
    "default_uuid",
    "main",
]

STATE_FILE = "state"
EVENTS_FILE = "events"
LOCK_FILE = "state.lock"
XID_EVENT_TYPE = 0x8
"""``nvmlEventTypeXidCriticalError``: what ``xid`` lines are delivered as."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


def default_uuid(gpu: int) -> str:
    """UUID the library reports for GPU ``gpu`` unless ``gpu.N.uuid`` is set."""
    return f"GPU-fa4e0000-0000-4000-8000-{gpu:012x}"


def default_serial(gpu: int) -> str:
    """Serial the library reports for GPU ``gpu`` unless ``gpu.N.serial`` is set."""
    return f"1654922{gpu:06d}"


def default_pci_bus_id(gpu: int) -> str:
    """PCI bus id the library reports unless set: HGX H100 buses for GPUs 0-7."""
    if gpu < len(_HGX_BUSES):
        return f"00000000:{_HGX_BUSES[gpu]:02X}:00.0"
    return f"00000001:{gpu & 0xFF:02X}:00.0"


def parse_state(text: str) -> dict[str, str]:
    """Parse ``state`` text with the library's rules (last occurrence wins)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def _format_value(value: int | str) -> str:
    """Render a value for the state file, rejecting what the parser would misread."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative values are not representable: {value}")
        return str(value)
    if "\n" in value or "\r" in value:
        raise ValueError(f"value must be a single line: {value!r}")
    return value.strip()


def _check_key(key: str) -> str:
    """Reject keys the library could never match (and that could break the file)."""
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid state key: {key!r}")
    return key


def _check_gpu(gpu: int) -> int:
    """GPU indices are non-negative; the library handles at most 256."""
    if not 0 <= gpu < 256:
        raise ValueError(f"GPU index out of range: {gpu}")
    return gpu


def _check_calls(calls: Sequence[str]) -> str:
    """Join NVML function names into the comma list the library expects."""
    if isinstance(calls, str):
        raise TypeError("pass a sequence of function names, not a single string")
    for name in calls:
        if not re.fullmatch(r"[A-Za-z0-9_*]+", name):
            raise ValueError(f"invalid NVML function name: {name!r}")
    return ",".join(calls)


class StandinControl:
    """Writer for one stand-in state directory (see :mod:`probes.nvml_standin`).

    Thread-safe; several instances (also in other processes) may share a
    directory, each change being a locked read-modify-write of the file.
    """

    state_dir: Path

    def __init__(self, state_dir: Path) -> None:
        """Create the directory and an empty ``events`` file if missing, load ``state``."""
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._state_path = self.state_dir / STATE_FILE
        self._events_path = self.state_dir / EVENTS_FILE
        self._lock_path = self.state_dir / LOCK_FILE
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        self._events_path.touch(exist_ok=True)
        with self._locked():
            pass  # loads the current state file, if any

    # ---- file plumbing ----

    @property
    def state_path(self) -> Path:
        """Path of the ``state`` file the library reads."""
        return self._state_path

    @property
    def events_path(self) -> Path:
        """Path of the append-only ``events`` file the library tails."""
        return self._events_path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the thread and cross-process locks with the map freshly re-read.

        Re-reading every time (rather than trusting stat identity, which ext4
        inode reuse can fool) keeps other writers' changes.
        """
        with self._lock, open(self._lock_path, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                text = self._state_path.read_text()
            except FileNotFoundError:
                text = ""
            self._values = parse_state(text)
            yield

    def _write_locked(self) -> None:
        """Atomically replace ``state`` with the in-memory map."""
        lines = ["# gpu-supervisor NVML stand-in state; see probes/nvml_standin/__init__.py"]
        lines += [f"{key}={value}" for key, value in self._values.items()]
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, self._state_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # ---- state ----

    def reset(self, gpu_count: int) -> None:
        """Replace all state by a healthy node with ``gpu_count`` GPUs (events are kept)."""
        if not 0 <= gpu_count <= 256:
            raise ValueError(f"gpu_count out of range: {gpu_count}")
        with self._locked():
            self._values = {"gpu_count": str(gpu_count)}
            self._write_locked()

    def update(self, values: Mapping[str, int | str]) -> None:
        """Set raw keys in one atomic rewrite, e.g. ``{"gpu.0.nvlink.3.active": 0}``."""
        rendered = {_check_key(k): _format_value(v) for k, v in values.items()}
        with self._locked():
            self._values.update(rendered)
            self._write_locked()

    def set(self, gpu: int, **fields: int | str) -> None:
        """Set per-GPU keys; ``__`` stands for ``.``: ``set(0, ecc__corrected__volatile=5)``."""
        _check_gpu(gpu)
        self.update({f"gpu.{gpu}.{name.replace('__', '.')}": v for name, v in fields.items()})

    def unset(self, *keys: str) -> None:
        """Remove raw keys so they fall back to the library's defaults."""
        with self._locked():
            for key in keys:
                self._values.pop(key, None)
            self._write_locked()

    def get(self, key: str) -> str | None:
        """Value of a raw key as written, or None when it is at its default."""
        with self._locked():
            return self._values.get(key)

    def values(self) -> dict[str, str]:
        """Copy of every key currently written."""
        with self._locked():
            return dict(self._values)

    # ---- faults ----

    def lose(self, gpu: int) -> None:
        """Make every call on ``gpu``'s handle fail with NVML_ERROR_GPU_IS_LOST."""
        self.set(gpu, lost=1)

    def hang(self, gpu: int, seconds: float, calls: Sequence[str] = (), *,
             ending: bool = False) -> None:
        """Make calls on ``gpu`` (all, or only ``calls``) block ``seconds`` first — every
        call, until :meth:`clear_hang`; with ``ending``, only for the next ``seconds``: the
        GPU hangs that long, then answers again."""
        if seconds < 0:
            raise ValueError(f"negative hang: {seconds}")
        ms = max(1, round(seconds * 1000)) if seconds > 0 else 0
        until = int(time.time() * 1000) + ms if ending and ms else 0
        self.set(gpu, hang_ms=ms, hang_until_ms=until, hang_calls=_check_calls(calls))

    def clear_hang(self, gpu: int) -> None:
        """End a hang; calls blocked in it return within ~20 ms."""
        self.set(gpu, hang_ms=0, hang_until_ms=0, hang_calls="")

    def unsupported(self, gpu: int, calls: Sequence[str]) -> None:
        """Make ``calls`` return NVML_ERROR_NOT_SUPPORTED on ``gpu`` (empty: none)."""
        self.set(gpu, unsupported=_check_calls(calls))

    # ---- events ----

    def _append_event(self, line: str) -> None:
        """Append one whole line with a single write so readers never see half."""
        with open(self._events_path, "a") as f:
            f.write(line + "\n")
            f.flush()

    def inject_xid(self, gpu: int, code: int, count: int = 1) -> None:
        """Queue ``count`` XID ``code`` events for ``gpu`` on every registered event set."""
        _check_gpu(gpu)
        if code < 0 or count < 1:
            raise ValueError(f"bad xid code/count: {code}/{count}")
        self._append_event(f"xid {gpu} {code} {count}")

    def inject_event(self, gpu: int, event_type: int, data: int, count: int = 1) -> None:
        """Queue any NVML event type (e.g. 0x2 double-bit ECC) with ``eventData`` = data."""
        _check_gpu(gpu)
        if event_type <= 0 or data < 0 or count < 1:
            raise ValueError(f"bad event type/data/count: {event_type}/{data}/{count}")
        self._append_event(f"event {gpu} {event_type:#x} {data} {count}")


def _parse_assignment(text: str) -> tuple[str, str]:
    """Split a CLI ``key=value`` argument."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def _split_calls(text: str) -> list[str]:
    """Split a CLI comma list of function names."""
    return [c for c in (p.strip() for p in text.split(",")) if c]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fault-injection CLI; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m probes.nvml_standin.control",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=os.environ.get(STATE_DIR_ENV),
        help=f"state directory (default ${STATE_DIR_ENV})",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("reset", help="healthy state with N GPUs")
    p.add_argument("gpu_count", type=int)
    p = sub.add_parser("set", help="set raw keys")
    p.add_argument("assignments", nargs="+", type=_parse_assignment, metavar="KEY=VALUE")
    p = sub.add_parser("unset", help="drop raw keys back to defaults")
    p.add_argument("keys", nargs="+")
    p = sub.add_parser("get", help="print a raw key's value (empty if default)")
    p.add_argument("key")
    sub.add_parser("show", help="print the state file's keys")
    p = sub.add_parser("lose", help="mark a GPU lost")
    p.add_argument("gpu", type=int)
    p = sub.add_parser("hang", help="make a GPU's calls block for the next SECONDS")
    p.add_argument("gpu", type=int)
    p.add_argument("seconds", type=float)
    p.add_argument("--calls", type=_split_calls, default=[], help="comma list of NVML functions")
    p.add_argument("--every-call", action="store_true",
                   help="each call blocks SECONDS, until clear-hang (a GPU that stays hung)")
    p = sub.add_parser("clear-hang", help="stop a GPU's hang")
    p.add_argument("gpu", type=int)
    p = sub.add_parser("unsupported", help="make NVML functions NOT_SUPPORTED on a GPU")
    p.add_argument("gpu", type=int)
    p.add_argument("calls", nargs="*")
    p = sub.add_parser("xid", help="append an XID event")
    p.add_argument("gpu", type=int)
    p.add_argument("code", type=int)
    p.add_argument("--count", type=int, default=1)
    p = sub.add_parser("event", help="append an event of any NVML type")
    p.add_argument("gpu", type=int)
    p.add_argument("event_type", type=lambda s: int(s, 0))
    p.add_argument("data", type=lambda s: int(s, 0))
    p.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    if args.dir is None:
        parser.error(f"--dir is required when ${STATE_DIR_ENV} is unset")

    try:
        ctl = StandinControl(args.dir)
        done = ""  # what changed, said back: a silent tool leaves one guessing
        if args.cmd == "reset":
            ctl.reset(args.gpu_count)
            done = f"reset: {args.gpu_count} healthy GPUs, no faults"
        elif args.cmd == "set":
            ctl.update(dict(args.assignments))
            done = "set " + " ".join(f"{k}={v}" for k, v in args.assignments)
        elif args.cmd == "unset":
            ctl.unset(*args.keys)
            done = "back to defaults: " + " ".join(args.keys)
        elif args.cmd == "get":
            value = ctl.get(args.key)
            print("" if value is None else value)
        elif args.cmd == "show":
            for key, value in ctl.values().items():
                print(f"{key}={value}")
        elif args.cmd == "lose":
            ctl.lose(args.gpu)
            done = f"GPU {args.gpu} lost (every call on it fails); `reset` brings it back"
        elif args.cmd == "hang":
            ctl.hang(args.gpu, args.seconds, args.calls, ending=not args.every_call)
            which = ", ".join(args.calls) if args.calls else "every call"
            done = (f"GPU {args.gpu}: {which} blocks {args.seconds:g} s each, until "
                    f"clear-hang {args.gpu}" if args.every_call else
                    f"GPU {args.gpu}: {which} blocks for the next {args.seconds:g} s")
        elif args.cmd == "clear-hang":
            ctl.clear_hang(args.gpu)
            done = f"GPU {args.gpu}: hang cleared"
        elif args.cmd == "unsupported":
            calls = [c for arg in args.calls for c in _split_calls(arg)]
            ctl.unsupported(args.gpu, calls)
            done = f"GPU {args.gpu}: NOT_SUPPORTED for {', '.join(calls) or 'nothing'}"
        elif args.cmd == "xid":
            ctl.inject_xid(args.gpu, args.code, args.count)
            done = f"GPU {args.gpu}: XID {args.code} x{args.count} queued"
        elif args.cmd == "event":
            ctl.inject_event(args.gpu, args.event_type, args.data, args.count)
            done = (f"GPU {args.gpu}: event {args.event_type:#x} data {args.data} "
                    f"x{args.count} queued")
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if done:
        print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
