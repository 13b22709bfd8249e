#!/usr/bin/env bash
# Builds weft's e2e control plane (etcd + kube-apiserver +
# kube-controller-manager + kube-scheduler from their Go modules) into
# <repo>/target/controlplane/weft-controlplane. Go's module and build caches
# make a rebuild after the first one cheap.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/controlplane/weft-controlplane"
mkdir -p "$(dirname "$out")"
cd "$here"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
go build -trimpath -ldflags "-s -w" -o "$out" .
echo "built $out"
