"""One error convention for the stand-alone tools, checked on the real scripts.

A bad flag, file or environment gets exactly one line on stderr, "TOOL: error: MESSAGE",
exit status 2 and no traceback, before anything starts. BIND_CASES is the HOST:PORT
grammar shared by every --bind: lab.py has its own copy of parse_host_port(), so it can
be run against the same list.
"""

import socket
import subprocess
import sys
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


def run_tool(*args, timeout=30):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, check=False)


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


URL_CASES = [
    ("http://[::1/", "invalid URL 'http://[::1/': Invalid IPv6 URL"),
    ("http://[::1]x:80/", "invalid host in URL: http://[::1]x:80/"),
    ("http://[v1.fe]:80/", "invalid IPv6 address in URL: http://[v1.fe]:80/"),
    ("http://ex ample.com/", "invalid host in URL: http://ex ample.com/"),
    ("http://:80/", "URL has no host: http://:80/"),
]
for _port in ("\uff18\uff10\uff10\uff10", "\u0668\u0660\u0660\u0660", "0", "70000", "99999",
              "-1", "+80", "80:90"):
    URL_CASES.append((f"http://127.0.0.1:{_port}/",
                      f"invalid port in URL (use 1 to 65535): http://127.0.0.1:{_port}/"))


@pytest.mark.parametrize(("url", "message"), URL_CASES)
def test_load_bad_url(url, message):
    assert_one_error(run_tool("load.py", "-n", "1", "-c", "1", url), "load.py", message)


def test_load_url_with_brackets_but_no_ipv6_address():
    # Python 3.11.4 on refuses this in urlsplit() itself; before, load.py's own check does.
    result = run_tool("load.py", "-n", "1", "-c", "1", "http://[zz]:80/")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("load.py: error: invalid ")
    assert "'http://[zz]:80/'" in result.stderr or "http://[zz]:80/" in result.stderr


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


def test_load_refuses_a_concurrency_over_the_open_file_limit(listener):
    result = run_tool("-c", with_limit("RLIMIT_NOFILE", 100, 100), "load.py", "-n", "1000",
                      "-c", "1000", listener.url)
    assert_one_error(result, "load.py", "-c 1000 needs about 1016 open files but the limit is "
                     "100 (raise it with ulimit -n)")
    assert listener.connections() == 0
