// Package conformance runs the upstream Gateway API conformance suite
// (sigs.k8s.io/gateway-api/conformance, the release pinned in ../go.mod)
// against weft, unchanged: RunConformance reads the suite's own flags
// (--gateway-class, --conformance-profiles, --report-output, ...). build.sh
// compiles it into a test binary that the e2e harness runs inside its node
// network namespace (e2e/tests/gateway_conformance.rs).
package conformance

import (
	"testing"

	"sigs.k8s.io/gateway-api/conformance"
)

func TestConformance(t *testing.T) {
	conformance.RunConformance(t)
}
