#!/usr/bin/env bash
# Run every scenario of the lab and print each timing.
#
#   ./run_all.sh                 the article's six scenarios, then the fan-out route, at 1 s delays
#   ./run_all.sh --delay 0.2     the same, quicker
#   ./run_all.sh --report r.html also write the results as one self-contained HTML page
#   ./run_all.sh --test          the test suite
#
# On first use it creates .venv and installs the pinned requirements: python3 is all it needs.
# It starts the slow service and one throwaway PostgreSQL for the whole run; then, per scenario,
# it starts `lab.py --patch MODE`, waits until it answers, sends `load.py -n 10 -c 10 -t 60` to
# the route, stops the lab and says what (if anything) blocked its event loop. Everything it
# started is stopped when it ends, fails or is interrupted.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./run_all.sh [--delay SECONDS] [-n REQUESTS] [-c CONCURRENCY] [--json] [--report FILE]
       ./run_all.sh --test [PYTEST ARGS]

  --delay SECONDS   slow HTTP delay and pg_sleep, together (default 1; 0.2 gives a quick run)
  -n REQUESTS       requests per scenario (default 10)
  -c CONCURRENCY    requests in flight at once (default 10)
  --json            one JSON object per scenario on stdout (summaries go to stderr)
  --report FILE     also write an HTML page: the table, each request's timeline, what blocked
  --test            run the test suite instead (extra arguments go to pytest)
EOF
}

# The article's scenarios in its order, then the fan-out route: MODE ROUTE.
SCENARIOS=(
  "nothing both"
  "almost_all both"
  "almost_all http"
  "almost_all db"
  "all db"
  "all both"
  "all fanout"
)
declare -A ROUTE_PATHS=(
  [http]=/only-http-call/
  [db]=/only-database-call/
  [both]=/both-http-and-database-calls/
  [fanout]=/only-http-do-ten_calls_with_gevent/
)

invoked_from=$PWD  # --report paths are relative to where the user ran us, not to the lab
cd "$(dirname "$0")"
VENV=.venv
PY=$VENV/bin/python

die() { echo "run_all.sh: error: $*" >&2; exit 2; }

