#!/usr/bin/env bash
# makima for developers: `./dev.sh run` installs and starts makima; `./dev.sh test` installs and runs the tests.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
PORT=${PORT:-8000}

install() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
case "$cmd" in
  run)
    install
    .venv/bin/python manage.py migrate --noinput
    .venv/bin/python manage.py setup_schedules
    .venv/bin/python manage.py demo_setup
    # The django-q2 cluster runs the orchestrator's safety-net tick; Ctrl-C stops it too.
    .venv/bin/python manage.py qcluster &
    cluster=$!
    trap 'kill "$cluster" 2>/dev/null; wait "$cluster" 2>/dev/null' EXIT INT TERM
    echo "makima: http://127.0.0.1:${PORT}/admin/  (API docs: http://127.0.0.1:${PORT}/api/docs/)"
    # daphne drops websocket frames over its own limit silently; let makima's
    # limit (MAKIMA_WS_MAX_BYTES) answer them with `too_large` instead.
    ws_limit=$(( 2 * ${MAKIMA_WS_MAX_BYTES:-1048576} ))
    .venv/bin/python -m daphne -b 127.0.0.1 -p "$PORT" \
      --websocket-max-message-size "$ws_limit" --websocket-max-frame-size "$ws_limit" \
      makima.asgi:application
    ;;
  test)
    install
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run | test [pytest arguments]" >&2
    exit 2
    ;;
esac
