#!/bin/bash
# Run every scenario of the lab and print each timing.
#
#   ./run_all.sh                 the article's six scenarios, then the fan-out route, at 1 s delays
#   ./run_all.sh --delay 0.2     the same, quicker
#   ./run_all.sh --all           every setup with every route (python lab.py --list --all)
#   ./run_all.sh --report r.html also write the results as one self-contained HTML page
#   ./run_all.sh --scale         at scale: 1,000 requests at once, PostgreSQL's connection limit,
#                                a pool, and the connections each setup holds (lab.py --list --scale)
#   ./run_all.sh --test          the test suite
#
# On first use it creates .venv and installs the pinned requirements: python3 is all it needs.
# (/bin/bash, not /usr/bin/env bash: with a broken PATH, env could not even find bash to say so.)
# The scenarios are lab.py's (`python lab.py --list`). The run starts the slow service, one
# throwaway PostgreSQL and one lab per setup, all at once, each lab on its own port. Then, per
# scenario, it sends `load.py -n 10 -c 10 -t 60` to the route on that setup's lab (the others
# sit idle) and says what, if anything, blocked its event loop. Everything it started stops
# when it ends, fails, is interrupted, loses its terminal or is killed.
set -euo pipefail

# --- processes and their cleanup -------------------------------------------------------------
# Set before anything is installed or started, so that an interrupt at any moment stops
# everything with one line. Each child also gets a parent-death signal (setpriv, util-linux):
# if this script is killed with SIGKILL, which no trap sees, the kernel stops them.
work=
phase="set-up"
children=()
with_death_signal=()
command -v setpriv >/dev/null && with_death_signal=(setpriv --pdeathsig TERM --)

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
  # Ignored, not reset, while we clean up: a hang-up comes twice (tmux signals the process
  # group, then the kernel signals us as the terminal closes) and Ctrl-C is often pressed
  # twice; the default action would kill this script before it has stopped its children.
  trap '' INT TERM HUP
  { echo; echo "run_all.sh: interrupted during $phase; stopping everything it started"; } \
    >&2 2>/dev/null || true  # after a hang-up there may be no terminal to write to
  on_exit
  trap - EXIT
  exit "$1"
}
trap on_exit EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP

