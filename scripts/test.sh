#!/usr/bin/env bash
# Installs gsd-serve with its test dependencies and runs the whole test suite.
# Usage: bash scripts/test.sh [--fast] [pytest arguments...]
#   --fast: the tier a developer runs while working (a few minutes): leaves out the tests marked slow (the real
#   models for a while) and ray (a Ray cluster); CI (.ci/run) runs everything.
set -uo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [ "$a" = "--fast" ]; then args=(-m "not slow and not ray" "${args[@]+"${args[@]}"}"); else args+=("$a"); fi
done
bash scripts/install.sh --test || exit 1
# the serving tests start their own redis-server on a free loopback port (or use REDIS_URL): install it if missing
command -v redis-server >/dev/null || [ -n "${REDIS_URL:-}" ] || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
  && { apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 \
  && apt-get install -y -q redis-server >/dev/null 2>&1; }; }; } \
  || { echo "redis-server is missing and cannot be installed: the serving tests need it" >&2; exit 1; }
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# two workers (GSD_TEST_WORKERS; 0: one process): the tests on the Ray cluster go to one of them as a group
# (tests/conftest.py) while the other runs the rest; much of a test's time is spent waiting on processes it
# started, so two workers finish sooner even on 2 cores
# --durations: the slowest tests in every log, so a suite growing past its budget shows where
workers=${GSD_TEST_WORKERS:-2}
dist=(); [ "$workers" != 0 ] && dist=(-n "$workers" --dist loadgroup)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "${dist[@]+"${dist[@]}"}" "${args[@]+"${args[@]}"}"
rc=$?
# pytest exits 5 when it collected no tests: that is a failure here
[ $rc -eq 5 ] && { echo "no tests ran" >&2; exit 1; }
exit $rc
