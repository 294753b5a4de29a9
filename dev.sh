#!/usr/bin/env bash
# makima for developers: `./dev.sh run` installs and starts makima; `./dev.sh test` installs and runs the tests.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
PORT=${PORT:-8000}

# The browser tests drive Debian's chromium (never a downloaded browser).
install_chromium() {
  [ -n "${MAKIMA_CHROMIUM:-}" ] && return 0
  command -v chromium >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  else
    echo "chromium not found: install it or set MAKIMA_CHROMIUM to its path (browser tests need it)" >&2
  fi
}

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
    export PATH="$PWD/.venv/bin:$PATH"  # the daemon's agents and verifiers use this Python
    export MAKIMA_PUBLIC_URL=${MAKIMA_PUBLIC_URL:-http://127.0.0.1:${PORT}}
    python manage.py migrate --noinput
    python manage.py setup_schedules
    demo=$(python manage.py demo_setup --start)
    echo "$demo"
    directive=$(echo "$demo" | sed -n 's/^Demo directive: \([0-9a-f-]*\).*/\1/p')
    token=$(python manage.py createapikey demo --daemon --name "local daemon" | tail -n 1)
    key=$(python manage.py createapikey demo --name "demo watch" | tail -n 1)
    pids=()
    stop() {
      trap - EXIT INT TERM
      [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
      wait 2>/dev/null
      exit 0
    }
    trap stop EXIT INT TERM
    # The django-q2 cluster runs the orchestrator's safety-net tick.
    python manage.py qcluster &
    pids+=($!)
    # daphne drops websocket frames over its own limit silently; let makima's
    # limit (MAKIMA_WS_MAX_BYTES) answer them with `too_large` instead.
    ws_limit=$(( 2 * ${MAKIMA_WS_MAX_BYTES:-1048576} ))
    python -m daphne -b 127.0.0.1 -p "$PORT" \
      --websocket-max-message-size "$ws_limit" --websocket-max-frame-size "$ws_limit" \
      makima.asgi:application &
    pids+=($!)
    for _ in $(seq 50); do
      python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${PORT}/admin/login/', timeout=1)" \
        2>/dev/null && break
      sleep 0.2
    done
    # A local daemon with the scripted agent works on the demo repository.
    makima daemon run --server "http://127.0.0.1:${PORT}" --token "$token" --name local \
      --agent scripted --max-tasks 4 --workdir var/daemon &
    pids+=($!)
    echo
    echo "makima is running: http://127.0.0.1:${PORT}/  (API docs: http://127.0.0.1:${PORT}/api/docs/)"
    echo "$demo" | sed -n 's/^Demo user [a-z]*: \(.*\) \/ \(.*\)/sign in as \1, password \2/p'
    review=$(echo "$demo" | sed -n 's/^Demo directive to review: \([0-9a-f-]*\).*/\1/p')
    echo "the demo directive runs on its own: http://127.0.0.1:${PORT}/directives/${directive}/"
    echo "the second one waits for your approval in the inbox: http://127.0.0.1:${PORT}/approvals/ (directive ${review})"
    echo "or watch the first in another terminal:"
    echo "  .venv/bin/makima --url http://127.0.0.1:${PORT} --api-key $key directive watch $directive"
    echo "Ctrl-C stops everything."
    wait -n "${pids[@]}"
    ;;
  test)
    install
    install_chromium
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run | test [pytest arguments]" >&2
    exit 2
    ;;
esac
