#!/usr/bin/env bash
# Check that static/vendor/browser_wasi_shim/ holds exactly the published npm package files
# its README names: the tarball `npm pack` downloads must have the recorded sha256, every
# committed file (but the README) must equal the one in the package, and no dist/*.js of the
# package may be missing. Needs npm and network access to the npm registry.
set -euo pipefail
cd "$(dirname "$0")/.."
VENDOR=static/vendor/browser_wasi_shim
README=$VENDOR/README.md

field() { sed -n "s/^- $1: *//p" "$README" | head -n1; }
PACKAGE=$(field package | tr -d '`')
VERSION=$(field version)
SHA256=$(field "tarball sha256")
if [ -z "$PACKAGE" ] || [ -z "$VERSION" ] || [ -z "$SHA256" ]; then
  echo "check_vendor: $README must name '- package:', '- version:' and '- tarball sha256:'" >&2
  exit 1
fi
command -v npm >/dev/null || { echo "check_vendor: npm not found (apt-get install npm)" >&2; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
TARBALL=$(cd "$TMP" && npm pack --silent "$PACKAGE@$VERSION" | tail -n1)
ACTUAL=$(sha256sum "$TMP/$TARBALL" | cut -d' ' -f1)
if [ "$ACTUAL" != "$SHA256" ]; then
  echo "check_vendor: $PACKAGE@$VERSION tarball has sha256 $ACTUAL, $README records $SHA256" >&2
  exit 1
fi
tar -xzf "$TMP/$TARBALL" -C "$TMP"

status=0
while IFS= read -r -d '' file; do
  rel=${file#"$VENDOR"/}
  [ "$rel" = README.md ] && continue
  if [ ! -f "$TMP/package/$rel" ]; then
    echo "check_vendor: $file is not in $PACKAGE@$VERSION" >&2
    status=1
  elif ! cmp -s "$file" "$TMP/package/$rel"; then
    echo "check_vendor: $file differs from package/$rel of $PACKAGE@$VERSION" >&2
    status=1
  fi
done < <(find "$VENDOR" -type f -print0)
for file in "$TMP"/package/dist/*.js "$TMP"/package/LICENSE-*; do
  rel=${file#"$TMP"/package/}
  if [ ! -f "$VENDOR/$rel" ]; then
    echo "check_vendor: $PACKAGE@$VERSION has $rel, missing from $VENDOR" >&2
    status=1
  fi
done
if [ "$status" = 0 ]; then
  echo "check_vendor: $VENDOR equals $PACKAGE@$VERSION (tarball sha256 $SHA256)"
fi
exit "$status"
