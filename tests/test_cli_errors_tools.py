"""One error convention for the stand-alone tools, checked on the real scripts.

A bad flag, file or environment gets exactly one line on stderr, "TOOL: error: MESSAGE",
exit status 2 and no traceback, before anything starts. BIND_CASES is the HOST:PORT
grammar shared by every --bind: lab.py has its own copy of parse_host_port(), so it can
be run against the same list.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import free_port

import slow_server

BIND_MESSAGE = "--bind must be HOST:PORT (for example 127.0.0.1:8000 or [::1]:8000), not {!r}"

# (value, accepted). "{port}" in a value stands for a free port, filled in by the test.
BIND_CASES = [
    ("127.0.0.1:{port}", True),
    ("localhost:{port}", True),
    ("[::1]:{port}", True),
    ("0.0.0.0:{port}", True),
    (":8000", False),  # no host: nothing is guessed
    ("8000", False),
    ("", False),
    ("127.0.0.1", False),
    ("127.0.0.1:", False),
    ("[::1]:", False),
    ("[::1]", False),
    ("::1:8000", False),  # IPv6 without brackets: is the last :8000 the port?
    ("[::1]8000", False),
    ("[::1:8000", False),
    ("::1]:8000", False),
    ("[zz]:8000", False),  # brackets, but no IPv6 address in them
    ("[1::2::3]:8000", False),
    ("[127.0.0.1]:8000", False),
    ("127.0.0.1:\uff18\uff10\uff10\uff10", False),  # fullwidth digits
    ("127.0.0.1:\u0668\u0660\u0660\u0660", False),  # Arabic-Indic digits
    ("127.0.0.1:0", False),
    ("127.0.0.1:70000", False),
    ("127.0.0.1:99999", False),
    ("127.0.0.1:123456", False),
    ("127.0.0.1:-1", False),
    ("127.0.0.1:+80", False),
    ("127.0.0.1: 8000", False),
    (" 127.0.0.1:8000", False),
    ("127.0.0.1:8000 ", False),
    ("127.0.0.1:8000:1", False),
    ("local host:8000", False),
    ("localhost:http", False),  # a service name is not a port
    ("http://127.0.0.1:8000", False),
]


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def run_tool(*args, timeout=30, python=sys.executable):
    return subprocess.run([python, *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, check=False)


def other_pythons():
    """The system's python3 when it is not the one running the tests: load.py is stdlib only,
    and a newcomer may well run it with that one."""
    found = []
    for path in ["/usr/bin/python3"]:
        if os.access(path, os.X_OK) and os.path.realpath(path) != os.path.realpath(sys.executable):
            version = subprocess.run([path, "-c", "import sys; print(sys.version_info >= (3, 9))"],
                                     capture_output=True, text=True, check=False).stdout
            if version.strip() == "True":
                found.append(path)
    return found


PYTHONS = [pytest.param(sys.executable, id="this-python")] + [
    pytest.param(path, id=path) for path in other_pythons()]


def assert_one_error(result, tool, message):
    """Exit 2 and stderr exactly "TOOL: error: MESSAGE\\n"; nothing on stdout."""
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stderr) == (2, f"{tool}: error: {message}\n")
    assert result.stdout == ""


@pytest.mark.parametrize(("value", "accepted"), BIND_CASES)
def test_slow_server_bind_grammar(value, accepted):
    if not accepted:
        result = run_tool("slow_server.py", "--bind", value, "--delay", "0")
        assert_one_error(result, "slow_server.py", BIND_MESSAGE.format(value))
        return
    if value.startswith("[::1]") and not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback here")
    value = value.format(port=free_port())
    proc = subprocess.Popen([sys.executable, "slow_server.py", "--bind", value, "--delay", "0"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(1 + value.startswith("0.0.0.0"))]
        assert "serving on http://" in lines[-1], lines
        assert "error" not in "".join(lines)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(("value", "accepted"), BIND_CASES)
def test_parse_host_port_follows_the_same_grammar(value, accepted):
    value = value.format(port=8000)
    if accepted:
        host, port = slow_server.parse_host_port(value)
        assert port == 8000 and slow_server.host_port(host, port) == value
    else:
        with pytest.raises(ValueError) as error:
            slow_server.parse_host_port(value, flag="--slow")
        assert str(error.value) == BIND_MESSAGE.format(value).replace("--bind", "--slow")


# --- lab.py ---------------------------------------------------------------------------


def run_lab(*args, env=None, timeout=60):
    """lab.py with no DATABASE_URL from the caller's environment, unless given in env."""
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "lab.py", *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, check=False,
                          env={**base, **(env or {})})


@pytest.mark.parametrize(("value", "accepted"), BIND_CASES)
def test_lab_bind_grammar(value, accepted):
    """lab.py's copy of parse_host_port(), through its command line (--check starts nothing)."""
    value = value.format(port=free_port())
    result = run_lab("--check", "--bind", value)
    if accepted:
        assert (result.returncode, result.stderr, result.stdout) == (0, "", "")
    else:
        assert_one_error(result, "lab.py", BIND_MESSAGE.format(value))


