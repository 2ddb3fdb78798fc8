#!/usr/bin/env bash
# CI check: the committed static/wasm/<name>.wasm files are exactly what the sources in
# wasm_tasks/ build to.
#
# The committed files are built with the DEBIAN route of build.sh (rustc-web 1.96.0
# ac68faa20 2026-05-25 + rust-web-src + lld, `-Z build-std=core,alloc`), so this check forces
# PD_WASM_ROUTE=debian. A rustup-built module differs in bytes (another compiler and a
# prebuilt core), which is why the route is pinned here and in docs/wasm-abi.md.
#
# It copies wasm_tasks/ (without target/) to two temporary directories with different paths,
# builds each with its own target dir and --locked, and then requires
#   1. both builds to be byte-identical (deterministic, path-independent), and
#   2. every built module to equal the committed static/wasm/<name>.wasm (sha256).
# "Every built module" includes the variants build.sh declares (matrix_mul_simd.wasm, the
# +simd128 build of matrix_mul), since build.sh installs them into the same output directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)" # .../wasm_tasks
REPO="$(dirname "$HERE")"
COMMITTED="$REPO/static/wasm"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/pd-wasm-check.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

build_copy() { # $1 = label; builds into $tmp/$1/out, log in $tmp/$1.log
    local dir="$tmp/$1"
    mkdir -p "$dir/wasm_tasks" "$dir/out"
    tar -C "$HERE" --exclude=./target -cf - . | tar -C "$dir/wasm_tasks" -xf -
    PD_WASM_ROUTE=debian PD_WASM_LOCKED=1 \
        CARGO_TARGET_DIR="$dir/target" PD_WASM_OUT_DIR="$dir/out" \
        bash "$dir/wasm_tasks/build.sh" >"$tmp/$1.log" 2>&1
}

echo "wasm check: building twice (Debian route) in $tmp ..."
build_copy one &
pid1=$!
build_copy second-build &
pid2=$!
fail=0
wait "$pid1" || fail=1
wait "$pid2" || fail=1
if ((fail)); then
    cat "$tmp/one.log" "$tmp/second-build.log" >&2
    echo "wasm check: FAILED to build" >&2
    exit 1
fi

status=0
shopt -s nullglob
built=("$tmp/one/out/"*.wasm)
((${#built[@]} > 0)) || { echo "wasm check: nothing was built" >&2; exit 1; }
for w in "${built[@]}"; do
    name="$(basename "$w")"
    h1="$(sha256sum "$w" | cut -d' ' -f1)"
    h2="$(sha256sum "$tmp/second-build/out/$name" 2>/dev/null | cut -d' ' -f1 || true)"
    if [[ "$h1" != "$h2" ]]; then
        echo "wasm check: $name is NOT deterministic: build 1 $h1, build 2 ${h2:-missing}" >&2
        status=1
        continue
    fi
    if [[ ! -f "$COMMITTED/$name" ]]; then
        echo "wasm check: static/wasm/$name is missing (built: $h1)" >&2
        echo "  run make wasm and commit static/wasm/" >&2
        status=1
        continue
    fi
    hc="$(sha256sum "$COMMITTED/$name" | cut -d' ' -f1)"
    if [[ "$h1" != "$hc" ]]; then
        echo "wasm check: static/wasm/$name does not match its source" >&2
        echo "  committed: $hc" >&2
        echo "  built:     $h1" >&2
        echo "  run make wasm and commit static/wasm/" >&2
        status=1
    else
        echo "wasm check: static/wasm/$name OK  sha256 $h1"
    fi
done
for c in "$COMMITTED/"*.wasm; do
    [[ -f "$tmp/one/out/$(basename "$c")" ]] ||
        echo "wasm check: note: static/wasm/$(basename "$c") is not built by wasm_tasks/ (not checked)"
done
exit "$status"
