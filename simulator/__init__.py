"""``gpu-supervisor simulate``: the whole supervisor against a simulated GPU cluster.

A real control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager), kwok
playing the kubelets of simulated GPU nodes, and our real daemons as processes — an agent
per node on the NVML stand-in, a sidecar in every inference pod beside its part of the
stand-in engine (the API server on a group's leader, a worker process on each worker), two
controller replicas — driven through scenarios of injected faults. Runs from a clone: it
builds the control plane with Go (once, cached) and deploys the chart's own manifests.
"""
