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
