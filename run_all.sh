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
# This script is the door: on first use it creates .venv and installs the pinned requirements
# (python3 is all it needs), then hands over to the orchestrator, labkit/run.py, which checks
# the flags, starts the slow service, a throwaway PostgreSQL and one lab per setup, runs the
# scenarios (labkit/plan.py) with load.py, prints report.py's table and stops everything it
# started when it ends, fails, is interrupted, loses its terminal or is killed.
# (/bin/bash, not /usr/bin/env bash: with a broken PATH, env could not even find bash to say so.)
set -euo pipefail

# --- until the hand-over: pip, and a clean stop if interrupted --------------------------------
# Each child gets a parent-death signal (setpriv, util-linux): if this script is killed with
# SIGKILL, which no trap sees, the kernel stops them.
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
on_signal() {
  # Ignored, not reset, while we clean up: a hang-up comes twice (tmux signals the process
  # group, then the kernel signals us as the terminal closes) and Ctrl-C is often pressed
  # twice; the default action would kill this script before it has stopped its children.
  trap '' INT TERM HUP
  { echo; echo "run_all.sh: interrupted during $phase; stopping everything it started"; } \
    >&2 2>/dev/null || true  # after a hang-up there may be no terminal to write to
  stop_children
  trap - EXIT
  exit "$1"
}
trap stop_children EXIT
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

# --help, and --test (the rest of the command line is pytest's); labkit/run.py reads the other
# flags. Bash alone, so that --help works whatever PATH is.
test=0
for ((i = 1; i <= $#; i++)); do
  case ${!i} in
    --test) test=1; pytest_args=("${@:i+1}"); break ;;
    -h|--help) usage; exit 0 ;;
  esac
done
# What the door runs from PATH, all named in one line if any is missing (setpriv, for the
# parent-death signals, and env, to hold signals back during the hand-over, are used when
# there; the orchestrator runs from .venv).
missing=()
for tool in python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  names=${missing[*]}
  die "not found on PATH: ${names// /, } (PATH=${PATH-})"
fi

# The door's own short Python calls (the requirements' hash, making .venv) and the hand-over
# run with the stop signals held back (blocked, not ignored): a Ctrl-C to the process group
# that lands while such a Python starts would otherwise be a "Fatal Python error ...
# KeyboardInterrupt" traceback. This script takes the signal itself (its trap, below).
hold=()
env --block-signal=INT,TERM,HUP true 2>/dev/null && hold=(env --block-signal=INT,TERM,HUP)

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
    "${hold[@]}" python3 -m venv --clear "$VENV" ||
      die "could not create $VENV (on Debian or Ubuntu: apt-get install python3-venv, as root)"
  fi
  stamp=$VENV/.installed-$("${hold[@]}" python3 -c 'import hashlib, pathlib, sys
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
  exec "$PY" -m pytest "${pytest_args[@]}"
fi
ensure_venv requirements.txt

# --- the hand-over -----------------------------------------------------------------------------
# The stop signals are held back (blocked, not ignored: one that comes is kept, not lost) from
# the exec until labkit.run has its handlers, so that an interrupt during Python's start-up is
# its one line too, not a traceback or a silent death.
trap - EXIT
AWL_RUN_FROM=$invoked_from exec "${hold[@]}" "$PY" -m labkit.run "$@"
