#!/usr/bin/env bash
# Build zlib-ng in zlib-compatible mode (a drop-in libz.so.1) into PREFIX, to measure PNG decode with it:
#
#   benchmarks/build_zlib_ng_compat.sh /tmp/zlibng-compat
#   LD_LIBRARY_PATH=/tmp/zlibng-compat/lib python benchmarks/preprocess.py --images DIR ...
#
# Why: Pillow 13's _imaging links the system libz.so.1 (zlib 1.2.13 here) although `PIL.features.pilinfo()`
# says it was "compiled for zlib-ng 2.3.3". Inflate is lossless, so any zlib gives the same pixels; zlib-ng
# only inflates faster. The source comes from the `zlib-ng` Python package's sdist on PyPI (it vendors
# zlib-ng 2.3.3), fetched with pip. Needs cmake, make and a C compiler.
set -euo pipefail

prefix="${1:?usage: $0 PREFIX}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-binary :all: --no-deps -d "$work" "zlib-ng==1.1.0"
tar -xzf "$work"/zlib_ng-1.1.0.tar.gz -C "$work"
cmake -S "$work/zlib_ng-1.1.0/src/zlib_ng/zlib-ng" -B "$work/build" \
    -DZLIB_COMPAT=ON -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null
cmake --build "$work/build" -j "$(nproc)" >/dev/null
cmake --install "$work/build" >/dev/null
LD_LIBRARY_PATH="$prefix/lib" "$python" -c 'from PIL import features; print("Pillow now inflates with zlib", features.version("zlib"))'
