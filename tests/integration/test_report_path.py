"""The report path as an attacker or an unlucky network would try it, on real processes:
a real controller process (its report endpoint on TLS) against the real API server.

Encryption and trust, audience-bound tokens, bodies in pieces, replays, token floods.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.report_flood import forged_token, key_id
from simulator.controlplane.cluster import REPORT_AUDIENCE, KubeTestCluster
from simulator.processes import (
    AgentProcess,
    ControllerProcess,
    gpu_finding,
    node_report,
    report_tls,
)
from supervisor.config import ReportingSettings
from tests.integration.cluster_objects import agent_token, unique
from tests.kubeenv import manifests

pytestmark = pytest.mark.kube


@dataclass
class Env:
    cluster: KubeTestCluster
    kubeconfig: Path
    token: str  # the report token of the agent on node n1 (bound to its pod)
    workdir: Path
    release: manifests.Release

    async def agent_token(self, node: str) -> str:
        """The report token of an agent pod of this release on ``node``."""
        async with await self.cluster.api_client() as admin:
            return await agent_token(admin, self.release, node)


@pytest.fixture(name="env")
async def _env(kube_cluster: KubeTestCluster, tmp_path: Path) -> Env:
    async with await kube_cluster.api_client() as admin:
        release = await manifests.install_rbac(admin, unique("gs"))
        agent = await agent_token(admin, release, "n1")
    token = await kube_cluster.service_account_token(release.namespace,
                                                     release.service_account("controller"))
    return Env(kube_cluster, kube_cluster.write_kubeconfig(tmp_path / "kc", token), agent,
               tmp_path, release)


def controller(env: Env, name: str, **settings: Any) -> ControllerProcess:
    return ControllerProcess(env.workdir, env.kubeconfig, name,
                             settings=env.release.controller_settings(**settings))


async def reporting_agent(env: Env, ctl: ControllerProcess, name: str, node: str, *,
                          ca_file: Path | None = None, heartbeat: float = 1.0, gpus: int = 1
                          ) -> AgentProcess:
    """An agent on ``node`` reporting to ``ctl`` with the report token of an agent pod
    there, trusting ``ca_file`` (the controller's CA unless given)."""
    token_file = env.workdir / f"token-{name}"
    token_file.write_text(await env.agent_token(node))
    return AgentProcess(env.workdir / name, gpus=gpus, node_name=node, settings={
        "reporting": {"controller_url": ctl.report_url, "token_file": str(token_file),
                      "ca_file": str(ca_file or ctl.tls_dir / "ca.crt"),
                      "heartbeat_seconds": heartbeat, "timeout_seconds": heartbeat}})


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


class TestEncryptionAndTrust:
    async def test_reports_are_served_over_tls_only(self, env: Env) -> None:
        """The report route answers over TLS with the configured certificate; the plain
        listener (probes, metrics) does not serve it at all."""
        ctl = controller(env, "tls").start()
        try:
            assert ctl.report_url.startswith("https://")
            assert ctl.post_report(env.token, node_report("n1", []))[0] == 202
            req = urllib.request.Request(ctl.url + "/v1/reports/node", method="POST",
                                         data=b"{}", headers={
                                             "Authorization": f"Bearer {env.token}",
                                             "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                await asyncio.to_thread(urllib.request.urlopen, req, timeout=5)
            info.value.close()
            assert info.value.code in (404, 405)
        finally:
            ctl.stop()

    async def test_agent_refuses_a_controller_it_cannot_verify(self, env: Env) -> None:
        """An agent whose CA bundle did not sign the controller's certificate sends
        nothing (so its token never leaves); with the right bundle its reports arrive."""
        other_ca = report_tls(env.workdir / "other-ca")
        ctl = controller(env, "verify").start()
        agent = await reporting_agent(env, ctl, "agent", "n-verify", ca_file=other_ca / "ca.crt")
        try:
            agent.start()
            agent.wait_for(lambda: agent.status()["reporting"]["failed"] >= 2,
                           what="failed reports")
            assert "CERTIFICATE_VERIFY_FAILED" in agent.status()["reporting"]["last_error"]
            assert ctl.status()["reports"].get("accepted", 0) == 0
        finally:
            agent.stop()
        good = await reporting_agent(env, ctl, "agent2", "n-verify")
        try:
            good.start()
            good.wait_for(lambda: ctl.status()["reports"].get("accepted", 0) >= 1,
                          what="accepted report")
        finally:
            good.stop()
            ctl.stop()

    async def test_a_rotated_certificate_is_served_to_new_connections(
            self, env: Env) -> None:
        """Replacing the Secret's files (a new certificate from a new CA) takes effect
        without a restart: a client trusting only the new CA gets through."""
        tls_dir = report_tls(env.workdir / "rotating")
        ctl = ControllerProcess(env.workdir, env.kubeconfig, "rotate", tls_dir=tls_dir,
                                settings=env.release.controller_settings(
                                    tls_reload_seconds=0.5))
        ctl.start()
        try:
            fresh = report_tls(env.workdir / "fresh")
            for name in ("tls.key", "tls.crt"):
                (tls_dir / name).write_bytes((fresh / name).read_bytes())
            ctx = ssl.create_default_context(cafile=str(fresh / "ca.crt"))
            port = int(ctl.report_url.rsplit(":", 1)[1])

            def handshake() -> bool:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                            ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                        return True
                except ssl.SSLError:
                    return False
            deadline = time.monotonic() + 20
            while not await asyncio.to_thread(handshake):
                assert time.monotonic() < deadline, ctl.log()[-2000:]
                await asyncio.sleep(0.5)
        finally:
            ctl.stop()


class TestTokens:
    async def test_only_tokens_for_our_audience_may_report(self, env: Env) -> None:
        """A token for the API server's own audience is refused (401) even though it is the
        agent's; the report token (our audience) is accepted."""
        ctl = controller(env, "aud").start()
        try:
            api_token = await env.cluster.service_account_token(
                env.release.namespace, env.release.service_account("agent"))
            code, body = ctl.post_report(api_token, node_report("n1", []))
            assert code == 401, body
            assert ctl.post_report(env.token, node_report("n1", []))[0] == 202
            assert ctl.status()["token_reviews"] == 1  # the API-audience token cost none
        finally:
            ctl.stop()

    async def test_a_stolen_report_token_cannot_call_the_api_server(self, env: Env) -> None:
        """The report token's audience is ours, so the API server itself rejects it."""
        req = urllib.request.Request(env.cluster.url + "/api/v1/namespaces",
                                     headers={"Authorization": f"Bearer {env.token}"})
        ctx = ssl.create_default_context(cafile=str(env.cluster.ca_file))
        with pytest.raises(urllib.error.HTTPError) as info:
            await asyncio.to_thread(urllib.request.urlopen, req, timeout=5, context=ctx)
        info.value.close()
        assert info.value.code == 401

    async def test_forged_tokens_cost_no_review_and_valid_reports_still_answer(
            self, env: Env) -> None:
        """300 reports with distinct tokens shaped like ours — our audience, the cluster's
        own key id, bad signatures — cost no TokenReview at all: the signature check
        refuses the first few (401), the source's allowance the rest before any check
        (429); a valid report sent in the middle of the flood, from the same address, is
        accepted within an agent's report deadline."""
        ctl = controller(env, "flood", token_reviews_per_second=10).start()
        try:
            assert ctl.post_report(env.token, node_report("n1", []))[0] == 202  # cached
            tls = ctl.tls
            url = ctl.report_url + "/v1/reports/node"
            body = json.dumps(node_report("n1", []))
            kid = key_id(env.token)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=tls, limit=100)) as session:

                async def post(token: str) -> int:
                    async with session.post(url, data=body, headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/json"}) as resp:
                        return resp.status

                flood_started = time.monotonic()
                flood = [asyncio.create_task(post(forged_token(i, kid)))
                         for i in range(300)]
                await asyncio.sleep(0.05)
                valid = json.dumps(node_report("n1", [], epoch=ctl.epoch()))
                deadline = aiohttp.ClientTimeout(total=ReportingSettings().timeout_seconds)
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                        ssl=tls), timeout=deadline) as own, own.post(url, data=valid, headers={
                            "Authorization": f"Bearer {env.token}",
                            "Content-Type": "application/json"}) as resp:
                    assert resp.status == 202
                statuses = await asyncio.gather(*flood)
                flood_seconds = time.monotonic() - flood_started
            assert set(statuses) <= {401, 429}
            status = ctl.status()
            assert status["token_reviews"] == 1  # the valid token, before the flood
            assert status["tokens_forged"] == statuses.count(401)
            # The source's allowance: its burst (twice 5/s) and what refilled meanwhile.
            assert statuses.count(401) <= 10 + 5 * flood_seconds + 1
            assert status["tokens_source_throttled"] == statuses.count(429)
            assert status["issuer_keys"]["keys"] == [kid]
            # The log holds one line per kind of rejection, not one per request.
            assert ctl.log().count('"outcome": "throttled"') <= 2
        finally:
            ctl.stop()

    async def test_a_crowd_throttled_together_is_told_to_come_back_spread_out(
            self, env: Env) -> None:
        """A fleet reconnecting at once (a controller restart) must not retry every second,
        each attempt a refused TLS handshake: once 300 senders with genuine tokens were
        throttled within a second at 10 reviews/s, the next are told to come back at random
        times spread over the ~30 s their reviews take (at most a minute)."""
        ctl = controller(env, "crowd", token_reviews_per_second=10,
                         source_reviews_per_second=1000,
                         source_failures_per_second=1000).start()
        # Signed by the cluster, so they get past the signature to TokenReview (bound to
        # no pod, each is refused after its review: that does not matter here).
        tokens = await asyncio.gather(*(env.cluster.service_account_token(
            env.release.namespace, env.release.service_account("agent"),
            audiences=[REPORT_AUDIENCE]) for _ in range(340)))
        try:
            url = ctl.report_url + "/v1/reports/node"
            body = json.dumps(node_report("n1", []))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    ssl=ctl.tls, limit=100)) as session:

                async def post(token: str) -> float | None:
                    async with session.post(url, data=body, headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/json"}) as resp:
                        after = resp.headers.get("Retry-After")
                        return float(after) if resp.status == 429 and after else None

                first = await asyncio.gather(*(post(t) for t in tokens[:300]))
                await asyncio.sleep(1.2)
                later = [a for a in await asyncio.gather(
                    *(post(t) for t in tokens[300:])) if a is not None]
            assert min(a for a in first if a is not None) <= 2  # before the crowd was seen
            assert len(later) >= 20  # the rest: reviewed with what the rate refilled
            assert min(later) >= 10 and max(later) <= 60
            assert len(set(later)) >= 5  # spread, not one herd coming back together
        finally:
            ctl.stop()

    async def test_garbage_tokens_cost_no_review_and_only_their_source_is_slowed(
            self, env: Env) -> None:
        """Tokens that are not JWTs for our audience are refused before any API call
        (401); past its allowance the sending address is refused before even that (429),
        while another address — an honest agent beside the attacker — is not."""
        ctl = controller(env, "garbage", source_failures_per_second=1.0).start()
        try:
            started = time.monotonic()
            codes = [ctl.post_report(f"garbage-{i}", node_report("n1", []))[0]
                     for i in range(20)]
            took = time.monotonic() - started
            assert set(codes) == {401, 429}
            assert codes[:2] == [401] * 2  # the burst: twice source_failures_per_second
            assert codes.count(401) <= 2 + took + 1  # and what refilled meanwhile
            assert ctl.post_report("garbage-x", node_report("n1", []),
                                   source="127.0.0.2")[0] == 401
            assert ctl.post_report(env.token, node_report("n1", []),
                                   source="127.0.0.3")[0] == 202
            assert ctl.status()["token_reviews"] == 1  # the honest agent's token only
        finally:
            ctl.stop()


class TestBodies:
    async def test_body_arriving_in_several_segments_with_pauses_is_accepted(
            self, env: Env) -> None:
        """Headers, then the body in four TLS records 50 ms apart: one report, 202."""
        ctl = controller(env, "pieces").start()
        try:
            body = json.dumps(node_report("n1", [gpu_finding("n1", 0)])).encode()
            port = int(ctl.report_url.rsplit(":", 1)[1])
            head = (f"POST /v1/reports/node HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {env.token}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: close\r\n\r\n").encode()
            ctx = ctl.tls
            assert ctx is not None

            def send() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(head)
                    quarter = len(body) // 4 + 1
                    for i in range(0, len(body), quarter):
                        time.sleep(0.05)
                        sock.sendall(body[i:i + quarter])
                    answer = b""
                    while chunk := sock.recv(4096):
                        answer += chunk
                    return answer

            answer = await asyncio.to_thread(send)
            assert answer.startswith(b"HTTP/1.1 202"), answer[:200]
            assert ctl.status()["reports"]["accepted"] == 1
        finally:
            ctl.stop()

    async def test_a_body_that_never_finishes_gets_408_and_the_controller_goes_on(
            self, env: Env) -> None:
        """A client that announces a body and stops sending is cut off after the read
        deadline; the controller keeps serving."""
        ctl = controller(env, "slowloris", report_read_timeout_seconds=1.0).start()
        try:
            port = int(ctl.report_url.rsplit(":", 1)[1])
            ctx = ctl.tls
            assert ctx is not None

            def stall() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    sock.sendall((f"POST /v1/reports/node HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer {env.token}\r\n"
                                  "Content-Type: application/json\r\n"
                                  "Content-Length: 500\r\n\r\n{\"kind\"").encode())
                    return sock.recv(4096)

            assert (await asyncio.to_thread(stall)).startswith(b"HTTP/1.1 408")
            assert ctl.post_report(env.token, node_report("n1", []))[0] == 202
        finally:
            ctl.stop()


class TestFreshness:
    async def test_exact_replay_of_an_older_report_has_no_effect(self, env: Env) -> None:
        """A report with a fault, then a newer one without: replaying the first is refused
        (409) and the node stays healthy in the controller's model."""
        ctl = controller(env, "replay").start()
        try:
            faulty = node_report("n1", [gpu_finding("n1", 0)])
            healthy = node_report("n1", [])
            assert ctl.post_report(env.token, faulty)[0] == 202
            assert ctl.post_report(env.token, healthy)[0] == 202
            code, body = ctl.post_report(env.token, faulty)
            assert code == 409 and "not newer" in body
            status = ctl.status()
            assert status["reports"]["stale"] == 1
            metrics = await asyncio.to_thread(http_get, ctl.url + "/metrics")
            assert 'gpusupervisor_reports_total{outcome="stale"} 1.0' in metrics
        finally:
            ctl.stop()

    async def test_a_report_far_outside_the_clock_skew_is_refused(self, env: Env) -> None:
        """sent_at ten minutes ago: refused with the measured skew, whatever its sequence."""
        ctl = controller(env, "skew").start()
        try:
            old = node_report("n1", [])
            old["sent_at"] -= 600
            code, body = ctl.post_report(env.token, old)
            assert code == 409 and "sender's clock" in body
        finally:
            ctl.stop()


class TestStreams:
    async def test_an_agent_streams_changes_and_ticks_and_reconnects_for_review(
            self, env: Env) -> None:
        """A real agent holds a stream: its heartbeats arrive as ticks, a new fault as a
        full report, and when the stream is due for re-authentication
        (report_stream_seconds) the controller closes it and the agent reconnects with its
        token, reviewed again."""
        ctl = controller(env, "stream", token_cache_seconds=1.0,
                         report_stream_seconds=2.0).start()
        agent = await reporting_agent(env, ctl, "agent", "n-stream", heartbeat=0.2, gpus=2)
        try:
            agent.start()
            agent.wait_for(lambda: ctl.status()["report_ticks"] >= 5, what="ticks")
            status = ctl.status()
            assert status["report_streams"] == 1
            full = status["reports"]["accepted"] - status["report_ticks"]
            agent.control.lose(1)
            agent.wait_finding("gpu_lost", 1)

            def full_reports() -> int:
                s = ctl.status()
                return int(s["reports"]["accepted"] - s["report_ticks"])
            agent.wait_for(lambda: full_reports() > full, what="the change as a report")
            # Streams outlive no token review: reconnected, reviewed again, still ticking.
            agent.wait_for(lambda: ctl.status()["token_reviews"] >= 2, what="re-review")
            ticks = ctl.status()["report_ticks"]
            agent.wait_for(lambda: ctl.status()["report_ticks"] > ticks + 3,
                           what="ticks after reconnecting")
            assert agent.status()["reporting"]["failed"] == 0
            assert ctl.status()["reports"].keys() == {"accepted"}
        finally:
            agent.stop()
            ctl.stop()

    async def test_a_refused_agent_retries_at_its_heartbeat_not_in_a_loop(
            self, env: Env) -> None:
        """Every report refused (here: any skew at all is too much) — the agent sends the
        full state again at each heartbeat, not at once after each refusal."""
        ctl = controller(env, "refusing", report_max_skew_seconds=1e-6).start()
        agent = await reporting_agent(env, ctl, "agent", "n-refused", heartbeat=0.5)
        try:
            agent.start()
            agent.wait_for(lambda: ctl.status()["reports"].get("skewed", 0) >= 1,
                           what="a refused report")
            first = ctl.status()["reports"]["skewed"]
            await asyncio.sleep(3.0)
            refused = ctl.status()["reports"]["skewed"] - first
            # One per 0.5 s heartbeat (fewer on a loaded machine); a loop would be thousands.
            assert 1 <= refused <= 12, refused
            assert "sender's clock" in agent.status()["reporting"]["last_error"]
        finally:
            agent.stop()
            ctl.stop()

    async def test_a_stream_refuses_what_a_post_would_and_carries_on(self, env: Env) -> None:
        """Over one stream: no token → the handshake's 401; the controller opens with its
        epoch; a tick before any report, a replayed tick, a stale one and non-JSON are each
        refused with the POST's status and the stream goes on accepting what is right; a
        report for another node is refused (403) and ends the stream."""
        ctl = controller(env, "stream-refusals").start()
        url = "wss" + ctl.report_url.removeprefix("https") + "/v1/reports/node/stream"
        async with aiohttp.ClientSession() as session:
            try:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(url, ssl=ctl.tls)
                assert refused.value.status == 401
                async with session.ws_connect(url, ssl=ctl.tls, headers={
                        "Authorization": f"Bearer {env.token}"}) as ws:
                    hello = await ws.receive_json(timeout=5)
                    assert hello == {"kind": "Hello", "epoch": ctl.epoch()}

                    async def answer(message: Any) -> dict[str, Any]:
                        await ws.send_json(message)
                        reply: dict[str, Any] = await ws.receive_json(timeout=5)
                        return reply

                    def tick(sequence: int, sent_at: float | None = None) -> dict[str, Any]:
                        return {"kind": "Tick", "sequence": sequence,
                                "sent_at": time.time() if sent_at is None else sent_at}

                    assert (await answer(tick(1)))["status"] == 409
                    report = node_report("n1", [], sequence=10, epoch=hello["epoch"])
                    assert await answer(report) == {"sequence": 10, "status": 202,
                                                    "epoch": hello["epoch"], "held": False}
                    await ws.send_json(tick(11))  # accepted: no reply
                    stale = await answer(tick(11))
                    assert stale["status"] == 409 and "not newer" in stale["error"]
                    assert (await answer(tick(12, time.time() - 600)))["status"] == 409
                    await ws.send_str("{not json")
                    assert (await ws.receive_json(timeout=5))["status"] == 400
                    assert (await answer(node_report("n1", [], sequence=14,
                                                     epoch=hello["epoch"])))["status"] == 202
                    other = await answer(node_report("n2", [], sequence=15,
                                                     epoch=hello["epoch"]))
                    assert other["status"] == 403 and "may not report for n2" in other["error"]
                    closing = await ws.receive(timeout=5)
                    assert closing.type == aiohttp.WSMsgType.CLOSE
                    assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
                status = ctl.status()
                assert status["report_ticks"] == 1
                assert status["reports"] == {"unauthenticated": 1, "accepted": 3, "stale": 2,
                                             "skewed": 1, "malformed": 1, "forbidden": 1}
            finally:
                ctl.stop()
