"""gpu-supervisor: health and fault tolerance for multi-node GPU model serving.

Where things live — one rule for every role:

- ``probes/`` (a sibling package) reads the world — NVML, an inference engine's HTTP
  surface, the peers of a group — and decides nothing;
- ``supervisor.detectors`` turns those observations into findings (thresholds, rates, the
  XID catalog, engine stalls, peer reachability);
- one package per role — ``supervisor.agent``, ``supervisor.sidecar``,
  ``supervisor.controller`` — holds that role's ``role`` (the daemon object), its ``run``
  (assembly from settings) and the parts only it uses;
- what two roles share sits at the top: ``runtime`` (task supervision, deadlines,
  retries, logging), ``config``, ``findings``, ``kube`` (the only module that talks to the
  Kubernetes API), ``http``, ``tls``, ``reporting``, ``metrics``, ``daemon`` (the life of
  every role), ``cli``.

``policies`` (also a sibling) decides what to do about findings; ``supervisor`` wires it all.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpu-supervisor")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
