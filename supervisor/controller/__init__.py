"""The controller's parts: report ingest, cluster health model, leader election with
fencing, persisted incident state, and the action executor.

``supervisor.roles.controller`` wires them; ``policies`` decides. Every Kubernetes call goes
through ``supervisor.kube.KubeClient``.
"""
