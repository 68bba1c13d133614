"""A small request generator in front of every model, as its clients would be.

Each tick it takes the next model and goes where its clients go: through its HTTPRoute
(a backend Service picked in proportion to the route's weights, as a gateway would), its
front Service (whose selector the controller moves to a fallback), or its own Service.
It reads that Service's ready endpoints as the API server has them (its EndpointSlices),
picks the next one round-robin and sends a real completion to the engine behind that
address. A request sent to a replica while a fault that stops it (``scenario.STOPPING``)
is between injection and traffic off counts against that fault: it reached a sick
replica. Requests answered by a fallback model's engine are counted as such.

Every request the clients make is counted once as sent, and ends answered (200) or failed
— no endpoint to send it to, no answer within ``TIMEOUT_S`` (hung), or an error — or is
still in flight when the run ends: sent = answered + failed + in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

from simulator.scenario import STOPPING
from simulator.timeline import ClusterView, FaultRecord
from simulator.world import GroupRef

RATE_PER_SECOND = 20.0
TIMEOUT_S = 5.0


class Traffic:
    def __init__(self, view: ClusterView, groups: list[GroupRef],
                 engines: dict[str, str], records: Callable[[], list[FaultRecord]]) -> None:
        self._view = view
        self._groups = groups
        self._engines = engines  # pod IP → engine URL (the runtime's map)
        self._records = records
        # sent, answered, failed (of them: no_endpoint, timed_out), sick, fallback
        self.counts: Counter[str] = Counter()
        self.answers: dict[str, list[float]] = {}  # group → wall time of each answer
        self._models = sorted({g.model.name for g in groups})
        self._model_turn = itertools.count()
        self._turn = itertools.count()  # which ready endpoint comes next
        self._weighted = itertools.count()  # which share of a route's weight comes next

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tasks:
            while True:
                self._send_one(session, tasks)
                await asyncio.sleep(1 / RATE_PER_SECOND)

    def _service(self, model: str) -> str | None:
        """The Service this request of ``model``'s goes to (weighted round-robin over a
        route's backends; None when every weight is 0)."""
        backends = [(name, w) for name, w in self._view.entry(model) if w > 0]
        total = sum(w for _, w in backends)
        if not total:
            return None
        k = next(self._weighted) % total
        for name, weight in backends:
            if k < weight:
                return name
            k -= weight
        return None

    def _send_one(self, session: aiohttp.ClientSession, tasks: asyncio.TaskGroup) -> None:
        model = self._models[next(self._model_turn) % len(self._models)]
        service = self._service(model)
        ips = sorted(ip for ip in self._view.service_ips(service or "") if ip in self._engines)
        self.counts["sent"] += 1
        if not ips:
            # A client with nowhere to go is a failed request (a gateway answers 503).
            self.counts["no_endpoint"] += 1
            self.counts["failed"] += 1
            return
        ip = ips[next(self._turn) % len(ips)]
        group = self._view.group_of_ip(ip, self._groups)
        sick: list[FaultRecord] = []
        for record in self._records():
            # The replica that was sick: the address it served at when the fault came (a
            # recreated group's new leader is another replica).
            if (record.leader_ip == ip and "injected" in record.times
                    and "traffic_off" not in record.times and not record.ended
                    and record.fault.kind in STOPPING):
                record.sick_requests += 1
                record.sick["sent"] += 1
                sick.append(record)
                self.counts["sick"] += 1
        # Not a pipeline group's leader: a fallback model's pod.
        tasks.create_task(self._request(session, self._engines[ip],
                                        group.name if group is not None else None, sick))

    async def _request(self, session: aiohttp.ClientSession, url: str, group: str | None,
                       sick: list[FaultRecord]) -> None:
        body = {"model": "sim", "prompt": [1, 2, 3], "max_tokens": 4}
        outcome = "failed"
        try:
            async with session.post(f"{url}/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as resp:
                await resp.read()
                if resp.status == 200:
                    outcome = "answered"
        except TimeoutError:
            outcome = "hung"
        except (aiohttp.ClientError, OSError):
            pass
        self.counts["answered" if outcome == "answered" else "failed"] += 1
        if outcome == "hung":
            self.counts["timed_out"] += 1
        if outcome == "answered":
            if group is None:
                self.counts["fallback"] += 1
            else:
                self.answers.setdefault(group, []).append(time.time())
        for record in sick:
            record.sick[outcome] += 1

    def totals(self) -> dict[str, Any]:
        """The counts as the report gives them: sent = answered + failed + in_flight
        (failed includes no_endpoint and timed_out)."""
        c = self.counts
        return {"sent": c["sent"], "answered": c["answered"], "failed": c["failed"],
                "in_flight": c["sent"] - c["answered"] - c["failed"],
                "no_endpoint": c["no_endpoint"], "timed_out": c["timed_out"],
                "fallback": c["fallback"], "sick": c["sick"],
                "equation": "sent = answered + failed + in_flight; failed includes "
                            "no_endpoint and timed_out; fallback is part of answered"}
