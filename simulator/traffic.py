"""A small request generator in front of every model, as its clients would be.

Each tick it takes the next model and goes where its clients go: through its HTTPRoute
(a backend Service picked in proportion to the route's weights, as a gateway would), its
front Service (whose selector the controller moves to a fallback), or its own Service.
It reads that Service's ready endpoints as the API server has them (its EndpointSlices),
picks the next one round-robin and sends a real completion to the engine behind that
address. A request sent to a replica while a fault that stops it (``scenario.STOPPING``)
is between injection and traffic off counts against that fault: it reached a sick
replica. Requests answered by a fallback model's engine are counted as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import Callable

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
        self.counts: Counter[str] = Counter()  # sent, ok, failed, no_endpoint, sick, fallback
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
        if not ips:
            self.counts["no_endpoint"] += 1
            return
        ip = ips[next(self._turn) % len(ips)]
        group = self._view.group_of_ip(ip, self._groups)
        for record in self._records():
            if (group is not None and record.group == group and "injected" in record.times
                    and "traffic_off" not in record.times and not record.ended
                    and record.fault.kind in STOPPING):
                record.sick_requests += 1
                self.counts["sick"] += 1
        self.counts["sent"] += 1
        # Not a pipeline group's leader: a fallback model's pod.
        tasks.create_task(self._request(session, self._engines[ip], fallback=group is None))

    async def _request(self, session: aiohttp.ClientSession, url: str,
                       fallback: bool = False) -> None:
        body = {"model": "sim", "prompt": [1, 2, 3], "max_tokens": 4}
        ok = False
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.post(f"{url}/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as resp:
                ok = resp.status == 200
                await resp.read()
        self.counts["ok" if ok else "failed"] += 1
        if ok and fallback:
            self.counts["fallback"] += 1
