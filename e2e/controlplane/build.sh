#!/usr/bin/env bash
# Builds weft's e2e control plane (etcd + kube-apiserver +
# kube-controller-manager + kube-scheduler from their Go modules) into
# <repo>/target/controlplane/weft-controlplane. Skipped while that binary is
# newer than every file here (go-build-fresh.sh); otherwise Go's module and
# build caches make a rebuild after the first one cheap.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/controlplane/weft-controlplane"
mkdir -p "$(dirname "$out")"
cd "$here"
# shellcheck source=../go-build-fresh.sh
. "$here/../go-build-fresh.sh"
if fresh "$out"; then
  echo "up to date: $out"
  exit 0
fi
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
go build -trimpath -ldflags "-s -w" -o "$out" .
echo "built $out"
