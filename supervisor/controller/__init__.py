"""The controller role: report ingest, cluster health model, leader election with fencing,
persisted incident state, and the action executor.

``role`` is the controller itself and ``run`` assembles it from settings; ``policies``
decides. Every Kubernetes call goes through ``supervisor.kube.KubeClient``.
"""