usage() {  # bash alone (no cat): --help works whatever PATH is
  local text
  IFS= read -r -d '' text <<'EOF' || true
usage: ./run_all.sh [--delay SECONDS] [-n REQUESTS] [-c CONCURRENCY] [--all] [--json]
                    [--report FILE] [--scale] [--workers N]
       ./run_all.sh --test [PYTEST ARGS]

  --delay SECONDS   slow HTTP delay and pg_sleep, together (default 1; 0.2 gives a quick run)
  -n REQUESTS       requests per scenario (default 10)
  -c CONCURRENCY    requests in flight at once (default 10)
  --all             every setup with every route, not only the article's scenarios
  --json            one JSON object per scenario on stdout (summaries go to stderr)
  --report FILE     also write an HTML page: the table, each request's timeline, what blocked
  --workers N       N Gunicorn workers in every lab (default: each setup's own, 1 or 10);
                    the model shares the requests among them
  --scale           at scale instead: lab.py --list --scale's scenarios, each with its own n
                    and c, against an embedded PostgreSQL with a low max_connections; the
                    table adds the most connections each lab held
  --test            run the test suite instead (extra arguments go to pytest)
EOF
  printf '%s' "$text"
}

invoked_from=$PWD  # --report paths are relative to where the user ran us, not to the lab
here=${BASH_SOURCE[0]%/*}
[[ $here == "${BASH_SOURCE[0]}" ]] && here=.
cd "$here"
VENV=.venv
PY=$VENV/bin/python

die() { echo "run_all.sh: error: $*" >&2; exit 2; }

# --- flags -----------------------------------------------------------------------------------
# Bash alone checks them (no awk, no coreutils), so a broken PATH cannot turn into a false
# "bad flag" message.
delay=1 requests=10 concurrency=10 json=0 test=0 every=0 report= scale=0 workers=
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_delay() {  # a decimal above 0 and at most 60
  [[ $1 =~ ^([0-9]*)(\.([0-9]*))?$ && -n ${BASH_REMATCH[1]}${BASH_REMATCH[3]} ]] || return 1
  local whole=$((10#${BASH_REMATCH[1]:-0})) fraction=${BASH_REMATCH[3]}
  [[ $fraction =~ ^0*$ ]] && fraction=
  ((whole < 60 || (whole == 60 && ${#fraction} == 0))) && ((whole > 0 || ${#fraction} > 0))
}
while (($#)); do
  case $1 in
    --delay) (($# > 1)) || die "--delay needs a value"; delay=$2; shift 2 ;;
    -n) (($# > 1)) || die "-n needs a value"; requests=$2; shift 2 ;;
    -c) (($# > 1)) || die "-c needs a value"; concurrency=$2; shift 2 ;;
    --all) every=1; shift ;;
    --scale) scale=1; shift ;;
    --workers) (($# > 1)) || die "--workers needs a value"; workers=$2; shift 2 ;;
    --json) json=1; shift ;;
    --report) (($# > 1)) || die "--report needs a file name"; report=$2; shift 2 ;;
    --test) test=1; shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown flag '$1' (see --help)" ;;
  esac
done
if ((!test)); then
  (($# == 0)) || die "unexpected argument '$1' (see --help)"
  is_delay "$delay" || die "--delay must be a number of seconds above 0 and at most 60, not '$delay'"
  is_count "$requests" || die "-n must be a whole number above 0, not '$requests'"
  is_count "$concurrency" || die "-c must be a whole number above 0, not '$concurrency'"
  ((requests >= concurrency)) || die "-n cannot be less than -c"
  [[ -z $workers ]] || { is_count "$workers" && ((workers <= 64)); } ||
    die "--workers must be a whole number from 1 to 64, not '$workers'"
  if [[ -n $report ]]; then
    [[ $report == /* ]] || report=$invoked_from/$report
    report_dir=${report%/*}
    [[ -d ${report_dir:-/} ]] || die "--report: no such directory: $report_dir"
    [[ ! -d $report ]] || die "--report: '$report' is a directory, not a file name"
  fi
  tmp=${TMPDIR:-/tmp}
  [[ -d $tmp && -w $tmp ]] || die "TMPDIR=$tmp is not a writable directory"
fi
# What this script runs from PATH, all named in one line if any is missing. (setpriv, for the
# parent-death signals, is used when there; the rest runs from .venv.)
missing=()
for tool in python3 rm sleep; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  names=${missing[*]}
  die "not found on PATH: ${names// /, } (PATH=${PATH-})"
fi

# Children run in the background and we `wait` for them: a signal then interrupts the wait at
# once, where a foreground child would make bash hold the trap until the child ends.
start() {
  "${with_death_signal[@]}" "$@" &
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

# --- the virtual environment -----------------------------------------------------------------
# Reinstall only when a requirements file changed since the last install (the development
# requirements include the lab's own).
ensure_venv() {
  local wanted=$1 stamp
  # A .venv without pip is one whose creation failed half-way (Debian's python3 without
  # python3-venv leaves python in it, then stops): it is made again, not used.
  if [[ ! -x $PY || ! -e $VENV/bin/pip ]]; then
    if [[ -e $VENV ]]; then
      echo "run_all.sh: making $VENV again (it has no pip: an earlier creation failed)" >&2
    else
      echo "run_all.sh: creating $VENV (first run only)" >&2
    fi
    python3 -m venv --clear "$VENV" ||
      die "could not create $VENV (on Debian or Ubuntu: apt-get install python3-venv, as root)"
  fi
  stamp=$VENV/.installed-$(python3 -c 'import hashlib, pathlib, sys
print(hashlib.sha256(b"".join(pathlib.Path(f).read_bytes() for f in sys.argv[1:])).hexdigest()[:16])
' requirements*.txt)
  [[ -e $stamp-$wanted || -e $stamp-requirements-dev.txt ]] && return
  phase="set-up (installing $wanted)"
  echo "run_all.sh: installing $wanted into $VENV" >&2
  start "$PY" -m pip install --quiet --disable-pip-version-check -r "$wanted" >&2
  wait_for "${children[-1]}" || die "pip could not install $wanted"
  : >"$stamp-$wanted"
}

if ((test)); then
  ensure_venv requirements-dev.txt
  exec "$PY" -m pytest "$@"
fi
ensure_venv requirements.txt

# The scenarios, the setups they need and a free port for each service: lab.py says.
# Each line: SETUP ROUTE PATH MODEL, and with --scale also N C and the lab's flags.
mapfile -t plan < <("$PY" lab.py --list $( ((every)) && echo --all) $( ((scale)) && echo --scale))
((${#plan[@]})) || die "lab.py --list gave no scenarios"
declare -A lab_port=() lab_flags=()
for line in "${plan[@]}"; do
  read -r setup _ _ _ _ _ flags <<<"$line"
  lab_port[$setup]=
  lab_flags[$setup]=${flags:-}
done
ports=($("$PY" - $((${#lab_port[@]} + 1)) <<'EOF'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))
EOF
))
slow_url=http://127.0.0.1:${ports[0]}
index=1
for setup in "${!lab_port[@]}"; do lab_port[$setup]=${ports[index]}; index=$((index + 1)); done

# A run killed with SIGKILL leaves its folder behind: remove those whose owner is gone.
for stale in "$tmp"/awl-run-*/; do
  [[ -f $stale/owner ]] || continue
  read -r owner <"$stale/owner" || continue
  kill -0 "$owner" 2>/dev/null || rm -rf "$stale"
done
work=$("$PY" -c 'import tempfile; print(tempfile.mkdtemp(prefix="awl-run-"))')
echo $$ >"$work/owner"

last_line() {  # FILE: its last non-empty line, bash alone
  local line last=
  while IFS= read -r line || [[ -n $line ]]; do [[ -z $line ]] || last=$line; done <"$1"
  printf '%s' "$last"
}

# Your own DATABASE_URL is checked before anything starts: lab.py --check reads it as the labs
# will, and connects once.
if [[ -n ${DATABASE_URL:-} ]]; then
  export DATABASE_URL
  start "$PY" lab.py --check >/dev/null 2>"$work/check.log"
  wait_for "${children[-1]}" || {
    why=$(last_line "$work/check.log")
    die "DATABASE_URL: ${why#lab.py: error: }"
  }
fi

# Poll until every URL answers 200; stop at the first service that died, with its last words.
read -r -d '' wait_until_healthy_py <<'EOF' || true
import signal, sys, time, urllib.request
from pathlib import Path
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: run_all.sh says it, in one line
args = sys.argv[1:]
pending = [args[i:i + 4] for i in range(0, len(args), 4)]  # NAME URL PID LOG
deadline = time.monotonic() + 60
while pending and time.monotonic() < deadline:
    for item in list(pending):
        name, url, pid, log = item
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                pending.remove(item)
                continue
        except OSError:
            pass
        state = Path(f"/proc/{pid}/stat")
        if not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] in "ZX":
            words = Path(log).read_text(errors="replace").strip().splitlines() or ["no output"]
            print(f"run_all.sh: error: {name} did not start: {words[-1]}", file=sys.stderr)
            sys.exit(1)
    time.sleep(0.05)
if pending:
    print(f"run_all.sh: error: {pending[0][0]} did not answer within 60 s", file=sys.stderr)
    sys.exit(1)
EOF
wait_until_healthy() {  # NAME URL PID LOG, repeated
  start "$PY" -c "$wait_until_healthy_py" "$@"
  wait_for "${children[-1]}" || exit 1
}

# Each lab's settings where this run changes them (--scale, --workers), as JSON beside its
# figures (SETUP.settings): report.py's model reads them. Started as the other children are:
# it runs while PostgreSQL starts, and a Ctrl-C then must not give a KeyboardInterrupt
# traceback from it (a child in the foreground gets the Ctrl-C too; this one imports lab).
read -r -d '' write_settings_py <<'EOF' || true
import json, sys
from pathlib import Path
import lab
work, scale, workers, *setups = sys.argv[1:]
for setup in setups:
    settings = lab.scale_settings(setup) if scale == "1" else {}
    if workers:
        settings["workers"] = int(workers)
    Path(work, f"{setup}.settings").write_text(json.dumps(settings))
EOF
write_settings() {
  start "$PY" -c "$write_settings_py" "$work" "$scale" "$workers" "${!lab_port[@]}"
  wait_for "${children[-1]}" || die "could not write each lab's settings in $work"
}

# --- the services, all started at once -------------------------------------------------------
out=1
((json)) && out=2  # with --json, stdout carries only the JSON lines

phase="set-up (starting the slow service and PostgreSQL)"
start "$PY" slow_server.py --bind "127.0.0.1:${ports[0]}" --delay "$delay" \
  >"$work/slow_server.log" 2>&1
slow_pid=${children[-1]}
db_pid=
if [[ -z ${DATABASE_URL:-} ]]; then
  limit=()
  ((scale)) && limit=(--max-connections "$("$PY" -c 'import lab; print(lab.SCALE_MAX_CONNECTIONS)')")
  start "$PY" lab.py --database-only "${limit[@]}" >"$work/database.out" 2>"$work/database.log"
  db_pid=${children[-1]}
  write_settings  # while PostgreSQL starts
  DATABASE_URL=
  until [[ -n $DATABASE_URL ]]; do
    [[ -s $work/database.out ]] && IFS='=' read -r _ DATABASE_URL <"$work/database.out"
    [[ -n $DATABASE_URL ]] && break
    kill -0 "$db_pid" 2>/dev/null || {
      why=$(last_line "$work/database.log")
      echo "run_all.sh: error: the embedded PostgreSQL did not start: ${why#lab.py: error: }" >&2
      exit 1
    }
    sleep 0.02
  done
else
  write_settings
fi
export DATABASE_URL  # to the labs in their environment: a command line is visible in ps

phase="set-up (starting the labs)"
health=(slow_server.py "$slow_url/healthz" "$slow_pid" "$work/slow_server.log")
lab_pids=()
declare -A lab_pid=()
for setup in "${!lab_port[@]}"; do
  # The lab's flags (--scale; kept as JSON in SETUP.settings, above); every lab's
  # PostgreSQL connections sampled to SETUP.connections.
  read -ra flags <<<"${lab_flags[$setup]}"
  [[ -z $workers ]] || flags+=(--workers "$workers")
  start "$PY" lab.py --setup "$setup" --bind "127.0.0.1:${lab_port[$setup]}" \
    --slow-url "$slow_url" --delay "$delay" --events "$work/$setup.events" \
    --connections "$work/$setup.connections" "${flags[@]}" \
    >"$work/$setup.log" 2>&1
  lab_pids+=("${children[-1]}")
  lab_pid[$setup]=${children[-1]}
  health+=("lab.py --setup $setup" "http://127.0.0.1:${lab_port[$setup]}/healthcheck/readiness"
           "${children[-1]}" "$work/$setup.log")
done
wait_until_healthy "${health[@]}"

if ((scale)); then
  echo "Async Workers Lab at scale: each scenario's own n and c, PostgreSQL max_connections" \
    "$("$PY" -c 'import lab; print(lab.SCALE_MAX_CONNECTIONS)'); slow HTTP call ${delay} s," \
    "pg_sleep ${delay} s" >&$out
else
  echo "Async Workers Lab: $requests requests, $concurrency at a time, ${workers:-one} worker(s);" \
    "slow HTTP call ${delay} s, pg_sleep ${delay} s" >&$out
fi

# --- the scenarios, one after another --------------------------------------------------------
number=0
for line in "${plan[@]}"; do
  read -r setup route path model n c _ <<<"$line"
  ((scale)) || { n=$requests c=$concurrency; }
  number=$((number + 1))
  name=$(printf '%02d-%s-%s' "$number" "$setup" "$route")
  phase="scenario $setup / $route"
  printf '\n=== %s / %s: GET %s, %s requests, %s at a time (model: %s)\n' "$setup" "$route" \
    "$path" "$n" "$c" "$model" >&$out
  timeline=(--timeline)
  ((n <= 50)) || timeline=()  # a thousand rows say less than the histogram
  start "$PY" load.py -n "$n" -c "$c" -t 60 "${timeline[@]}" \
    --save "$work/$name.json" "http://127.0.0.1:${lab_port[$setup]}$path" >&$out
  wait_for "${children[-1]}" || true
  [[ -s $work/$name.json ]] || die "load.py saved no figures for $setup / $route"
  # At scale, what the burst left open is the lesson: give it the 0.5 s report.py reads it at.
  ((scale)) && sleep 0.6
  start "$PY" report.py blocking "$work/$name.json" --lab-pid "${lab_pid[$setup]}" >&$out
  wait_for "${children[-1]}" || true
done

# --- the table -------------------------------------------------------------------------------
phase="the report"
# Everything stops while the table is made; the labs at once (SIGINT: Gunicorn's quick stop),
# since nothing is in flight any more.
printf '%s\n' "${EPOCHREALTIME:-$(date +%s.%N)}" >"$work/stopped_at"  # see report.py quiet_until
kill -INT "${lab_pids[@]}" 2>/dev/null || true
kill -TERM "$slow_pid" ${db_pid:+"$db_pid"} 2>/dev/null || true
status=0
report_flags=(--delay "$delay")
((json)) && report_flags+=(--json)
[[ -n $report ]] && report_flags+=(--html "$report")
if ((!json)); then
  printf '\n=== Results (model: h = HTTP delay, d = pg_sleep, n requests c at a time, rounds ='
  printf ' ceil(n / min(c, requests a worker runs at once)); python lab.py --list --json says why)\n'
fi
start "$PY" report.py "${report_flags[@]}" "$work"/[0-9]*.json
wait_for "${children[-1]}" || status=$?
[[ -n $report && -s $report ]] && echo "run_all.sh: wrote $report" >&2
stop_children
if ((status && scale)); then
  echo "run_all.sh: past PostgreSQL's max_connections the 503s are the lesson (see the table)" >&2
elif ((status)); then
  echo "run_all.sh: some scenarios had responses other than 200 (see the table)" >&2
fi
exit "$status"
