"""``gpu-supervisor simulate``: the whole supervisor against a simulated GPU cluster.

A real control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager), kwok
playing the kubelets of simulated GPU nodes, and our real daemons as processes — an agent
per node on the NVML stand-in, the stand-in engine and a sidecar per inference pod, two
controller replicas — driven through scenarios of injected faults. Runs from a clone: it
builds the control plane with Go (once, cached) and deploys the chart's own manifests.
"""
