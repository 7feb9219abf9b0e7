#!/usr/bin/env bash
# Set up .venv with the dev extras and run the whole test suite (cluster and chaos
# tests included: they are marked, not skipped). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --dev
export PYTHONUNBUFFERED=1
# setup.sh --dev installed the browser: a missing one fails the dashboard tests here, not skips them.
export P2PSCHED_REQUIRE_BROWSER=1
set +e
.venv/bin/python -m pytest -q -ra --durations=15 "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
exit $rc
