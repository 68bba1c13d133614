"""The daemons. Each role wires probes, detectors, outputs and the HTTP endpoints."""
