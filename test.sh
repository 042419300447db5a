#!/usr/bin/env bash
# matfit: run the test suite (installs first if needed; idempotent).
set -uo pipefail
cd "$(dirname "$0")"
./install.sh --no-run || { echo "matfit: installation failed" >&2; exit 1; }
export QT_QPA_PLATFORM=offscreen
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest exits 5 when it collected no test: that is a failure for CI, not a pass.
if [[ $rc -eq 5 ]]; then echo "matfit: no tests were collected" >&2; exit 1; fi
exit $rc