REFUSED = ('cannot reach PostgreSQL: connection to server at "127.0.0.1", port 1 failed: '
           "Connection refused")


def test_lab_good_bind_fails_later_for_another_reason():
    """The whole start-up path, not only --check: a good --bind lets lab.py go on to the
    database, whose error is then the one line."""
    result = run_lab("--bind", f"127.0.0.1:{free_port()}",
                     "--database-url", "postgresql://u@127.0.0.1:1/x")
    assert_one_error(result, "lab.py", REFUSED)


SLOW_URL_MESSAGE = "--slow-url must be an http:// URL with a port from 1 to 65535, not {!r}"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:99999", "http://127.0.0.1:0", "http://127.0.0.1:-1", "http://[::1/",
    "http://[::1]x:80", "http://[zz]:80", "http://::1:80", "http://127.0.0.1:\uff18\uff10",
    "http://127.0.0.1:", "http://user@127.0.0.1:80", "http://ex ample.com", "http://",
    "ftp://127.0.0.1:21", "127.0.0.1:8001",
])
def test_lab_bad_slow_url(url):
    assert_one_error(run_lab("--check", "--slow-url", url), "lab.py", SLOW_URL_MESSAGE.format(url))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8001", "http://localhost", "https://[::1]",
                                 "http://[::1]:8001/base/", "http://slow.example:80"])
def test_lab_good_slow_url(url):
    result = run_lab("--check", "--slow-url", url)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(("url", "message"), [
    ("garbage", "the database URL must look like postgresql://user:password@host:5432/dbname"),
    ("mysql://u:s3cret@h/db",
     "the database URL must look like postgresql://user:password@host:5432/dbname"),
    ("postgresql://u:s3cret@[::1/x", "the database URL has a bad host or port: '[::1'"),
    ("postgresql://u:s3cret@[zz]:5432/x", "the database URL has a bad host or port: '[zz]:5432'"),
    ("postgresql://u:s3/cret@[::1:5432/x", "the database URL has a bad host or port: '[::1:5432'"),
    ("postgresql://u:s3cret@h:0/x", "the database URL has a bad host or port: 'h:0'"),
    ("postgresql://u:s3cret@h:99999/x", "the database URL has a bad host or port: 'h:99999'"),
    ("postgresql://u:s3cret@h:\uff15\uff14\uff13\uff12/x",
     "the database URL has a bad host or port: 'h:\uff15\uff14\uff13\uff12'"),
])
def test_lab_bad_database_url(url, message):
    for result in (run_lab("--check", env={"DATABASE_URL": url}),
                   run_lab("--check", "--database-url", url)):
        assert_one_error(result, "lab.py", message)  # and so no password echoed


# --- run_all.sh -----------------------------------------------------------------------


