"""UDP between the sidecars of one group: the message format and the sockets.

UDP rather than HTTP, because what is being measured is the network path itself: a lost
datagram is visible as a missing heartbeat at once, while a TCP connection hides loss behind
retransmissions, stalls a whole stream behind one lost segment and keeps "working" one way
for minutes after the other direction is cut. UDP also costs no connection state: a member
of a 32-member group sends one 100-byte datagram to each peer four times a second.

Each peer gets its own *connected* sending socket, so the kernel reports an ICMP "port
unreachable" from the peer's host as ``ConnectionRefusedError`` (``error_received``): the
difference between a peer whose process died (its host answers) and one whose node or link
is gone (nothing answers). Everything arrives on one bound socket.

Messages are compact JSON objects with a type ``t``:

- ``hb``  heartbeat: ``g`` group, ``r`` sender rank, ``b`` sender boot id, ``s`` sequence,
  ``h`` the sender's row (bitmask of ranks it hears), ``rows`` known rows of others as
  ``[rank, seq, mask]``;
- ``preq`` ping request: "ask ``x`` whether it is alive, for ``r``", nonce ``n``;
- ``ping`` from a helper ``r`` on behalf of origin ``o``;
- ``ack`` the answer, sent back the same way (target → helper → origin);
- ``creq`` a member asking the leader for a collective check (it suspects the group).

This module decides nothing; ``supervisor.sidecar`` runs the protocol.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

MAX_DATAGRAM = 60_000


class BadMessage(ValueError):
    """A datagram that is not one of our messages (ignored, counted)."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes, group: str) -> dict[str, Any]:
    """The message, if it is one of ours for ``group``; ``BadMessage`` otherwise."""
    if len(data) > MAX_DATAGRAM:
        raise BadMessage("too large")
    try:
        message = json.loads(data)
    except ValueError as exc:
        raise BadMessage("not JSON") from exc
    if not isinstance(message, dict) or message.get("g") != group:
        raise BadMessage("not for this group")
    kind = message.get("t")
    if kind not in ("hb", "preq", "ping", "ack", "creq") or \
            not isinstance(message.get("r"), int):
        raise BadMessage("unknown type or sender")
    if kind == "hb":
        if not isinstance(message.get("s"), int) or not isinstance(message.get("h"), int) \
                or not isinstance(message.get("b"), str):
            raise BadMessage("malformed heartbeat")
        rows = message.get("rows", [])
        if not isinstance(rows, list) or not all(
                isinstance(r, list) and len(r) == 3 and all(isinstance(x, int) for x in r)
                for r in rows):
            raise BadMessage("malformed rows")
        if not all(isinstance(message.get(k, 0), int) and message.get(k, 0) >= 0
                   for k in ("lh", "pn")) or \
                not isinstance(message.get("pz", 0), (int, float)):
            raise BadMessage("malformed health announcement")
    elif not isinstance(message.get("n"), int):
        raise BadMessage("probe without nonce")
    return message


Receive = Callable[[bytes, float], None]


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self, receive: Receive) -> None:
        self._receive = receive

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._receive(data, time.monotonic())


class _Outbox(asyncio.DatagramProtocol):
    def __init__(self, refused: Callable[[], None]) -> None:
        self._refused = refused

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self._refused()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        pass  # answers come to the inbox


class PeerSockets:
    """One bound receiving socket, one connected sending socket per peer rank."""

    def __init__(self, receive: Receive, refused: Callable[[int, float], None]) -> None:
        self._receive = receive
        self._refused = refused
        self._inbox: asyncio.DatagramTransport | None = None
        self._out: dict[int, tuple[tuple[str, int], asyncio.DatagramTransport]] = {}
        self.bound: tuple[str, int] | None = None
        self.sent = 0
        self.send_errors = 0

    async def open(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Inbox(self._receive), local_addr=(host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._inbox = transport
        sock = transport.get_extra_info("sockname")
        self.bound = (str(sock[0]), int(sock[1]))

    async def connect(self, rank: int, address: tuple[str, int]) -> None:
        """(Re)connect the sending socket of ``rank`` when its address changed."""
        current = self._out.get(rank)
        if current is not None and current[0] == address:
            return
        if current is not None:
            current[1].close()
        loop = asyncio.get_running_loop()
        # Heartbeats leave from the address we listen on (when it is a specific one): on a
        # host with several addresses the path to a peer is then the same both ways, and a
        # firewall rule naming a member's address covers what it sends and receives.
        local = None
        if self.bound is not None and self.bound[0] not in ("0.0.0.0", "::"):
            local = (self.bound[0], 0)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Outbox(lambda: self._refused(rank, time.monotonic())),
            remote_addr=address, local_addr=local)
        self._out[rank] = (address, transport)

    def address(self, rank: int) -> tuple[str, int] | None:
        current = self._out.get(rank)
        return None if current is None else current[0]

    def send(self, rank: int, data: bytes) -> None:
        current = self._out.get(rank)
        if current is None:
            return
        try:
            current[1].sendto(data)
            self.sent += 1
        except OSError:
            self.send_errors += 1  # a full buffer or a vanished route: counted as lost

    def close(self) -> None:
        for _, transport in self._out.values():
            transport.close()
        self._out.clear()
        if self._inbox is not None:
            self._inbox.close()
