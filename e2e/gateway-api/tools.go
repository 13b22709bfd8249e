//go:build tools

// Package gatewayapi pins the upstream Gateway API release (go.mod): the
// harness installs its standard-channel CRDs (crds.sh prints where they
// are), builds its conformance suite (conformance/) and the suite's echo
// backend (echo-basic) with build.sh. The blank import keeps the echo
// backend's packages in go.sum.
package gatewayapi

import (
	_ "sigs.k8s.io/gateway-api/conformance/echo-basic/grpc"
	_ "sigs.k8s.io/gateway-api/pkg/consts"
)
