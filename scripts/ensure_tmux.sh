#!/usr/bin/env bash
# `processdistro top` is tested in a real terminal: tests/test_top.py drives it in tmux.
# Install Debian's tmux when none is on PATH.
set -euo pipefail
if command -v tmux >/dev/null; then
  exit 0
fi
echo "tmux not found: installing Debian's tmux package" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install tmux" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q tmux
