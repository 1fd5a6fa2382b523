"""What real terminals and real machines do to the lab, on real processes.

A closed terminal (tmux kill-session, a closed window, a dropped SSH session) sends SIGHUP to
the programs that ran in it, and from then on each of their writes to it fails with EIO. lab.py
and run_all.sh must stop as they do on Ctrl-C, at any phase, and leave nothing behind. Two ways
to close one: tmux itself, and a pseudo-terminal of our own (pty.fork: the program is the session
leader of a new session whose controlling terminal we hold; closing our end hangs it up), which
also gives us the program's exit status and everything it wrote before.

`kill -9` gives a program no chance to clean up: its children must still be gone within 5 s
(parent-death signals), and run_all.sh's stale work folder is removed by the next run.

Processes are followed with the sandbox of tests/conftest.py: a private TMPDIR and an environment
marker, so other runs of the lab on the same machine are never mistaken for ours.
"""

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import psutil
import pytest
from conftest import MARK, PY, ROOT, free_port, get, postgres_started, wait_until

from labkit import procs

HANG_UP_EXIT = 128 + signal.SIGHUP
INTERRUPTED = re.compile(r"run_all\.sh: interrupted during (.+); stopping everything it started")


@pytest.fixture
def sandbox(sandbox):
    """conftest's sandbox, but Python buffers as it does for anyone: a write that fails must
    not stay in a buffer."""
    sandbox.env.pop("PYTHONUNBUFFERED", None)
    return sandbox


class Terminal:
    """A pseudo-terminal running one program as its session leader, as a terminal window does."""

    def __init__(self, box, args):
        self.box = box
        self.output = ""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once (the parent has threads)
            try:
                os.chdir(ROOT)
                os.execve(args[0], args, box.env)
            finally:
                os._exit(127)
        box.roots.append(self.pid)
        self.status = None

    def pump(self, seconds=0.0):
        """Read what the program wrote for `seconds` (a full terminal would block it)."""
        deadline = time.monotonic() + seconds
        while self.fd is not None:
            left = deadline - time.monotonic()
            if not select.select([self.fd], [], [], max(left, 0))[0]:
                if left <= 0:
                    return
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the program and all its children closed the terminal
                data = b""
            if not data:
                return
            self.output += data.decode(errors="replace")

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.05)
            assert self.poll() is None, f"exited {self.status} early:\n{self.output}"
            if predicate():
                return
        raise AssertionError(f"timed out waiting for {what}:\n{self.output[-3000:]}")

    def wait_for_text(self, text, timeout=60):
        self.wait_for(lambda: text in self.output, timeout, repr(text))

    def hang_up(self, close=True):
        """Close the window: SIGHUP to the foreground process group, as tmux and terminal
        emulators send it, then (close=True) the terminal itself goes away."""
        os.killpg(self.pid, signal.SIGHUP)
        if close:
            os.close(self.fd)
            self.fd = None

    def poll(self):
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, timeout=30):
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            if self.fd is not None:
                self.pump(0.05)
            else:
                time.sleep(0.05)
        if self.fd is not None:
            self.pump(0.2)
        assert self.status is not None, f"still running {timeout} s after the hang-up"
        return self.status

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


@pytest.fixture
def terminal(sandbox):
    opened = []

    def open_terminal(args):
        term = Terminal(sandbox, args)
        opened.append(term)
        return term

    yield open_terminal
    for term in opened:
        term.close()


def use_warm_cache(box, cache):
    """For a test about a later moment than the cache's building: no initdb first."""
    box.env["AWL_CACHE_DIR"] = str(cache)


def assert_nothing_left(box, what, timeout=20):
    left = box.wait_all_gone(timeout)
    assert not left, f"left running after {what}:\n" + "\n".join(left)
    assert box.files() == [], f"left in TMPDIR after {what}: {os.listdir(box.tmp)}"


def running(box, word):
    """Whether a process seen in the sandbox runs now with `word` on its command line."""
    for pid in list(box.seen):
        try:
            if word in " ".join(psutil.Process(pid).cmdline()):
                return True
        except psutil.Error:
            pass
    return False


def lab_args(*extra):
    return [PY, "lab.py", "--bind", f"127.0.0.1:{free_port()}",
            "--slow-url", f"http://127.0.0.1:{free_port()}", "--delay", "0.05", *extra]


def quietly(call, *args):
    try:
        return call(*args)
    except OSError:  # cut off by the stop: what the test looks at is the lab, not the client
        return None


def serving(url):
    try:
        return get(url + "/healthcheck/liveness", timeout=2)[0] == 200
    except OSError:
        return False


# --- 1. a hang-up, through a pseudo-terminal ---------------------------------------------------

