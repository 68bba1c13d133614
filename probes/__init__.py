"""Probes read the world — GPUs through NVML, later engines, peers and collectives.

A probe produces *observations*: plain, immutable samples of what it read. It decides
nothing and knows nothing of findings, Kubernetes or the daemon runtime; ``supervisor``
calls it under a deadline and feeds the observations to detectors. One module per probe
family; ``probes.nvml`` is the only module in the project allowed to import ``pynvml``.
"""
