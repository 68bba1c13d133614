#!/usr/bin/env bash
# Build (or reuse) the kube-testenv binary: real etcd + kube-apiserver in one Go program.
#
# Prints the binary's absolute path as the last line of stdout; everything else goes to
# stderr. The binary is cached under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/kube-testenv/<k8s-version>-<hash>/kube-testenv
# where <hash> covers go.mod, go.sum and main.go, so a second run returns at once.
#
# Needs only a Go toolchain (>= 1.25, or GOTOOLCHAIN=auto) and the Go module proxy.
# A cold build of k8s.io/kubernetes/cmd/kube-apiserver takes several minutes on 2 cores.
#
# Env:
#   KUBE_TESTENV_REBUILD=1  ignore the cache and rebuild
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: 'go' not found on PATH; install Go >= 1.25" >&2
    exit 1
fi

k8s_version="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' go.mod)"
if [[ -z "$k8s_version" ]]; then
    echo "build.sh: cannot find k8s.io/kubernetes version in go.mod" >&2
    exit 1
fi
src_hash="$(cat go.mod go.sum main.go build.sh | sha256sum | cut -c1-12)"
key="${k8s_version}-${src_hash}"

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/kube-testenv"
dir="$cache_root/$key"
bin="$dir/kube-testenv"

if [[ -x "$bin" && "${KUBE_TESTENV_REBUILD:-0}" != "1" ]]; then
    echo "build.sh: cached $bin" >&2
    echo "$bin"
    exit 0
fi

mkdir -p "$dir"

# Serialise concurrent builders (e.g. parallel test workers); the loser reuses the result.
exec 9>"$dir/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [[ -x "$bin" && "${KUBE_TESTENV_REBUILD:-0}" != "1" ]]; then
        echo "build.sh: cached $bin (built by a concurrent run)" >&2
        echo "$bin"
        exit 0
    fi
fi

tmp="$dir/.kube-testenv.tmp.$$"
trap 'rm -f "$tmp"' EXIT

echo "build.sh: building kube-testenv (k8s.io/kubernetes $k8s_version, $(go env GOVERSION)) into $dir ..." >&2
start=$(date +%s)
# GOWORK=off: never pick up a go.work from a parent directory.
# CGO_ENABLED=0: static binary, as upstream builds kube-apiserver.
# The version stamp upstream's release build sets: without it /version says
# v0.0.0-master, and clients that check the server version (helm's kubeVersion) refuse it.
IFS=. read -r k8s_major k8s_minor _ <<<"${k8s_version#v}"
ldflags="-s -w"
for var in gitVersion=${k8s_version} gitMajor=${k8s_major} gitMinor=${k8s_minor} \
           gitTreeState=clean; do
    ldflags+=" -X k8s.io/component-base/version.${var}"
done
GOWORK=off CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=readonly" \
    go build -trimpath -ldflags "$ldflags" -o "$tmp" . >&2
"$tmp" version >/dev/null
mv -f "$tmp" "$bin"
trap - EXIT
end=$(date +%s)
echo "build.sh: built $bin in $((end - start)) s" >&2

echo "$bin"
