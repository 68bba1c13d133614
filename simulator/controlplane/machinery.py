"""The rest of a control plane beside the API server: kube-scheduler, kube-controller-manager
and kwok, so that a Deployment makes a ReplicaSet makes Pods, Pods are scheduled onto the
simulated GPU nodes by the real scheduler, become Running and Ready (readiness gates
honoured), and Services get EndpointSlices — the machinery our controller acts through.

kube-scheduler and kube-controller-manager are the real ones, built into the same
``kube-testenv`` binary as the API server (``main.go``). kwok plays the kubelet of every
node (``kwok-stages.yaml`` says how, and why our stages differ from kwok's shipped ones).
Pod IPs are kwok's, from ``POD_CIDR``: addresses in the API only, nothing listens on them
(the simulator runs each pod's processes on loopback and keeps the map).
"""

from __future__ import annotations

import time
from pathlib import Path

from simulator.controlplane.cluster import KubeTestCluster, KubeTestClusterError, _free_ports

HERE = Path(__file__).resolve().parent
STAGES = HERE / "kwok-stages.yaml"
POD_CIDR = "10.244.0.0/16"
NODE_IP = "10.240.0.1"


def start_machinery(cluster: KubeTestCluster, kwok: Path) -> None:
    """Start kube-scheduler, kube-controller-manager and kwok against ``cluster`` as its
    administrator. They report readiness only through their effect, which the caller waits
    for (nodes Ready, pods Running); a component that exits raises on the next
    :meth:`KubeTestCluster.check_components`."""
    kubeconfig = cluster.write_kubeconfig(cluster.workdir / "admin.kubeconfig",
                                          cluster.admin_token)
    pki = cluster.workdir / "pki"
    common = [f"--kubeconfig={kubeconfig}", "--leader-elect=false",
              "--bind-address=127.0.0.1", "--secure-port=0"]
    cluster.run_component("kube-scheduler", [str(cluster.binary), "scheduler", *common])
    cluster.run_component("kube-controller-manager", [
        str(cluster.binary), "controller-manager", *common,
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        # Defaults otherwise, as a cluster runs them (40 s node grace, evictions later).
    ])
    (port,) = _free_ports(1)
    cluster.run_component("kwok", [
        str(kwok), f"--kubeconfig={kubeconfig}", f"--config={STAGES}",
        "--manage-all-nodes=true", f"--cidr={POD_CIDR}", f"--node-ip={NODE_IP}",
        f"--server-address=127.0.0.1:{port}",
    ])
    time.sleep(0.5)
    try:
        cluster.check_components()
    except KubeTestClusterError:
        cluster.stop()
        raise