@pytest.mark.parametrize("phase, close", [
    pytest.param("initdb", True, id="initdb-closed"),
    pytest.param("postgres-starting", True, id="postgres-starting-closed"),
    pytest.param("serving", True, id="serving-closed"),
    pytest.param("serving", False, id="serving-hup-only"),
    pytest.param("request-in-flight", True, id="request-in-flight-closed"),
    pytest.param("request-in-flight", False, id="request-in-flight-hup-only"),
])
def test_lab_hang_up_stops_it_like_ctrl_c(phase, close, sandbox, terminal, warm_cache):
    patch = "nothing" if phase == "request-in-flight" else "all"
    if phase in ("serving", "request-in-flight"):
        use_warm_cache(sandbox, warm_cache)
    args = lab_args("--patch", patch, "--workers", "2")
    url = "http://" + args[3]
    term = terminal(args)
    if phase == "initdb":
        term.wait_for(lambda: running(sandbox, "initdb"), 30, "initdb")
    elif phase == "postgres-starting":
        term.wait_for(lambda: postgres_started(sandbox), 30, "postgres to start")
    else:
        term.wait_for(lambda: serving(url), 60, "the lab to serve")
    if phase == "request-in-flight":  # a sync worker inside pg_sleep: a signal waits for it
        in_flight = threading.Thread(target=lambda: quietly(
            get, url + "/only-database-call/?seconds_to_sleep=2"), daemon=True)
        in_flight.start()
        term.pump(0.8)
    term.hang_up(close=close)
    status = term.wait()
    if phase == "request-in-flight":
        in_flight.join(30)
    assert status in (0, HANG_UP_EXIT), (status, term.output[-3000:])  # not 1 (a traceback)
    assert_nothing_left(sandbox, f"a hang-up while {phase}")
    assert "Traceback" not in term.output, term.output
    if not close:  # the terminal stayed: Gunicorn said what it did, in one line each
        assert "was sent SIGHUP" not in term.output, term.output  # workers wait for the master
        if phase in ("serving", "request-in-flight"):
            assert "Handling signal: hup" in term.output, term.output[-3000:]


RUN_ALL_PHASES = {
    # phase: (what to wait for, the phase run_all.sh names)
    "set-up": (lambda term, box: any(p.name.startswith("awl-pg-") for p in box.tmp.iterdir()),
               "set-up (starting the slow service and PostgreSQL)"),
    "scenario": (lambda term, box: "=== nothing / both" in term.output
                 and running(box, "load.py"), "scenario nothing / both"),
    "report": (lambda term, box: "=== Results" in term.output, "the report"),
}


# The report comes after every scenario: two requests each instead of ten reach it sooner.
RUN_ALL_FLAGS = {"set-up": [], "scenario": [], "report": ["-n", "2", "-c", "2"]}


@pytest.mark.parametrize("phase, close", [
    pytest.param("set-up", True, id="set-up-closed"),
    pytest.param("scenario", True, id="scenario-closed"),
    pytest.param("scenario", False, id="scenario-hup-only"),
    pytest.param("report", True, id="report-closed"),
])
def test_run_all_hang_up_stops_everything(phase, close, sandbox, terminal, warm_cache):
    ready, named = RUN_ALL_PHASES[phase]
    if phase != "set-up":  # set-up is interrupted while PostgreSQL's folder is being made
        use_warm_cache(sandbox, warm_cache)
    term = terminal(["./run_all.sh", "--delay", "0.05", *RUN_ALL_FLAGS[phase]])
    term.wait_for(lambda: ready(term, sandbox), 90, phase)
    term.hang_up(close=close)
    status = term.wait()
    assert status == HANG_UP_EXIT, (status, term.output[-3000:])
    assert_nothing_left(sandbox, f"a hang-up during {phase}")
    assert "Traceback" not in term.output, term.output
    if not close:
        assert INTERRUPTED.findall(term.output) == [named], term.output[-2000:]


# --- 1. a hang-up, through tmux ----------------------------------------------------------------

