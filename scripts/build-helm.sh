#!/usr/bin/env bash
# Build (or reuse) the helm CLI from its Go module, helm.sh/helm/v3 — no release download
# needed, only the Go module proxy. Prints the binary's path as the last line of stdout.
#
# Cached under ${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/helm/<version>/helm; a cold
# build takes about 5 minutes on 2 cores. HELM_VERSION overrides the pinned version.
set -euo pipefail

version="${HELM_VERSION:-v3.22.0}"
# v2: built with the release ldflags (version, default Kubernetes version), see below.
dir="${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/helm/$version-v2"
bin="$dir/helm"
if [[ -x "$bin" ]]; then
    echo "build-helm.sh: cached $bin" >&2
    echo "$bin"
    exit 0
fi
command -v go >/dev/null 2>&1 || { echo "build-helm.sh: 'go' not found on PATH" >&2; exit 1; }
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
if [[ -x "$bin" ]]; then echo "$bin"; exit 0; fi
tmp="$(mktemp -d "$dir/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "build-helm.sh: building helm $version from helm.sh/helm/v3 (first time ~5 min) ..." >&2
start=$(date +%s)
# Helm's Makefile stamps the version and the Kubernetes version `helm template` and
# `helm lint` assume (client-go's minor, major+1) with -X; without them both default to
# Kubernetes 1.20 and refuse charts needing newer. Do the same from the module's go.mod.
moddir="$(cd "$tmp" && GOWORK=off GOFLAGS=-mod=mod go mod download -json "helm.sh/helm/v3@${version}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
client_go="$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$moddir/go.mod")"  # v0.37.0
IFS=. read -r cg_major cg_minor _ <<<"${client_go#v}"
k8s_major=$((cg_major + 1))
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${version}"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X ${pkg}.k8sVersionMajor=${k8s_major} -X ${pkg}.k8sVersionMinor=${cg_minor}"
done
# `go install module@version` builds outside any module: no go.work, no replace, the
# module's own go.sum pins its dependencies.
(cd "$tmp" && GOWORK=off GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@${version}")
mv "$tmp/helm" "$bin"
echo "build-helm.sh: built $bin in $(( $(date +%s) - start )) s" >&2
echo "$bin"
