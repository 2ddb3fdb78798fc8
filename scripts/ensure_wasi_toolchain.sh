#!/usr/bin/env bash
# examples/ and the WASI tests build C programs for WASI with Debian's clang, lld, wasi-libc
# and the wasm32 compiler runtime (clang --target=wasm32-wasi --sysroot=/usr). Install them
# when missing.
set -euo pipefail
have() {
  command -v clang >/dev/null && command -v wasm-ld >/dev/null && command -v cc >/dev/null \
    && [ -f /usr/lib/wasm32-wasi/libc.a ] && [ -f /usr/include/wasm32-wasi/stdio.h ] \
    && compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a" >/dev/null
}
if have; then
  exit 0
fi
echo "the C toolchain for WASI is missing: installing Debian's clang lld wasi-libc libclang-rt-dev-wasm32" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install the WASI toolchain" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q clang lld wasi-libc libclang-rt-dev-wasm32 gcc libc6-dev
have || { echo "installed the WASI toolchain, but it is still incomplete" >&2; exit 1; }
