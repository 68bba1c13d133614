#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it all:
# static checks (ruff, mypy --strict, import contracts, hadolint) and pytest, which starts
# real agents on the NVML stand-in, real sidecars beside stand-in engines and a real vLLM,
# sidecars in network namespaces cut with iptables, a real kube-apiserver + etcd, the Helm
# chart linted and installed with a helm built from its Go module, and a real Prometheus.
#
# Safe to rerun: apt packages, the venv, the stand-in, the apiserver and helm builds and the
# upstream CRDs are reused (cached under ~/.cache/gpu-supervisor).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

# --- system tools --------------------------------------------------------------------
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)   # promtool check metrics/rules
command -v ip >/dev/null 2>&1 || missing+=(iproute2)            # network namespaces
command -v iptables >/dev/null 2>&1 || missing+=(iptables)      # cutting links in tests
command -v openssl >/dev/null 2>&1 || missing+=(openssl)        # report TLS certificates
command -v cc >/dev/null 2>&1 || missing+=(gcc)                 # the NVML stand-in
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null 2>&1 || { echo "Go is required to build kube-apiserver" >&2; exit 1; }

# --- Python ----------------------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
fi
log "pip install -e .[test]"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
export PATH="$PWD/.venv/bin:$PATH"

# --- builds (cached under ~/.cache/gpu-supervisor) ----------------------------------------
log "building the NVML stand-in"
python -m probes.nvml_standin build
log "building etcd + kube-apiserver, -scheduler, -controller-manager (first build takes minutes, then cached)"
KUBE_TESTENV_BINARY="$(bash simulator/controlplane/build.sh | tail -n 1)"
export KUBE_TESTENV_BINARY
log "building kwok (the simulator's kubelets; first build ~5 min, then cached)"
KWOK_BINARY="$(bash simulator/controlplane/build-kwok.sh | tail -n 1)"
export KWOK_BINARY
log "building helm from its Go module (first build ~5-9 min, then cached)"
HELM="$(bash scripts/build-helm.sh | tail -n 1)"
export HELM
log "fetching upstream CRDs (Gateway API, prometheus-operator) with go mod download"
KUBE_TESTENV_CRDS="$(bash simulator/controlplane/upstream-crds.sh | tail -n 1)"
export KUBE_TESTENV_CRDS
log "installing a real vLLM (CPU build) for the sidecar tests (first time ~5 min, then cached)"
bash tests/vllm/install.sh >/dev/null

# --- static checks ---------------------------------------------------------------------
log "ruff"
ruff check .
log "mypy --strict"
mypy
log "hadolint"
hadolint Dockerfile

# --- tests -----------------------------------------------------------------------------
log "pytest"
python -m pytest -q "$@"
