// weft-podmonitor-check: strict decoding of prometheus-operator PodMonitors
// into the operator's own Go types (github.com/prometheus-operator/
// prometheus-operator/pkg/apis/monitoring/v1): an unknown or misspelt
// field, or a value of the wrong type, is an error. kubernetes-validate has
// no schema for the PodMonitor kind; this is the check weft's
// observability manifests get instead.
//
// Usage: weft-podmonitor-check FILE... (multi-document YAML). Every
// document must be a monitoring.coreos.com/v1 PodMonitor; prints one line
// per document and exits 1 on the first failure.
package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"sigs.k8s.io/yaml"
)

func check(doc []byte) (string, error) {
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		return "", err
	}
	if meta.APIVersion != "monitoring.coreos.com/v1" || meta.Kind != "PodMonitor" {
		return "", fmt.Errorf("not a monitoring.coreos.com/v1 PodMonitor: %s %s", meta.APIVersion, meta.Kind)
	}
	var pm monitoringv1.PodMonitor
	if err := yaml.UnmarshalStrict(doc, &pm); err != nil {
		return "", err
	}
	if len(pm.Spec.PodMetricsEndpoints) == 0 {
		return "", fmt.Errorf("%s/%s: no podMetricsEndpoints", pm.Namespace, pm.Name)
	}
	for i, ep := range pm.Spec.PodMetricsEndpoints {
		if ep.Port == nil && ep.PortNumber == nil {
			return "", fmt.Errorf("%s/%s: podMetricsEndpoints[%d] names no port", pm.Namespace, pm.Name, i)
		}
		if ep.Scheme != nil {
			switch s := strings.ToLower(ep.Scheme.String()); s {
			case "http", "https":
			default:
				return "", fmt.Errorf("%s/%s: podMetricsEndpoints[%d].scheme %q", pm.Namespace, pm.Name, i, s)
			}
		}
	}
	return pm.Namespace + "/" + pm.Name, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: weft-podmonitor-check FILE...")
		os.Exit(2)
	}
	n := 0
	for _, f := range os.Args[1:] {
		text, err := os.ReadFile(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		for _, doc := range bytes.Split(append([]byte("\n"), text...), []byte("\n---")) {
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			name, err := check(doc)
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", f, err)
				os.Exit(1)
			}
			fmt.Printf("%s: PodMonitor %s: ok\n", f, name)
			n++
		}
	}
	fmt.Printf("%d PodMonitors ok\n", n)
}
