#!/usr/bin/env bash
# Installs what `make demo` (demo) or `make test` (test, the default) needs, idempotently: Debian
# packages (only when root; otherwise prints the apt-get line to run), the venv at .venv and its PyPI
# packages. The demo needs no database server and no test tools: requirements/debian-demo.txt and
# requirements/demo.txt; the tests add requirements/debian.txt and requirements/dev.txt. Re-runs are
# cheap: stamps record what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-test}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
case "$mode" in
  demo) debian=(requirements/debian-demo.txt); pypi=requirements/demo.txt ;;
  test) debian=(requirements/debian-demo.txt requirements/debian.txt); pypi=requirements/dev.txt ;;
  *) echo "usage: scripts/bootstrap.sh [demo|test]: got '$mode'" >&2; exit 2 ;;
esac

want=$(cat "${debian[@]}" | grep -v '^\s*#' | awk 'NF' | tr '\n' ' ')
missing=()
for pkg in $want; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap ($mode): installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap ($mode): missing Debian packages (run as root): apt-get install -y ${missing[*]}" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements-$mode.sha"
sum=$(cat requirements/demo.txt "$pypi" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  echo "bootstrap ($mode): installing PyPI packages into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$pypi"
  echo "$sum" > "$stamp"
fi
