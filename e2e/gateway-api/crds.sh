#!/usr/bin/env bash
# Usage: crds.sh [standard|experimental]   (default: standard)
# Prints the absolute path of the upstream Gateway API CRDs of that channel
# (config/crd/<channel> of sigs.k8s.io/gateway-api, the release pinned in
# go.mod), downloading the module into Go's module cache first if it is not
# there yet. TLSRoute, which TLS passthrough listeners take, is of the
# experimental channel. weft does not ship these CRDs: the e2e harness installs them
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
channel="${1:-standard}"
case "$channel" in
  standard|experimental) ;;
  *) echo "crds.sh: channel must be standard or experimental, not $channel" >&2; exit 2 ;;
esac
crds="$dir/config/crd/$channel"
if [ ! -f "$crds/gateway.networking.k8s.io_httproutes.yaml" ]; then
  echo "crds.sh: no $channel-channel CRDs in $crds" >&2
  exit 1
fi
echo "$crds"