@pytest.fixture
def tmux(sandbox):
    """A tmux server of our own (-S): `tmux("new-session", ...)`; killed at the end."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    folder = tempfile.mkdtemp(prefix="awlm-")  # its socket: a path of our own, removed after
    socket_path = os.path.join(folder, "tmux")

    def run_tmux(*args):
        env = {k: v for k, v in sandbox.env.items() if k not in (MARK, "TMPDIR")}  # as now
        return subprocess.run(["tmux", "-S", socket_path, *args], env=env, capture_output=True,
                              text=True, timeout=30, check=False)

    def start(args):
        """The program alone in a new session, as `tmux new -d -s lab 'python lab.py'`."""
        command = "cd " + str(ROOT) + " && exec " + " ".join(args)
        result = run_tmux("new-session", "-d", "-s", "lab", "-x", "200", "-y", "50",
                          "-e", f"{MARK}={sandbox.token}", "-e", f"TMPDIR={sandbox.tmp}",
                          command)
        assert result.returncode == 0, result.stderr

    def screen():
        return run_tmux("capture-pane", "-p", "-t", "lab").stdout

    run_tmux.start, run_tmux.screen = start, screen
    yield run_tmux
    run_tmux("kill-server")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("phase", ["postgres-starting", "serving"])
def test_tmux_kill_session_stops_the_lab(phase, sandbox, tmux, warm_cache):
    if phase == "serving":
        use_warm_cache(sandbox, warm_cache)
    args = lab_args("--workers", "2")
    tmux.start(args)
    if phase == "postgres-starting":
        wait_until(lambda: postgres_started(sandbox), 30, "postgres to start")
    else:
        wait_until(lambda: serving("http://" + args[3]), 60, "the lab to serve")
    screen = tmux.screen()
    assert tmux("kill-session", "-t", "lab").returncode == 0
    assert_nothing_left(sandbox, f"tmux kill-session while {phase}")
    assert "Traceback" not in screen, screen


# tmux kill-session is a hang-up and a closed terminal, as test_run_all_hang_up_stops_everything
# sends them; its report phase is checked there ("report-closed"), not again here.
@pytest.mark.parametrize("phase", ["set-up", "scenario"])
def test_tmux_kill_session_stops_run_all(phase, sandbox, tmux, warm_cache):
    if phase == "scenario":
        use_warm_cache(sandbox, warm_cache)
    tmux.start(["./run_all.sh", "--delay", "0.05"])
    if phase == "set-up":
        wait_until(lambda: any(p.name.startswith("awl-pg-") for p in sandbox.tmp.iterdir()),
                   60, "PostgreSQL's folder")
    else:
        wait_until(lambda: running(sandbox, "load.py"), 90, "a scenario")
    screen = tmux.screen()
    assert tmux("kill-session", "-t", "lab").returncode == 0
    assert_nothing_left(sandbox, f"tmux kill-session during {phase}")
    assert "Traceback" not in screen, screen


# --- 2. kill -9: children die with their parent, and the next run sweeps up --------------------

def assert_gone_within(box, seconds, what):
    killed = time.monotonic()
    left = box.wait_all_gone(seconds)
    assert not left, f"still running {seconds} s after {what}:\n" + "\n".join(left)
    return time.monotonic() - killed


def test_run_all_killed_leaves_nothing_running(sandbox, warm_cache):
    """Each child of run_all.sh has a parent-death signal (labkit.procs.child_setup): SIGKILL
    reaches no handler. Its embedded PostgreSQL (lab.py --database-only) stops and removes its
    folder."""
    use_warm_cache(sandbox, warm_cache)
    proc = sandbox.popen(["./run_all.sh", "--delay", "0.5"], new_session=True)
    wait_until(lambda: running(sandbox, "load.py"), 90, "a scenario")
    time.sleep(0.5)  # requests in flight
    proc.kill()
    took = assert_gone_within(sandbox, 5, "kill -9 of run_all.sh")
    print(f"all gone {took:.2f} s after kill -9")
    # What is left is run_all.sh's work folder, for the next run to remove.
    assert [p.name[:8] for p in sandbox.tmp.iterdir()] == ["awl-run-"], os.listdir(sandbox.tmp)


def test_next_run_removes_the_folder_of_a_killed_run(sandbox):
    """The same owner notes as the embedded PostgreSQL's folders (labkit.procs)."""
    me = procs.owner_note()
    killed = sandbox.tmp / "awl-run-killed"
    killed.mkdir()
    (killed / procs.OWNER_NOTE).write_text(json.dumps({**me, "pid": 2 ** 22 + 1}))  # gone
    (killed / "01-nothing-both.json").write_text("{}")
    reused = sandbox.tmp / "awl-run-reused"  # our PID, another start time: a reused PID
    reused.mkdir()
    (reused / procs.OWNER_NOTE).write_text(json.dumps({**me, "start_time": 1}))
    live = sandbox.tmp / "awl-run-live"  # a run still going: kept
    live.mkdir()
    (live / procs.OWNER_NOTE).write_text(json.dumps(me))
    proc = sandbox.popen(["./run_all.sh", "--delay", "0.05"], new_session=True)
    try:
        wait_until(lambda: len(list(sandbox.tmp.glob("awl-run-*"))) == 2
                   and not killed.exists() and not reused.exists(), 60, "the new run's folder")
    finally:
        proc.terminate()
        proc.wait(30)
    assert not killed.exists() and not reused.exists()
    assert live.exists() and (live / procs.OWNER_NOTE).exists()
    shutil.rmtree(live)
    assert_nothing_left(sandbox, "the second run")


@pytest.mark.parametrize("patch", ["nothing", "almost_all"])
def test_lab_killed_mid_query_takes_its_workers_within_5_s(patch, sandbox, database_url):
    """A worker inside a long query would only see a SIGTERM when the query returns."""
    sandbox.env["DATABASE_URL"] = database_url
    args = lab_args("--patch", patch, "--workers", "2")
    url = "http://" + args[3]
    proc = sandbox.popen(args, new_session=True)
    wait_until(lambda: serving(url), 60, "the lab to serve")
    threading.Thread(target=quietly, args=(get, url + "/only-database-call/?seconds_to_sleep=20"),
                     daemon=True).start()
    time.sleep(1)
    assert sum(" lab.py " in f" {d} " for _, d in list(sandbox.seen.values())) == 3  # master, 2 workers
    proc.kill()
    took = assert_gone_within(sandbox, 5, f"kill -9 of lab.py --patch {patch}")
    print(f"{patch}: all gone {took:.2f} s after kill -9")