def run_all(*args, env=None, timeout=60):
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(["./run_all.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, check=False,
                          env={**base, **(env or {})})


@pytest.mark.parametrize(("url", "message"), [
    ("garbage", "the database URL must look like postgresql://user:password@host:5432/dbname"),
    ("postgresql://u:s3cret@[::1/x", "the database URL has a bad host or port: '[::1'"),
    ("postgresql://u:s3cret@127.0.0.1:1/x", REFUSED),
])
def test_run_all_checks_database_url_before_starting_anything(url, message, tmp_path):
    tmp_path.chmod(0o1777)
    result = run_all("--delay", "0.05", env={"DATABASE_URL": url, "TMPDIR": str(tmp_path)})
    assert_one_error(result, "run_all.sh", f"DATABASE_URL: {message}")
    assert list(tmp_path.iterdir()) == []  # its work folder gone, no awl-pg-* made


@pytest.mark.parametrize("path", ["/nonexistent", ""])
def test_run_all_with_a_broken_path_names_what_is_missing(path):
    result = run_all("--delay", "0.05", env={"PATH": path})
    assert_one_error(result, "run_all.sh", f"not found on PATH: python3, rm, sleep (PATH={path})")
    help_text = run_all("--help", env={"PATH": path})
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: ./run_all.sh")


# --- load.py --------------------------------------------------------------------------


class Listener:
    """A port whose connections complete in the kernel and wait there to be counted:
    after a refused run, none must have been made."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def connections(self):
        count = 0
        self.sock.settimeout(0.3)
        try:
            while True:
                self.sock.accept()[0].close()
                count += 1
        except TimeoutError:
            return count


@pytest.fixture
def listener():
    listening = Listener()
    yield listening
    listening.sock.close()


# load.py reads the scheme and host[:port] itself, so these are its own messages on every
# Python (urlsplit()'s own checks changed within 3.11: 3.11.2 refuses "[::1]x", 3.11.7 not).
URL_CASES = [
    ("http://[::1/", "invalid host in URL: http://[::1/"),
    ("http://[::1]x:80/", "invalid host in URL: http://[::1]x:80/"),
    ("http://[zz]:80/", "invalid IPv6 address in URL: http://[zz]:80/"),
    ("http://[v1.fe]:80/", "invalid IPv6 address in URL: http://[v1.fe]:80/"),
    ("http://ex ample.com/", "invalid host in URL: http://ex ample.com/"),
    ("http://:80/", "URL has no host: http://:80/"),
    (" http://127.0.0.1:80/",
     "URL must start with http:// (https is not supported):  http://127.0.0.1:80/"),
]
for _port in ("\uff18\uff10\uff10\uff10", "\u0668\u0660\u0660\u0660", "0", "70000", "99999",
              "-1", "+80", "80:90"):
    URL_CASES.append((f"http://127.0.0.1:{_port}/",
                      f"invalid port in URL (use 1 to 65535): http://127.0.0.1:{_port}/"))


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize(("url", "message"), URL_CASES)
def test_load_bad_url(url, message, python):
    assert_one_error(run_tool("load.py", "-n", "1", "-c", "1", url, python=python), "load.py",
                     message)


@pytest.mark.parametrize(("args", "message"), [
    (["-n", "\u0663"], "argument -n: invalid int value: '\u0663'"),
    (["-c", "\uff12"], "argument -c: invalid int value: '\uff12'"),
    (["-t", "\u0661.5"], "argument -t: invalid float value: '\u0661.5'"),
    (["-z", "\u0661s"], "invalid duration '\u0661s' (use e.g. 10s, 1m, 500ms)"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_load_numbers_are_ascii_and_flags_known(args, message):
    result = run_tool("load.py", *args, "http://127.0.0.1:9/")
    assert_one_error(result, "load.py", message)


def test_load_save_into_a_missing_folder_is_refused_before_sending(listener):
    result = run_tool("load.py", "-n", "5", "-c", "5", "--save", "/missing/dir/x.json",
                      listener.url)
    assert_one_error(result, "load.py", "--save /missing/dir/x.json: no such folder /missing/dir")
    assert listener.connections() == 0


def test_load_save_onto_a_folder_is_refused_before_sending(listener, tmp_path):
    result = run_tool("load.py", "-n", "5", "-c", "5", "--save", str(tmp_path), listener.url)
    assert_one_error(result, "load.py", f"--save {tmp_path}: is a folder, not a file")
    assert listener.connections() == 0


def with_limit(name, soft, hard):
    """python -c code that runs the script named next on its command line under a limit."""
    return (f"import resource, runpy, sys; resource.setrlimit(resource.{name}, ({soft}, {hard})); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_load_save_check_leaves_no_file_behind_and_keeps_old_figures(tmp_path, listener):
    """A run refused after --save was checked (here: too little address space for 2,000
    threads) leaves no new file behind and an old one as it was."""
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("old figures\n")
    for path in (new, old):
        result = run_tool("-c", with_limit("RLIMIT_AS", 10**9, 10**9), "load.py", "-n", "2000",
                          "-c", "2000", "--save", str(path), listener.url)
        assert result.returncode == 2 and "cannot start 2000 threads" in result.stderr, result
    assert not new.exists()
    assert old.read_text() == "old figures\n"
    assert listener.connections() == 0


# Address-space limits (MB) at which, on some build, a thread the system created died
# before it ran (MemoryError) and threading.Thread.start() used to wait for it forever
# (Debian's 3.11.2 at 1000, 461, 538; pyenv's 3.11.7 at 507, 598, 731): every one of them
# must be one line and exit 2, on every Python, within seconds. They run side by side.
LIMITS_MB = [461, 507, 538, 598, 731, 1000]


@pytest.mark.parametrize("python", PYTHONS)
def test_load_never_waits_for_a_thread_that_cannot_start(python, listener):
    started = time.monotonic()
    runs = {mb: subprocess.Popen(
        [python, "-c", with_limit("RLIMIT_AS", mb * 10**6, mb * 10**6), "load.py",
         "-n", "2000", "-c", "2000", listener.url], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for mb in LIMITS_MB}
    outcomes = {}
    for mb, proc in runs.items():
        try:
            out, err = proc.communicate(timeout=max(1, 60 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "(hung)"
        outcomes[mb] = (proc.returncode, out, err)
    for mb, (code, out, err) in outcomes.items():
        assert code == 2 and out == "" and err.count("\n") == 1, (mb, code, err)
        assert err.startswith("load.py: error: ") and err.endswith(": lower -c\n"), (mb, err)
    assert listener.connections() == 0


def test_load_refuses_a_concurrency_over_the_open_file_limit(listener):
    result = run_tool("-c", with_limit("RLIMIT_NOFILE", 100, 100), "load.py", "-n", "1000",
                      "-c", "1000", listener.url)
    assert_one_error(result, "load.py", "-c 1000 needs about 1016 open files but the limit is "
                     "100 (raise it with ulimit -n)")
    assert listener.connections() == 0
