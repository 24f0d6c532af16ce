#!/usr/bin/env bash
# Make .venv and install vlm_hpc with its test extra. Safe to re-run.
# torch is pinned because on these machines `torch==2.13.0` resolves to the CPU build on disk, while an
# unpinned torch pulls gigabytes of CUDA packages; on a GPU machine it installs the CUDA build of 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
