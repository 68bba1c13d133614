"""The supervisor's own error hierarchy.

Library errors (pynvml, aiohttp, kubernetes_asyncio) never leak past the module that called
the library: they are re-raised as one of these with the original chained as ``__cause__``,
so callers branch on *our* meaning (permanent or worth retrying) rather than on a library's
exception zoo.
"""

from __future__ import annotations

import os
import socket


class SupervisorError(Exception):
    """Base of every error the supervisor raises on purpose."""


class ConfigError(SupervisorError):
    """A setting is invalid. ``field`` is the dotted path of the offending setting."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class ListenError(SupervisorError):
    """A listener could not be opened: the address is in use, is not one of this host's, or
    its name does not resolve. ``setting`` names where the address came from."""

    def __init__(self, setting: str, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({setting}): {reason}")
        self.setting = setting
        self.address = address


def os_reason(exc: OSError) -> str:
    """The OS's words for ``exc`` without the call's wrapping ("Address already in use",
    "Name or service not known")."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return str(exc.strerror or exc)
    return os.strerror(exc.errno)


class DeadlineExceeded(SupervisorError):
    """A foreign call did not answer within its deadline. The call may still be running."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what} did not finish within {timeout:g}s")
        self.what = what
        self.timeout = timeout


class TemporaryError(SupervisorError):
    """Worth retrying: the same call may succeed later (network blip, 5xx, 429, conflict)."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(SupervisorError):
    """Retrying is useless: a 4xx other than 409/429, a forbidden call, a malformed object."""


class KubeError(SupervisorError):
    """Base for Kubernetes API failures; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeTemporaryError(KubeError, TemporaryError):
    """The API server was unreachable, overloaded or answered with a conflict."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        KubeError.__init__(self, message, status=status)
        self.delay = None


class KubePermanentError(KubeError, PermanentError):
    """The API server refused the request for a reason a retry will not change."""


class Fenced(SupervisorError):
    """This replica may no longer write: its Lease is gone or about to be, or another
    controller wrote the state since we read it. Never retried; the caller stops acting."""
