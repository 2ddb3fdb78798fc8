#!/usr/bin/env bash
# tests/test_prometheus.py runs a real Prometheus against a running controller and lints with
# promtool. Install Debian's prometheus package (both binaries) when either is missing.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
echo "prometheus/promtool not found: installing Debian's prometheus package" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install prometheus" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -q
# the package's own service is not wanted: the tests start Prometheus themselves
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
