"""Who a sidecar may name in its findings: members of its own group, as the Pod watch
(and LeaderWorkerSet's naming) says — never from the report."""

from __future__ import annotations

from supervisor.controller.model import LWS_GROUP, LWS_NAME, LWS_WORKER, HealthModel
from supervisor.controller.senders import Senders
from supervisor.runtime.clock import ManualClock


def lws_pod(name: str, index: int, worker: int, node: str) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "serving", "uid": f"uid-{name}",
                         "labels": {LWS_NAME: "llama", LWS_GROUP: str(index),
                                    LWS_WORKER: str(worker)}},
            "spec": {"nodeName": node}, "status": {}}


def senders() -> Senders:
    model = HealthModel(ManualClock(), silence_seconds=30)
    model.upsert_lws({"metadata": {"namespace": "serving", "name": "llama"},
                      "spec": {"leaderWorkerTemplate": {"size": 3}}})
    model.upsert_pod(lws_pod("llama-0", 0, 0, "n1"))
    model.upsert_pod(lws_pod("llama-0-1", 0, 1, "n2"))
    model.upsert_pod(lws_pod("llama-1", 1, 0, "n3"))
    return Senders(model, agents_watched=False)


def test_a_member_is_found_with_its_node_from_the_watch() -> None:
    """By namespace/name, or by rank when the sidecar could not resolve the name."""
    s = senders()
    assert s.member("serving/llama/0", "serving/llama-0-1") == (True, "n2")
    assert s.member("serving/llama/0", "serving/llama/0/member-1") == (True, "n2")


def test_a_member_being_recreated_is_still_a_member_with_no_node_known() -> None:
    """Worker 2 is missing from the watch right now (LWS is recreating it): its LWS name is
    one of the group's, its node unknown."""
    assert senders().member("serving/llama/0", "serving/llama-0-2") == (True, None)


def test_pods_of_another_group_or_beyond_the_size_are_not_members() -> None:
    """Another group's leader, a worker index the group does not have, another namespace."""
    s = senders()
    assert s.member("serving/llama/0", "serving/llama-1") == (False, None)
    assert s.member("serving/llama/0", "serving/llama-0-3") == (False, None)
    assert s.member("serving/llama/0", "other/llama-0-1") == (False, None)
    assert s.member("serving/llama/9", "serving/llama-9") == (False, None)
