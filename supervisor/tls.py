"""TLS for the report path: the controller's server certificate and the senders' trust.

Reports carry bearer tokens, so they travel encrypted: the controller serves
``/v1/reports/*`` on its own TLS listener (``controller.report_listen``), with a certificate
and key mounted from a Secret; agents and sidecars verify it against a CA bundle
(``reporting.ca_file``). Probes and ``/metrics`` stay on the plain listener — kubelet probes
and Prometheus scrapes carry no secrets, and keeping them apart means the report routes
never answer in clear text.

Secrets are rotated in place (cert-manager, or a person re-running the documented step):
the server re-reads the files when they change, and every new connection gets the new
certificate; connections already open keep theirs until they close.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import os
import ssl
from pathlib import Path

import structlog

from supervisor.errors import ConfigError

log = structlog.get_logger(__name__)


# A TLS record carries at most 16 KiB of data; a little more leaves room for its header.
TLS_READ_BUFFER = 16 * 1024 + 512


def lean_tls_buffers() -> None:
    """Give each TLS connection of this process a read buffer the size of one record.

    asyncio's TLS protocol allocates (and zeroes) a 256 KiB read buffer per connection up
    front (CPython issue 109534): with a report stream per agent that was 1 GiB of the
    controller's memory at 4,096 nodes. Reading a record at a time costs nothing
    measurable for reports; a large API list is read in more, smaller pieces. Process-wide,
    so only the controller, which holds thousands of connections, calls it."""
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ServerCertificate:
    """A server ``SSLContext`` whose certificate follows the files it came from."""

    def __init__(self, cert_file: str, key_file: str, *, field: str = "controller") -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._field = field
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamps: tuple[object, object] = (None, None)
        self.reloads = 0
        self.load()

    def load(self) -> None:
        """Load the pair now; ``ConfigError`` naming the setting if it cannot be used."""
        stamps = (_stamp(self.cert_file), _stamp(self.key_file))
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except FileNotFoundError as exc:
            missing = self.cert_file if not Path(self.cert_file).exists() else self.key_file
            which = "tls_cert_file" if missing == self.cert_file else "tls_key_file"
            raise ConfigError(f"{self._field}.{which}",
                              f"{missing} does not exist (mount the report TLS Secret, or see "
                              f"the README's 'Security' section)") from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{self._field}.tls_cert_file",
                              f"cannot load {self.cert_file} with {self.key_file}: {exc}"
                              ) from exc
        self._stamps = stamps

    def changed(self) -> bool:
        return (_stamp(self.cert_file), _stamp(self.key_file)) != self._stamps

    async def follow(self, period: float) -> None:
        """Re-load the pair whenever the files change (a supervised task). A half-written
        pair (the key of one, the certificate of the other) fails to load and is tried
        again next period; the previous certificate stays in use meanwhile."""
        while True:
            await asyncio.sleep(period)
            if not self.changed():
                continue
            try:
                self.load()
            except ConfigError as exc:
                log.error("report TLS certificate not reloaded; keeping the previous one",
                          error=str(exc))
                continue
            self.reloads += 1
            log.info("report TLS certificate reloaded", cert_file=self.cert_file)


def client_context(ca_file: str) -> ssl.SSLContext:
    """What senders verify the controller with: the CA bundle, or the system's if empty."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("reporting.ca_file", f"cannot load {ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
