"""The sidecar: engine data-plane liveness, reachability among the members of a pipeline
group, and the pod's traffic signal.

``role`` is the sidecar itself, ``identity`` who it is (pod, group, rank, peers),
``membership`` the group protocol it runs with its peers, ``metrics`` its collector, ``run``
assembles it from settings. Its probes are ``probes.engine`` and ``probes.peers``; its
detectors ``supervisor.detectors.engine`` and ``supervisor.detectors.peers``.
"""
