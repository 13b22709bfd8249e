#!/bin/sh
# Stands in for the CoreDNS image of the Gateway API conformance suite's
# base manifests (its UDP backend): the kubelet simulator has no image of
# it, and weft runs no UDPRoute test, but the suite waits for every pod of
# its namespaces to be ready. It idles until killed.
exec sleep infinity
