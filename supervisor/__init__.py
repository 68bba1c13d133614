"""gpu-supervisor: health and fault tolerance for multi-node GPU model serving.

The package is split by role of the code, not by role of the daemon:

- ``supervisor.runtime``  task supervision, deadlines, retries, logging, shutdown
- ``supervisor.config``   settings, validated before anything starts
- ``supervisor.findings`` the one data model every layer speaks: a finding
- ``supervisor.detectors`` observations → findings (thresholds, rates, XID catalog)
- ``supervisor.kube``     the only module that talks to the Kubernetes API
- ``supervisor.http``     /livez, /readyz, /metrics, /status
- ``supervisor.roles``    the daemons (agent today; sidecar and controller next)

``probes`` reads hardware and peers and knows nothing of this package; ``policies`` decides
what to do about findings. ``supervisor`` wires them together.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpu-supervisor")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
