#!/usr/bin/env bash
# Build every WASM task kernel (each cdylib member of the wasm_tasks cargo workspace) for
# wasm32-unknown-unknown in release mode and copy target/.../release/<name>.wasm to
# static/wasm/<name>.wasm. `make wasm` runs this from the repo root; any cwd works.
# Then it builds the VARIANTS declared below (e.g. matrix_mul with its `simd` feature and
# -Ctarget-feature=+simd128, installed as static/wasm/matrix_mul_simd.wasm).
#
# Routes (automatic; force one with PD_WASM_ROUTE=rustup|debian):
#   rustup  used when `rustup target list --installed` lists wasm32-unknown-unknown:
#             cargo build --release --target wasm32-unknown-unknown      (linker: rust-lld)
#   debian  otherwise; needs `apt-get install rustc-web cargo-web rust-web-src lld`:
#             RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo build --release \
#                 -Z build-std=core,alloc --target wasm32-unknown-unknown   (linker: wasm-ld)
#           -Z build-std resolves the standard library's own dependencies from crates.io. If
#           that fails (offline machine), the build is retried with crates.io replaced by the
#           copies Debian vendors in /usr/lib/rustlib/src/rust/library/vendor.
#           PD_WASM_STD_VENDOR=always uses the vendored copies straight away; =never disables
#           the fallback.
#
# The committed static/wasm/*.wasm files are built with the DEBIAN route (rustc 1.96.0
# ac68faa20 2026-05-25, Debian rustc-web). The two routes use different compilers, so their
# bytes differ; wasm_tasks/check.sh rebuilds with the Debian route and compares sha256.
#
# Reproducibility: absolute paths (this checkout, the target dir, CARGO_HOME, the Rust source)
# are remapped with --remap-path-prefix, and the release profile strips symbols, debug info and
# custom sections (strip = true). The script refuses an output that still contains a path.
#
# Other environment knobs:
#   PD_WASM_OUT_DIR   where the .wasm files go (default: <repo>/static/wasm)
#   PD_WASM_PROJECT   build another cargo project the same way instead of wasm_tasks/ (e.g.
#                     examples/rust_rot13, a pd-ABI module depending on wasm_tasks/pd_abi): its
#                     cdylibs only, no VARIANTS; `make examples` sets it with PD_WASM_OUT_DIR
#   CARGO_TARGET_DIR  cargo's target dir (default: <project>/target, i.e. wasm_tasks/target,
#                     gitignored)
#   PD_WASM_LOCKED=1  pass --locked (Cargo.lock must be up to date; used by check.sh)
#   PD_DEBIAN_RUSTC, PD_DEBIAN_CARGO, PD_DEBIAN_RUST_SRC
#                     Debian route paths (default /usr/bin/rustc, /usr/bin/cargo,
#                     /usr/lib/rustlib/src/rust)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)" # .../wasm_tasks
REPO="$(dirname "$HERE")"
OUT_DIR="${PD_WASM_OUT_DIR:-$REPO/static/wasm}"
PROJECT="$(cd "${PD_WASM_PROJECT:-$HERE}" && pwd -P)" # the cargo project (workspace) built
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PROJECT/target}"
TARGET=wasm32-unknown-unknown
STD_VENDOR_MODE="${PD_WASM_STD_VENDOR:-auto}"
DEBIAN_RUSTC="${PD_DEBIAN_RUSTC:-/usr/bin/rustc}"
DEBIAN_CARGO="${PD_DEBIAN_CARGO:-/usr/bin/cargo}"
DEBIAN_RUST_SRC="${PD_DEBIAN_RUST_SRC:-/usr/lib/rustlib/src/rust}"
DEBIAN_STD_VENDOR="$DEBIAN_RUST_SRC/library/vendor"

die() {
    echo "wasm build: $*" >&2
    exit 1
}

# ---- choose the route -------------------------------------------------------------------
route="${PD_WASM_ROUTE:-}"
if [[ -z "$route" ]]; then
    if command -v rustup >/dev/null 2>&1 &&
        rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        route=rustup
    else
        route=debian
    fi
fi

