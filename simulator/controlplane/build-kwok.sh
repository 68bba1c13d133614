#!/usr/bin/env bash
# Build (or reuse) kwok, which plays the kubelets of the simulator's GPU nodes.
#
# `go install sigs.k8s.io/kwok/cmd/kwok@<version>` from the Go module proxy (kwok's own
# go.mod, no replace directives, so no wrapper module is needed). Prints the binary's
# absolute path as the last line of stdout; progress goes to stderr. Cached under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/kwok/<version>/kwok
# so a second run returns at once. A cold build takes about 3-5 minutes on 2 cores.
#
# Env:
#   KWOK_REBUILD=1  ignore the cache and rebuild
set -euo pipefail

version="v0.8.0"

if ! command -v go >/dev/null 2>&1; then
    echo "build-kwok.sh: 'go' not found on PATH; install Go >= 1.26" >&2
    exit 1
fi

dir="${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/kwok/$version"
bin="$dir/kwok"
if [[ -x "$bin" && "${KWOK_REBUILD:-0}" != "1" ]]; then
    echo "build-kwok.sh: cached $bin" >&2
    echo "$bin"
    exit 0
fi
mkdir -p "$dir"
exec 9>"$dir/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [[ -x "$bin" && "${KWOK_REBUILD:-0}" != "1" ]]; then
        echo "$bin"
        exit 0
    fi
fi

tmp="$(mktemp -d "$dir/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "build-kwok.sh: building kwok $version ($(go env GOVERSION)) into $dir ..." >&2
start=$(date +%s)
# GOTOOLCHAIN=auto: kwok's go.mod asks for a newer Go than some machines have; the proxy
# serves the toolchain too.
(cd "$tmp" && GOWORK=off GOBIN="$tmp" CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-auto}" \
    GOFLAGS="-trimpath -buildvcs=false" \
    go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$version" >&2)
"$tmp/kwok" --version >/dev/null 2>&1 || "$tmp/kwok" --help >/dev/null
mv -f "$tmp/kwok" "$bin"
end=$(date +%s)
echo "build-kwok.sh: built $bin in $((end - start)) s" >&2
echo "$bin"
