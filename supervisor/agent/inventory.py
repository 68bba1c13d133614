"""How many GPUs this node physically has, as the Node object says — never its shares.

The Node's ``nvidia.com/gpu`` capacity counts what the device plugin advertises, which is
not GPUs once they are shared: with time-slicing or MPS it is GPUs times replicas (8 GPUs
with ``replicas: 10`` advertise 80), with MIG's ``single`` strategy it is the number of
MIG devices. Comparing NVML's count with it raises a critical ``gpu_missing`` on every
such node, the day the agent is installed. So the expected count comes from GPU feature
discovery (GFD, deployed by the GPU Operator), whose ``nvidia.com/gpu.count`` label is the
number of physical GPUs — time-sliced, MPS-shared or MIG ``mixed`` alike — except under
MIG ``single``, where GFD overrides it with the number of MIG devices too. There, and on
nodes without GFD, nothing the Node says is a physical count: the agent then expects only
what ``nvml.expected_gpus`` says (none by default) and raises no ``gpu_missing`` from a
guess.

(NVML itself counts physical GPUs: MIG devices are reached through their parent, not
counted by ``nvmlDeviceGetCount``.)
"""

from __future__ import annotations

from typing import Any

GPU_COUNT = "nvidia.com/gpu.count"
MIG_STRATEGY = "nvidia.com/mig.strategy"
SHARING = "nvidia.com/gpu.sharing-strategy"
REPLICAS = "nvidia.com/gpu.replicas"


def physical_gpus(node: dict[str, Any]) -> tuple[int, str] | None:
    """(count, where it comes from) of the node's physical GPUs, or None when the Node does
    not say (see the module docstring)."""
    labels: dict[str, str] = node.get("metadata", {}).get("labels") or {}
    if labels.get(MIG_STRATEGY) == "single":
        return None  # gpu.count is the number of MIG devices there
    count = labels.get(GPU_COUNT, "")
    if not count.isdigit() or int(count) < 1:
        return None
    sharing = labels.get(SHARING, "none")
    replicas = labels.get(REPLICAS, "?")
    shared = f", {sharing} x{replicas}" if sharing != "none" else ""
    return int(count), f"Node label {GPU_COUNT}{shared}"
