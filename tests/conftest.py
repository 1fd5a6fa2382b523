"""What the tests share: real processes (the embedded PostgreSQL, slow_server.py, lab.py), the
Sandbox that follows every process a test starts, and the check of the tools' one-line errors.

Nothing here is mocked. Each helper starts the real script as a subprocess on a free loopback
port, waits until it answers, and stops it (and checks it stopped) when the test is done.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Ctrl-C (SIGINT to a process group) is one of the things the tests send. A shell starts a
# background job (`./run_all.sh --test &`, nohup, some CI runners) with SIGINT ignored, every
# child inherits that, and then bash cannot even trap it: run_all.sh and lab.py would shrug
# the Ctrl-C off and those tests fail. With a handler here, each process the tests start
# begins with SIGINT at its default again (a handler, unlike "ignored", is not inherited).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.root tests are skipped unless we are root (see pyproject.toml)."""
    if os.geteuid() == 0:
        return
    for item in items:
        marker = item.get_closest_marker("root")
        if marker is not None and not marker.kwargs.get("also_as_user"):
            item.add_marker(pytest.mark.skip(reason="needs root: what lab.py does only as root "
                                             "(CI runs these as root, with -m root)"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=30):
    """GET url -> (status, parsed JSON body or text)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def run(args, timeout=60, **kwargs):
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, **kwargs)


def assert_one_error(result, prog, *words, message=None, stdout=""):
    """The tools' answer to a mistake: exit status 2 and exactly one line on stderr,
    "PROG: error: ...", holding each of `words` (or exactly "PROG: error: MESSAGE"), and no
    traceback; stdout as given: nothing by default, None for not checked (a tool that had
    printed something before). Returns the line."""
    assert "Traceback" not in result.stderr + (result.stdout or ""), result.stderr
    if message is not None:
        assert (result.returncode, result.stderr) == (2, f"{prog}: error: {message}\n")
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    line = result.stderr[:-1]
    assert line.startswith(f"{prog}: error: "), line
    for word in words:
        assert word in line, line
    if stdout is not None:
        assert result.stdout == stdout, result.stdout
    return line


class Process:
    """A script of the lab running in the background, its output collected in a file."""

    def __init__(self, args, log_path, env=None):
        self.args = args
        self.log_path = log_path
        self.log_file = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen([PY, *args], cwd=ROOT, stdout=self.log_file,
                                      stderr=subprocess.STDOUT, env=env)

    @property
    def output(self):
        if not self.log_file.closed:
            self.log_file.flush()
        return Path(self.log_path).read_text(errors="replace")

    def wait_until_answering(self, url, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited early:\n{self.output}")
            try:
                if get(url, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{url} did not answer within {timeout} s:\n{self.output}")

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(f"{self.args[0]} ignored {sig!r}:\n{self.output}") from None
        self.log_file.close()
        return self.popen.returncode


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    """One embedded PostgreSQL for the whole session, started as run_all.sh starts it."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    yield from embedded_database(tmp_path_factory.mktemp("db") / "database.log")


def embedded_database(log, *flags):
    """`lab.py --database-only [FLAGS]`: yield its URL once it prints it, then stop it."""
    db = Process(["lab.py", "--database-only", *flags], log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in db.output.splitlines():
            if line.startswith("DATABASE_URL="):
                yield line.split("=", 1)[1]
                assert db.stop() == 0, db.output
                return
        if db.popen.poll() is not None:
            break
        time.sleep(0.05)
    db.stop()
    pytest.fail(f"the embedded PostgreSQL {' '.join(flags)} did not start:\n{db.output}")


@pytest.fixture
def start_slow_server(tmp_path):
    started = []

    def start(delay=0.2):
        port = free_port()
        server = Process(["slow_server.py", "--bind", f"127.0.0.1:{port}", "--delay", str(delay)],
                         tmp_path / f"slow-{port}.log")
        server.url = f"http://127.0.0.1:{port}"
        started.append(server)
        server.wait_until_answering(server.url + "/healthz")
        return server

    yield start
    for server in started:
        server.stop()


def launch_lab(folder, database_url, mode, slow_url, delay=0.2, extra=()):
    """`lab.py --setup SETUP` (the article's --patch modes are setups too) on a free port,
    started: wait_until_answering tells when it is ready, stop_lab stops it."""
    port = free_port()
    lab = Process(["lab.py", "--setup", mode, "--bind", f"127.0.0.1:{port}",
                   "--slow-url", slow_url, "--delay", str(delay), *extra],
                  folder / f"lab-{mode}-{port}.log",
                  env={**os.environ, "DATABASE_URL": database_url})
    lab.url = f"http://127.0.0.1:{port}"
    return lab


def wait_until_ready(lab):
    lab.wait_until_answering(lab.url + "/healthcheck/readiness")  # every worker booted


def stop_lab(lab):
    """Stop it (SIGTERM) and check its log."""
    lab.stop()
    assert "Traceback" not in lab.output, lab.output
    assert "MonkeyPatchWarning" not in lab.output, lab.output


@pytest.fixture
def start_lab(tmp_path, database_url):
    """Start `lab.py --setup SETUP` on a free port; on teardown, stop it and check its log."""
    started = []

    def start(mode, slow_url, delay=0.2, extra=(), database=None):
        lab = launch_lab(tmp_path, database or database_url, mode, slow_url, delay, extra)
        started.append(lab)  # stopped at teardown, even if it never gets ready
        wait_until_ready(lab)
        return lab

    yield start
    for lab in started:
        stop_lab(lab)


def module_lab(tmp_path_factory, database_url, mode, slow_url, delay=0.2, extra=()):
    """For a module-scoped fixture (`yield from`): one lab that several tests only send
    requests to; stopped and its log checked after the module's last test."""
    lab = launch_lab(tmp_path_factory.mktemp(f"lab-{mode}"), database_url, mode, slow_url,
                     delay, extra)
    try:
        wait_until_ready(lab)
        yield lab
    finally:
        stop_lab(lab)


def load(url, n=10, c=10, *extra):
    """Run the real load.py and return its JSON figures."""
    result = run(["load.py", "-n", str(n), "-c", str(c), "-t", "60", "--json", *extra, url],
                 timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- The sandbox: every process a test starts, followed -------------------------------------
# How "nothing left behind" is checked without being fooled by other runs on the same machine:
# every process a test starts gets a unique MARK value in its environment (children inherit
# it) and a private TMPDIR (run_all.sh's work folder and lab.py's awl-pg-* data folder go
# there). A background thread also records every descendant of the started process while it
# runs, so PostgreSQL backends (whose /proc environ and cmdline PostgreSQL overwrites) are
# known too.

MARK = "AWL_FAULT_TEST"


class Sandbox:
    """A private TMPDIR and environment marker, and a watch over every process started in it."""

    def __init__(self):
        # Short, under /tmp: PostgreSQL's Unix socket path must stay under 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="awlt-"))
        self.tmp.chmod(0o1777)  # as /tmp: as root, PostgreSQL runs as another user
        # lab.py's cache folder, empty: each lab started here builds its template with initdb.
        self.cache = Path(tempfile.mkdtemp(prefix="awlc-"))
        self.cache.chmod(0o755)
        self.token = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        self.env.update({MARK: self.token, "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1",
                         "AWL_CACHE_DIR": str(self.cache)})
        self.seen = {}  # pid -> (create_time, description)
        self.roots = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def popen(self, args, new_session=False, **kwargs):
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env, start_new_session=new_session,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **kwargs)
        proc.out, proc.err = [], []
        for stream, sink in ((proc.stdout, proc.out), (proc.stderr, proc.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")),
                             daemon=True).start()
        self.roots.append(proc.pid)
        self._record(proc.pid)
        return proc

    def _record(self, pid):
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with proc.oneshot():
                    key = proc.create_time()
                    self.seen.setdefault(proc.pid, (key, " ".join(proc.cmdline()) or proc.name()))
        except psutil.Error:
            pass

    def _marked(self):
        """Processes carrying our marker or naming our TMPDIR, wherever they were reparented."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                if str(self.tmp) in cmdline or proc.environ().get(MARK) == self.token:
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def _watch(self):
        while not self._stop.is_set():
            for pid in list(self.roots):
                self._record(pid)
            for proc in self._marked():
                self._record(proc.pid)
            self._stop.wait(0.03)

    def alive(self):
        left = []
        for pid, (created, description) in list(self.seen.items()):  # the watcher adds
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {proc.username()} {description}")
            except psutil.Error:
                pass
        for proc in self._marked():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and proc.pid not in self.seen:
                    left.append(f"{proc.pid} {' '.join(proc.cmdline())}")
            except psutil.Error:
                pass
        return left

    def wait_all_gone(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.alive()
            if not left:
                return []
            time.sleep(0.1)
        return self.alive()

    def files(self):
        return sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*"))

    def half_built(self):
        """Cache entries still being built (renamed into place, without the dot, when done)."""
        return sorted(p.name for p in self.cache.iterdir() if p.name.startswith("."))

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for pid, (created, _) in list(self.seen.items()):  # never leave strays to the next test
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)


@pytest.fixture
def sandbox():
    box = Sandbox()
    yield box
    box.close()


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def send(proc, sig, group):
    if group:  # as a terminal's Ctrl-C does: the whole foreground process group
        os.killpg(os.getpgid(proc.pid), sig)
    else:
        proc.send_signal(sig)


def initdb_running(box):
    for pid in list(box.seen):
        try:
            if "initdb" in " ".join(psutil.Process(pid).cmdline()):
                return True
        except psutil.Error:
            pass
    return False


def wait_for_initdb(box, timeout):
    """initdb running (the sandbox's cache starts empty, so lab.py builds its template)."""
    wait_until(lambda: initdb_running(box), timeout, "initdb")


def postgres_started(sandbox):
    """A postgres server among the processes seen (read now: a child's first sighting may
    predate its exec, when it still bears its parent's command line)."""
    for pid in list(sandbox.seen):
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if "postgres" in cmdline and " -D " in cmdline:
            return True
    return False


@pytest.fixture(scope="session")
def warm_cache():
    """A lab.py cache folder with its template built, once for the session: for runs that
    must not spend their first seconds in initdb (tests that only copy the template; those
    about building it start from an empty cache of their own)."""
    box = Sandbox()
    try:
        proc = box.popen([PY, "lab.py", "--database-only"])
        wait_until(lambda: any(line.startswith("DATABASE_URL=") for line in proc.out), 120,
                   "the embedded PostgreSQL")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        yield box.cache
    finally:
        box.close()