rust_src=""
case "$route" in
rustup)
    command -v rustup >/dev/null 2>&1 || die "PD_WASM_ROUTE=rustup but rustup is not on PATH"
    rustup target list --installed 2>/dev/null | grep -qx "$TARGET" ||
        die "the rustup toolchain lacks $TARGET; run: rustup target add $TARGET"
    cargo_bin="$(dirname "$(command -v rustup)")/cargo" # rustup's proxy, beside rustup
    [[ -x "$cargo_bin" ]] || cargo_bin=cargo
    # .cargo/config.toml names wasm-ld (Debian route); rustup ships rust-lld instead.
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=rust-lld
    rust_src="$("$(dirname "$cargo_bin")/rustc" --print sysroot 2>/dev/null || true)"
    [[ -n "$rust_src" ]] && rust_src="$rust_src/lib/rustlib/src/rust"
    cargo_args=(build --release --target "$TARGET")
    ;;
debian)
    if [[ ! -x "$DEBIAN_RUSTC" || ! -x "$DEBIAN_CARGO" || ! -d "$DEBIAN_RUST_SRC/library" ]]; then
        die "no wasm32 Rust toolchain found.
  Either install the target with rustup:   rustup target add $TARGET
  or install Debian's toolchain packages:  sudo apt-get install rustc-web cargo-web rust-web-src lld
  (needs $DEBIAN_RUSTC, $DEBIAN_CARGO and $DEBIAN_RUST_SRC/library)"
    fi
    command -v wasm-ld >/dev/null 2>&1 || die "wasm-ld not found: sudo apt-get install lld"
    cargo_bin="$DEBIAN_CARGO"
    export RUSTC="$DEBIAN_RUSTC" RUSTC_BOOTSTRAP=1
    rust_src="$DEBIAN_RUST_SRC"
    cargo_args=(build --release -Z build-std=core,alloc --target "$TARGET")
    ;;
*)
    die "PD_WASM_ROUTE must be rustup or debian (got '$route')"
    ;;
esac
cargo_args+=(--message-format=json-render-diagnostics)
[[ "${PD_WASM_LOCKED:-0}" == 1 ]] && cargo_args+=(--locked)

# ---- reproducible flags -----------------------------------------------------------------
# When several prefixes match, rustc applies the last one given: most specific last.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
flags=()
[[ -n "$rust_src" ]] && flags+=("--remap-path-prefix=$rust_src=/rust")
flags+=("--remap-path-prefix=$cargo_home=/cargo")
flags+=("--remap-path-prefix=$HERE=/processdistro/wasm_tasks")
if [[ "$PROJECT" != "$HERE" ]]; then
    project_rel="${PROJECT#"$REPO"/}" # examples/<name>; a project outside the repo: its name
    [[ "$project_rel" != "$PROJECT" ]] || project_rel="$(basename "$PROJECT")"
    flags+=("--remap-path-prefix=$PROJECT=/processdistro/$project_rel")
fi
mkdir -p "$CARGO_TARGET_DIR"
flags+=("--remap-path-prefix=$(cd "$CARGO_TARGET_DIR" && pwd -P)=/processdistro/target")
CARGO_ENCODED_RUSTFLAGS="$(IFS=$'\x1f'; echo "${flags[*]}")"
export CARGO_ENCODED_RUSTFLAGS
unset RUSTFLAGS

# ---- variant declarations ---------------------------------------------------------------
# Extra builds of one member with a cargo feature and extra rustc target features, each in its
# own target dir (under $CARGO_TARGET_DIR, so it is remapped like the rest; with -Z build-std
# `core` gets the same target features), installed under another name. One line each:
#   "<output name> <package> <cargo feature> <rustc target-feature list>"
VARIANTS=(
    "matrix_mul_simd matrix_mul simd +simd128" # WebAssembly SIMD128 (f64x2/f32x4 mul + add)
    "mandelbrot_simd mandelbrot simd +simd128" # four pixels in lockstep in two f64x2 registers
    "password_hash_simd password_hash simd +simd128" # multi-buffer SHA-256: 4 chains in i32x4
)

# ---- build --------------------------------------------------------------------------------
log="$(mktemp)"
json="$(mktemp)"
trap 'rm -f "$log" "$json"' EXIT

