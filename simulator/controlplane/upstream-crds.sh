#!/usr/bin/env bash
# Fetch the upstream CRDs the tests and the simulator install — Gateway API's HTTPRoute &
# co. and prometheus-operator's monitoring objects — from their Go modules (the only
# place they are served from here), and cache them.
#
# Prints the cache directory as the last line of stdout; it holds the CRD YAML files as
# upstream ships them, unmodified. The LeaderWorkerSet module is not served by the Go
# proxy, so its CRD stays ours (simulator/controlplane/crds/).
#
# Env: GATEWAY_API_VERSION, PROMETHEUS_OPERATOR_VERSION override the pinned versions.
set -euo pipefail

gateway_api="${GATEWAY_API_VERSION:-v1.6.3}"
prom_operator="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/crds/gateway-api-${gateway_api}_prometheus-operator-${prom_operator}"

if [[ -f "$cache/.complete" ]]; then
    echo "upstream-crds.sh: cached $cache" >&2
    echo "$cache"
    exit 0
fi
command -v go >/dev/null 2>&1 || { echo "upstream-crds.sh: 'go' not found on PATH" >&2; exit 1; }

# `go mod download` outside a module: GOFLAGS=-mod=mod and no go.work, so nothing around
# us is picked up. The module cache keeps the zips; we keep just the CRDs.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dirs="$(cd "$work" && GOWORK=off GOFLAGS=-mod=mod go mod download -json \
    "sigs.k8s.io/gateway-api@${gateway_api}" \
    "github.com/prometheus-operator/prometheus-operator@${prom_operator}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
gw_dir="$(grep gateway-api <<<"$dirs")"
po_dir="$(grep prometheus-operator <<<"$dirs")"

tmp="$cache.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
# Gateway API's standard channel, CRDs only (vap_safeupgrades is a ValidatingAdmission-
# Policy guarding upgrades, not a CRD).
for f in "$gw_dir"/config/crd/standard/gateway.networking.k8s.io_*.yaml; do
    [[ "$f" == *vap_safeupgrades* ]] || cp "$f" "$tmp/"
done
# prometheus-operator: the three kinds the chart renders.
for kind in servicemonitors podmonitors prometheusrules; do
    cp "$po_dir/example/prometheus-operator-crd/monitoring.coreos.com_${kind}.yaml" "$tmp/"
done
chmod -R u+w "$tmp"
touch "$tmp/.complete"
rm -rf "$cache"
mv "$tmp" "$cache"
echo "upstream-crds.sh: fetched into $cache" >&2
echo "$cache"
