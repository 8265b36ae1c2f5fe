#!/usr/bin/env bash
# Installs the Python client with its extras into a fresh virtual environment and runs its tests
# against BUSSIG_TEST_URL (a database with bussig). Ends with pytest's summary and a cargo-style
# "test result:" line that .ci/test.sh counts; exits non-zero when a test failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${BUSSIG_TEST_URL:?set BUSSIG_TEST_URL to a conninfo of a database with bussig}"

venv=$(mktemp -d /tmp/bussig-python.XXXXXX)
trap 'rm -rf "$venv"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$here[otel,sqlalchemy]" pytest pytest-asyncio opentelemetry-sdk
# A copy of the tests, so that they import the installed package, not the source tree.
cp -r "$here/tests" "$here/pyproject.toml" "$venv/"

status=0
(cd "$venv" && "$venv/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$venv/junit.xml" tests) || status=$?
"$venv/bin/python" - "$venv/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, failures, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
failed = failures + errors
passed = tests - failed - skipped
print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed; {skipped} ignored; 0 measured; 0 filtered out")
PY
exit "$status"
