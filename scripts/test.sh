#!/usr/bin/env bash
# Installs gsd-serve with its test dependencies and runs the whole test suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test || exit 1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a failure here
[ $rc -eq 5 ] && { echo "no tests ran" >&2; exit 1; }
exit $rc