# --- flags -----------------------------------------------------------------------------------
delay=1 requests=10 concurrency=10 json=0 test=0 report=
is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$|^[.][0-9]+$ ]]; }
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
while (($#)); do
  case $1 in
    --delay) (($# > 1)) || die "--delay needs a value"; delay=$2; shift 2 ;;
    -n) (($# > 1)) || die "-n needs a value"; requests=$2; shift 2 ;;
    -c) (($# > 1)) || die "-c needs a value"; concurrency=$2; shift 2 ;;
    --json) json=1; shift ;;
    --report) (($# > 1)) || die "--report needs a file name"; report=$2; shift 2 ;;
    --test) test=1; shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown flag '$1' (see --help)" ;;
  esac
done
if ((!test)); then
  (($# == 0)) || die "unexpected argument '$1' (see --help)"
  is_number "$delay" && awk -v d="$delay" 'BEGIN { exit !(d > 0 && d <= 60) }' \
    || die "--delay must be a number of seconds above 0 and at most 60, not '$delay'"
  is_count "$requests" || die "-n must be a whole number above 0, not '$requests'"
  is_count "$concurrency" || die "-c must be a whole number above 0, not '$concurrency'"
  ((requests >= concurrency)) || die "-n cannot be less than -c"
  if [[ -n $report ]]; then
    [[ $report == /* ]] || report=$invoked_from/$report
    [[ -d $(dirname "$report") ]] || die "--report: no such directory: $(dirname "$report")"
    [[ ! -d $report ]] || die "--report: '$report' is a directory, not a file name"
  fi
fi

# --- processes and their cleanup -------------------------------------------------------------
# Set before anything is installed or started, so that an interrupt at any moment stops
# everything with one line.
work=
phase="set-up"
children=()

stop_children() {
  local pid
  for pid in "${children[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${children[@]}"; do wait "$pid" 2>/dev/null || true; done
  children=()
}
on_exit() {
  stop_children
  [[ -z $work ]] || rm -rf "$work"
}
on_signal() {
  trap - INT TERM
  echo >&2
  echo "run_all.sh: interrupted during $phase; stopping everything it started" >&2
  on_exit
  trap - EXIT
  exit "$1"
}
trap on_exit EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# Children run in the background and we `wait` for them: a signal then interrupts the wait at
# once, where a foreground child would make bash hold the trap until the child ends.
start() {
  "$@" &
  children+=($!)
}
wait_for() {
  local pid=$1 status=0
  wait "$pid" || status=$?
  local kept=()
  for p in "${children[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  children=("${kept[@]}")
  return "$status"
}
stop() {
  kill -TERM "$1" 2>/dev/null || true
  wait_for "$1" || true
}

# --- the virtual environment -----------------------------------------------------------------
# Reinstall only when a requirements file changed since the last install (the development
# requirements include the lab's own).
ensure_venv() {
  local wanted=$1 stamp
  command -v python3 >/dev/null || die "python3 is not on PATH"
  if [[ ! -x $PY ]]; then
    echo "run_all.sh: creating $VENV (first run only)" >&2
    python3 -m venv "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
  fi
  stamp=$VENV/.installed-$(cat requirements*.txt | cksum | cut -d' ' -f1)
  [[ -e $stamp-$wanted || -e $stamp-requirements-dev.txt ]] && return
  phase="set-up (installing $wanted)"
  echo "run_all.sh: installing $wanted into $VENV" >&2
  start "$PY" -m pip install --quiet --disable-pip-version-check -r "$wanted" >&2
  wait_for "${children[-1]}" || die "pip could not install $wanted"
  touch "$stamp-$wanted"
}

if ((test)); then
  ensure_venv requirements-dev.txt
  exec "$PY" -m pytest "$@"
fi
ensure_venv requirements.txt
work=$(mktemp -d "${TMPDIR:-/tmp}/awl-run-XXXXXX")

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Poll until the URL answers 200, or give up when the process serving it has died.
wait_until_healthy() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq 300); do
    if "$PY" - "$url" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).status != 200)
EOF
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run_all.sh: error: $(basename "$log" .log) did not start:" >&2
      tail -n 5 "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "run_all.sh: error: $url did not answer within 30 s" >&2
  exit 1
}

# --- the shared services ---------------------------------------------------------------------
out=1
((json)) && out=2  # with --json, stdout carries only the JSON lines
slow_port=$(free_port)
lab_port=$(free_port)
slow_url=http://127.0.0.1:$slow_port

phase="set-up (starting the slow service)"
start "$PY" slow_server.py --bind "127.0.0.1:$slow_port" --delay "$delay" \
  >"$work/slow_server.log" 2>&1
wait_until_healthy "$slow_url/healthz" "${children[-1]}" "$work/slow_server.log"

if [[ -n ${DATABASE_URL:-} ]]; then
  database_url=$DATABASE_URL
else
  phase="set-up (starting PostgreSQL)"
  start "$PY" lab.py --database-only >"$work/database.out" 2>"$work/database.log"
  db_pid=${children[-1]}
  for _ in $(seq 600); do
    database_url=$(sed -n 's/^DATABASE_URL=//p' "$work/database.out")
    [[ -n $database_url ]] && break
    kill -0 "$db_pid" 2>/dev/null || { cat "$work/database.log" >&2; exit 1; }
    sleep 0.05
  done
  [[ -n $database_url ]] || die "the embedded PostgreSQL did not start within 30 s"
fi

echo "Async Workers Lab: $requests requests, $concurrency at a time, one worker;" \
  "slow HTTP call ${delay} s, pg_sleep ${delay} s" >&$out

# --- the scenarios ---------------------------------------------------------------------------
number=0
for scenario in "${SCENARIOS[@]}"; do
  read -r mode route <<<"$scenario"
  number=$((number + 1))
  name=$(printf '%02d-%s-%s' "$number" "$mode" "$route")
  phase="scenario $mode / $route"
  start "$PY" lab.py --patch "$mode" --bind "127.0.0.1:$lab_port" --slow-url "$slow_url" \
    --database-url "$database_url" --delay "$delay" >"$work/$name.log" 2>&1
  lab_pid=${children[-1]}
  wait_until_healthy "http://127.0.0.1:$lab_port/healthcheck/liveness" "$lab_pid" "$work/$name.log"

  printf '\n=== %s / %s: GET %s\n' "$mode" "$route" "${ROUTE_PATHS[$route]}" >&$out
  start "$PY" load.py -n "$requests" -c "$concurrency" -t 60 --timeline \
    --save "$work/$name.json" "http://127.0.0.1:$lab_port${ROUTE_PATHS[$route]}" >&$out
  wait_for "${children[-1]}" || true
  stop "$lab_pid"
  [[ -s $work/$name.json ]] || die "load.py saved no figures for $mode / $route"
  "$PY" report.py blocking "$work/$name.log" >&$out  # the log is complete once the lab stopped
done

# --- the table -------------------------------------------------------------------------------
phase="the report"
status=0
report_flags=(--delay "$delay")
((json)) && report_flags+=(--json)
[[ -n $report ]] && report_flags+=(--html "$report")
if ((!json)); then
  printf '\n=== Results (model: sync runs requests one at a time; almost_all overlaps HTTP waits'
  printf ' only; all overlaps every wait)\n'
fi
"$PY" report.py "${report_flags[@]}" "$work"/*.json || status=$?
[[ -n $report && -s $report ]] && echo "run_all.sh: wrote $report" >&2
if ((status)); then
  echo "run_all.sh: some scenarios had responses other than 200 (see the table)" >&2
fi
exit "$status"
