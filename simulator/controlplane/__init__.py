"""The simulator's Kubernetes control plane (also the test suite's): see README.md here."""
