#!/usr/bin/env bash
# Prints the absolute path of the upstream Gateway API standard-channel CRDs
# (config/crd/standard of sigs.k8s.io/gateway-api, the release pinned in
# go.mod), downloading the module into Go's module cache first if it is not
# there yet. weft does not ship these CRDs: the e2e harness installs them
# from here (`weft_e2e::mesh::install_gateway_api`, `kubectl apply
# --server-side -f <dir>`), the same release a user installs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
module=sigs.k8s.io/gateway-api

dir="$(go list -m -f '{{.Dir}}' "$module")"
if [ -z "$dir" ] || [ ! -d "$dir" ]; then
  go mod download "$module"
  dir="$(go list -m -f '{{.Dir}}' "$module")"
fi
crds="$dir/config/crd/standard"
if [ ! -f "$crds/gateway.networking.k8s.io_httproutes.yaml" ]; then
  echo "crds.sh: no standard-channel CRDs in $crds" >&2
  exit 1
fi
echo "$crds"
