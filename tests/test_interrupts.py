"""Interrupts at every moment: ./run_all.sh stopped by a signal to its process group.

A terminal's Ctrl-C (SIGINT) and hang-up (SIGHUP) reach the whole foreground process group; a
SIGTERM comes from kill or a supervisor. Whenever one lands, from the first line of the door to
the first scenarios, the run must stop everything it started within 5 s, say so in one line
and exit with 128 + the signal; a second signal changes nothing. The moments are spread over
the start-up (the door, the checks, PostgreSQL, the labs booting) and the first scenarios of the
default run and of --all, on a machine kept busy by two CPU burners, as on a loaded CI runner;
the cache of the embedded PostgreSQL is warm (no initdb: tests/test_faults.py interrupts that).

Each case is checked with conftest.Sandbox: every process that carries the case's marker in
its environment, names its TMPDIR on its command line or descends from the run (PostgreSQL's
backends, the labs' samplers, Gunicorn's workers) must be gone, and its TMPDIR empty.
"""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import PY, Sandbox

DELAY = "0.2"
STOPPED_WITHIN = 5.0  # seconds from the signal until the last process is gone
INTERRUPTED = re.compile(r"^run_all\.sh: interrupted during (.+); stopping everything it "
                         r"started$", re.MULTILINE)
INT, TERM, HUP = signal.SIGINT, signal.SIGTERM, signal.SIGHUP

# (run_all's flags, when, signal). When: seconds after the start; or (text, seconds): that long
# after the run printed the text; or (LABS, seconds): that long after the first lab started (the
# moments a lab itself is most fragile in: Gunicorn taking over its signals, its sampler
# forking, its workers booting). --all starts ten labs at once.
FIRST = "=== nothing / both"
LABS = "lab.py --setup"
MOMENTS = [
    # The door's own start: bash, then its short Python calls (a Ctrl-C that lands while such
    # a Python starts was a "Fatal Python error" traceback, once in a CI run as a user).
    ([], 0.0, INT), ([], 0.05, INT), ([], 0.1, HUP), ([], 0.2, INT),
    ([], 0.5, TERM), ([], 1.0, HUP), ([], 1.6, INT), ([], 2.3, TERM),
    ([], (LABS, 0.0), HUP), ([], (LABS, 0.4), INT), ([], (LABS, 1.0), TERM),
    ([], (LABS, 2.0), HUP), ([], (FIRST, 0.0), INT), ([], (FIRST, 1.0), TERM),
    ([], ("Summary:", 0.0), HUP), ([], ("=== almost_all / both", 0.5), INT),
    (["--all"], 0.4, TERM), (["--all"], 1.2, HUP), (["--all"], 2.0, INT), (["--all"], 3.0, TERM),
    (["--all"], (LABS, 0.0), HUP), (["--all"], (LABS, 0.5), INT), (["--all"], (LABS, 1.2), TERM),
    (["--all"], (LABS, 2.0), HUP), (["--all"], (LABS, 3.0), INT),
    (["--all"], ("=== nothing / http", 0.1), TERM), (["--all"], ("=== nothing / db", 0.3), HUP),
    (["--all"], ("=== nothing / both", 0.5), INT),
    # Ctrl-C pressed twice, a hang-up then the supervisor's SIGTERM: the second changes nothing.
    ([], (LABS, 0.4), (INT, INT)), (["--all"], ("=== nothing / db", 0.3), (HUP, TERM)),
]
AGAIN_AFTER = 0.2  # seconds between the two signals of a pair


def moment_id(moment):
    flags, when, sigs = moment
    if isinstance(when, tuple):
        text, after = when
        place = "labs" if text == LABS else \
            text.strip("= ").replace(" / ", "-").replace(":", "").lower()
        when = f"{place}+{after:g}s"
    else:
        when = f"{when:g}s"
    names = "-".join(sig.name[3:].lower() for sig in signals_of(sigs))
    return f"{'all-' if flags else ''}{when}-{names}"


def signals_of(sigs):
    return sigs if isinstance(sigs, tuple) else (sigs,)


def lab_started(box):
    """A lab (not its --check) among the run's processes, read from /proc now."""
    for pid in list(box.seen):
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if LABS in cmdline and "--check" not in cmdline:
            return True
    return False


def wait_for_moment(proc, box, when):
    if not isinstance(when, tuple):
        time.sleep(when)
        return
    text, after = when
    reached = (lambda: lab_started(box)) if text == LABS else \
        (lambda: text in "".join(proc.out + proc.err))
    deadline = time.monotonic() + 120
    while not reached():
        assert proc.poll() is None and time.monotonic() < deadline, \
            f"not reached: {text!r}\n{''.join(proc.err)[-3000:]}"
        time.sleep(0.01)
    time.sleep(after)


@pytest.fixture(scope="module")
def busy_machine():
    """Two CPU burners for the module's cases: the machine as busy as a loaded CI runner."""
    burners = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


@pytest.mark.parametrize("moment", MOMENTS, ids=[moment_id(m) for m in MOMENTS])
def test_an_interrupt_at_any_moment_stops_everything(moment, busy_machine, warm_cache):
    flags, when, sigs = moment
    sig, *again = signals_of(sigs)
    box = Sandbox()
    box.env["AWL_CACHE_DIR"] = str(warm_cache)
    try:
        proc = box.popen(["./run_all.sh", "--delay", DELAY, *flags], new_session=True)
        wait_for_moment(proc, box, when)
        assert proc.poll() is None, "".join(proc.err)[-3000:]
        sent = time.monotonic()
        os.killpg(proc.pid, sig)  # the whole process group, as a terminal sends it
        for later in again:
            time.sleep(AGAIN_AFTER)
            try:
                os.killpg(proc.pid, later)
            except ProcessLookupError:  # all gone already
                pass
        try:
            status = proc.wait(STOPPED_WITHIN + 5)
        except subprocess.TimeoutExpired:
            status = None
        exited = time.monotonic() - sent
        left = box.wait_all_gone(max(0.0, STOPPED_WITHIN - (time.monotonic() - sent)))
        gone = time.monotonic() - sent
        time.sleep(0.2)  # let the readers drain
        out, err = "".join(proc.out), "".join(proc.err)
        lines = INTERRUPTED.findall(err)
        print(f"{moment_id(moment)}: {lines}, exit {status} after {exited:.2f} s, all gone "
              f"after {gone:.2f} s")  # shown with -rA: which phase each moment hit
        assert status is not None, f"still running {exited:.1f} s after {sig.name}:\n{err[-3000:]}"
        assert not left, f"left running {gone:.1f} s after {sig.name}:\n" + "\n".join(left)
        assert gone <= STOPPED_WITHIN, f"all gone only {gone:.1f} s after {sig.name}"
        assert box.files() == [], f"left in TMPDIR: {box.files()}"
        assert box.half_built() == [], "half-built in the cache"
        if status == -sig:  # bash itself, before its first line (its traps) ran: nothing
            assert out + err == "" and when in (0.0, 0.05), (when, err)  # was started yet
            return
        assert status == 128 + sig, (status, err[-3000:])
        assert len(lines) == 1, err[-3000:]
        assert "Traceback" not in out + err, err[-3000:]
    finally:
        box.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-rA", "-q"]))
