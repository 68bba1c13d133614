#!/usr/bin/env bash
# Make the report endpoint's TLS material: a private CA and a server certificate signed by
# it, for the names agents and sidecars use to reach the controller.
#
#   deploy/tls/make-report-cert.sh OUT_DIR [NAME ...]
#
# NAME is a DNS name or an IP address; default: the controller Service's names in the
# gpu-supervisor namespace. Writes OUT_DIR/ca.crt, ca.key, tls.crt, tls.key (keys 0600).
# Then, in the cluster:
#
#   kubectl -n gpu-supervisor create secret tls gpu-supervisor-report-tls \
#       --cert OUT_DIR/tls.crt --key OUT_DIR/tls.key
#   kubectl -n gpu-supervisor create configmap gpu-supervisor-report-ca \
#       --from-file ca.crt=OUT_DIR/ca.crt
#
# Keep ca.key offline (or delete it): it is needed only to sign the next certificate.
# An existing ca.crt/ca.key in OUT_DIR is reused, so re-running renews the server
# certificate without touching what agents trust.
set -euo pipefail
out=${1:?usage: make-report-cert.sh OUT_DIR [NAME ...]}
shift
names=("$@")
if ((${#names[@]} == 0)); then
    names=(gpu-supervisor-controller gpu-supervisor-controller.gpu-supervisor
           gpu-supervisor-controller.gpu-supervisor.svc
           gpu-supervisor-controller.gpu-supervisor.svc.cluster.local)
fi
san=""
for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
san=${san%,}

mkdir -p "$out"
umask 077
if [[ ! -s $out/ca.crt || ! -s $out/ca.key ]]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 3650 -subj "/CN=gpu-supervisor report CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=${names[0]}" -keyout "$out/tls.key" -out "$out/tls.csr" 2>/dev/null
ext=$(mktemp)
trap 'rm -f "$ext" "$out/tls.csr"' EXIT
cat > "$ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EXT
openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -CAserial "$out/ca.srl" -days 397 -extfile "$ext" \
    -out "$out/tls.crt" 2>/dev/null
chmod 0644 "$out/ca.crt" "$out/tls.crt"
echo "$out"
