#!/usr/bin/env bash
# mypy cannot follow setuptools' package-dir mapping, so build the installed layout from
# symlinks (.lint/processdistro/...) and check the package as users import it.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .lint
mkdir -p .lint/processdistro
for f in cli/*.py; do ln -s "../../$f" ".lint/processdistro/$(basename "$f")"; done
for d in shared gateway scheduler aggregator worker; do
  [ -d "$d" ] && ln -s "../../$d" ".lint/processdistro/$d"
done
echo .lint
