//go:build tools

// Package gatewayapi pins the upstream Gateway API release whose
// standard-channel CRDs the e2e harness installs (crds.sh prints where
// they are). Nothing here is built: the blank import keeps
// sigs.k8s.io/gateway-api in go.mod and go.sum. pkg/consts imports only
// the standard library, so pinning it pulls in no other module's code.
package gatewayapi

import _ "sigs.k8s.io/gateway-api/pkg/consts"
