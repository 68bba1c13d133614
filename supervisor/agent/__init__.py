"""The node agent: NVML probes → detectors → findings → NodeConditions, metrics, reports.

``role`` is the agent itself, ``conditions`` and ``node_status`` its NodeConditions,
``metrics`` its collector, ``run`` assembles it from settings.
"""
