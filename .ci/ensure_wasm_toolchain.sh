#!/usr/bin/env bash
# The committed .wasm files are built with Debian's Rust (see docs/wasm-abi.md); install it
# when missing so the reproducibility check can run on a bare machine.
set -euo pipefail
if [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && command -v wasm-ld >/dev/null && [ -d /usr/lib/rustlib/src/rust ]; then
  exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q rustc-web cargo-web rust-web-src lld