run_cargo() { # extra args...; stdout (JSON) -> $json, stderr shown and kept in $log
    { (cd "$PROJECT" && "$cargo_bin" "${cargo_args[@]}" "$@") >"$json"; } 2>&1 | tee "$log" >&2
}

vendor_args=(--config "source.crates-io.replace-with=\"pd-rust-std-vendor\""
    --config "source.pd-rust-std-vendor.directory=\"$DEBIAN_STD_VENDOR\"")

build() { # extra cargo args...; the JSON messages end up in $json
    if [[ "$route" == debian && "$STD_VENDOR_MODE" == always ]]; then
        run_cargo "$@" "${vendor_args[@]}" || die "cargo build failed (vendored std dependencies)"
    elif ! run_cargo "$@"; then
        if [[ "$route" == debian && "$STD_VENDOR_MODE" == auto && -d "$DEBIAN_STD_VENDOR" ]] &&
            grep -qiE 'crates\.io|registry|index|download|network|resolve|offline' "$log"; then
            echo "wasm build: fetching the std library's dependencies failed;" \
                "retrying with the vendored copies in $DEBIAN_STD_VENDOR" >&2
            run_cargo "$@" "${vendor_args[@]}" || die "cargo build failed (vendored std dependencies)"
        else
            die "cargo build failed"
        fi
    fi
}

built_wasms() { # the .wasm artifacts named in $json
    grep -o '"[^"]*\.wasm"' "$json" | tr -d '"' | sort -u
}

install_wasm() { # $1 = built .wasm, $2 = output name (without .wasm)
    local w="$1" name="$2.wasm" leak size sum
    # Refuse outputs that leak an absolute path (breaks reproducibility across machines).
    if leak="$(LC_ALL=C grep -aoE '/(home|root|usr|tmp|var|opt|work|Users|build)/[[:print:]]{0,60}' "$w" | head -n 3)" &&
        [[ -n "$leak" ]]; then
        die "$name contains absolute paths:
$leak"
    fi
    cp "$w" "$OUT_DIR/$name.tmp"
    chmod 0644 "$OUT_DIR/$name.tmp"
    mv -f "$OUT_DIR/$name.tmp" "$OUT_DIR/$name"
    size="$(wc -c <"$OUT_DIR/$name" | tr -d ' ')"
    sum="$(sha256sum "$OUT_DIR/$name" | cut -d' ' -f1)"
    echo "wasm build: $OUT_DIR/$name  $size bytes  sha256 $sum"
}

echo "wasm build: route=$route cargo=$cargo_bin target-dir=$CARGO_TARGET_DIR" >&2
build --workspace

# ---- collect artifacts --------------------------------------------------------------------
mapfile -t wasms < <(built_wasms)
((${#wasms[@]} > 0)) || die "cargo produced no .wasm artifact (is crate-type cdylib set?)"

mkdir -p "$OUT_DIR"
for w in "${wasms[@]}"; do
    install_wasm "$w" "$(basename "$w" .wasm)"
done

# ---- variants -----------------------------------------------------------------------------
base_rustflags="$CARGO_ENCODED_RUSTFLAGS"
main_target_dir="$CARGO_TARGET_DIR"
[[ "$PROJECT" == "$HERE" ]] || VARIANTS=() # the variants are wasm_tasks/ members
for v in "${VARIANTS[@]}"; do
    read -r v_name v_pkg v_feature v_target_features <<<"$v"
    export CARGO_TARGET_DIR="$main_target_dir/variant-$v_name"
    CARGO_ENCODED_RUSTFLAGS="$base_rustflags"$'\x1f'"-Ctarget-feature=$v_target_features"
    export CARGO_ENCODED_RUSTFLAGS
    echo "wasm build: variant $v_name = $v_pkg --features $v_feature, -Ctarget-feature=$v_target_features" >&2
    build -p "$v_pkg" --features "$v_feature"
    mapfile -t wasms < <(built_wasms | grep "/$v_pkg\.wasm\$")
    ((${#wasms[@]} == 1)) || die "variant $v_name: expected one $v_pkg.wasm artifact"
    install_wasm "${wasms[0]}" "$v_name"
done
export CARGO_TARGET_DIR="$main_target_dir" CARGO_ENCODED_RUSTFLAGS="$base_rustflags"
