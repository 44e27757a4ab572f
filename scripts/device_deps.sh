#!/usr/bin/env bash
# Downloads, here, the Debian packages that a GPU machine without a package registry may lack for
# building gpufleet (fmt, nlohmann_json, SQLite headers, GoogleTest) into .devdeps/ (git-ignored).
# Carry .devdeps to that machine; scripts/gpu_check.sh unpacks them into a private prefix (never
# into /) and uses them only for what the machine does not have.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devdeps
cd .devdeps
apt-get download libfmt-dev libfmt9 nlohmann-json3-dev libsqlite3-dev libsqlite3-0 libgtest-dev libgmock-dev
ls -l
