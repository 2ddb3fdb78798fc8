#!/usr/bin/env bash
# The agent's JavaScript unit tests run under Node's built-in test runner (node --test).
# Install Debian's nodejs when no node is on PATH.
set -euo pipefail
if command -v node >/dev/null; then
  exit 0
fi
echo "node not found: installing Debian's nodejs package" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install nodejs" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q nodejs
