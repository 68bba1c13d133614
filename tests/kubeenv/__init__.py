"""Real etcd + kube-apiserver for the test suite (see cluster.py)."""
