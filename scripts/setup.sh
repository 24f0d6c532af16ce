#!/usr/bin/env bash
# Make .venv and install vlm_hpc with its test extra. Safe to re-run.
# torch is pinned because on these machines `torch==2.13.0` resolves to the CPU build on disk, while an
# unpinned torch pulls gigabytes of CUDA packages; on a GPU machine it installs the CUDA build of 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
# The C resampler is optional for users without a compiler; with one, a failed build is a bug to see here.
resampler=$(.venv/bin/python -c "from vlm_hpc.preprocess.resampling import resampler; print(resampler())")
echo "bicubic resize: $resampler"
if [ "$resampler" = "Pillow" ] && command -v cc >/dev/null; then
    echo "vlm_hpc._bicubic did not build although a C compiler is here; rerun: .venv/bin/python -m pip install -v -e ." >&2
    exit 1
fi
# tests/test_report.py opens the report page in Debian's headless Chromium: as root, install it when it is missing
# (without root the test skips, except in CI).
if [ "$(id -u)" -eq 0 ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    echo "installing chromium (for tests/test_report.py)"
    { apt-get update -qq -o DPkg::Lock::Timeout=120 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 chromium; } >/dev/null ||
        { echo "apt-get install chromium failed; tests/test_report.py needs it" >&2; exit 1; }
fi
