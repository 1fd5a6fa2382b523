"""Tests for slow_server.py: the behaviour the lab relies on, checked over real sockets."""

import http.client
import json
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "slow_server.py"
sys.path.insert(0, str(ROOT))

from conftest import free_port

import slow_server

STARTUP = re.compile(r"slow_server\.py: serving on http://(.+):(\d+) \(delay ([\d.]+) s\)")


class ServerProcess:
    """slow_server.py running as a subprocess, with its stderr read line by line."""

    def __init__(self, *args, stdout=subprocess.DEVNULL):
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_started(self, timeout=10):
        """Return the port from the startup line."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"server exited early: {''.join(self.stderr)}"
            match = STARTUP.fullmatch(line.rstrip("\n"))
            if match:
                return int(match.group(2))

    def stop(self, sig=signal.SIGTERM, timeout=5):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def stderr_text(self, timeout=2):
        # The reader thread puts None once stderr reaches EOF.
        deadline = time.monotonic() + timeout
        while self.lines.get(timeout=max(0.01, deadline - time.monotonic())) is not None:
            pass
        return "".join(self.stderr)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server (default delay 0.3 s) for the request-level tests; its log goes to a file."""
    log_path = tmp_path_factory.mktemp("slow_server") / "access.log"
    with open(log_path, "w") as log:
        proc = ServerProcess("--bind", f"127.0.0.1:{free_port()}", "--delay", "0.3", stdout=log)
    try:
        proc.port = proc.wait_started()
        proc.log_path = log_path
        yield proc
    finally:
        proc.stop()


def request(port, path, method="GET", headers=None, timeout=5):
    """Return (status, headers, parsed JSON body or None, seconds taken)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        elapsed = time.monotonic() - started
        return response.status, response, json.loads(body) if body else None, elapsed
    finally:
        conn.close()


def raw_exchange(port, data, timeout=5):
    """Send raw bytes and return everything the server answers before it hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_raw(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), json.loads(body)


# --- concurrency: the server must never be the bottleneck -----------------------------


def test_concurrent_requests_each_wait_the_delay_once_in_parallel(server):
    count, delay = 50, 0.5
    barrier = threading.Barrier(count)
    results = []

    def one():
        barrier.wait()
        results.append(request(server.port, f"/api/v1/movies?delay={delay}", timeout=10))

    threads = [threading.Thread(target=one) for _ in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = time.monotonic() - started

    assert len(results) == count
    assert all(status == 200 for status, *_ in results)
    assert min(elapsed for *_, elapsed in results) >= delay
    assert total < delay * 1.8, f"{count} requests took {total:.2f}s; they should overlap"


def test_burst_of_connections_waits_in_the_listen_backlog():
    # Nobody accepts until every connection is open, so all 200 must fit in the kernel's
    # accept queue; with the stdlib's backlog of 5, the sixth connect() already stalls.
    srv = slow_server.make_server("127.0.0.1", 0, 0)
    port = srv.server_address[1]
    socks = []
    try:
        for _ in range(200):
            sock = socket.socket()
            socks.append(sock)
            sock.settimeout(0.5)
            sock.connect(("127.0.0.1", port))
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        answers = []
        for sock in socks:
            sock.settimeout(5)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            answers.append(data)
    finally:
        for sock in socks:
            sock.close()
        srv.shutdown()
        srv.server_close()
    assert len(answers) == 200
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)


def test_keep_alive_connection_serves_several_requests(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/api/v1/movies?delay=0")
            response = conn.getresponse()
            body = json.loads(response.read())
            assert response.status == 200
            assert response.getheader("Connection") is None  # not closing on us
            assert set(body) == {"character", "movie"}
        first_socket = conn.sock
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        assert conn.sock is first_socket
    finally:
        conn.close()


def test_keep_alive_requests_are_not_held_back_by_nagle(server):
    # Headers and body leave in two writes; with Nagle's algorithm on, the body waits for
    # the client's delayed ACK (about 40 ms) on every request of a reused connection.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        started = time.monotonic()
        for _ in range(20):
            conn.request("GET", "/api/v1/movies?delay=0")
            conn.getresponse().read()
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    assert elapsed < 0.3, f"20 keep-alive requests took {elapsed:.2f}s"


# --- the movies endpoint and its delay -------------------------------------------------


def test_movies_waits_the_default_delay_and_answers_json(server):
    status, response, body, elapsed = request(server.port, "/api/v1/movies")
    assert status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert int(response.getheader("Content-Length")) > 0
    assert isinstance(body["character"], str) and isinstance(body["movie"], str)
    assert 0.3 <= elapsed < 0.3 * 1.8


def test_delay_query_parameter_overrides_the_default(server):
    status, _, _, elapsed = request(server.port, "/api/v1/movies?delay=0.1")
    assert status == 200
    assert 0.1 <= elapsed < 0.25


@pytest.mark.parametrize("value", ["-1", "61", "abc", "nan", "inf", "-inf", "", "60.001"])
def test_out_of_range_or_non_numeric_delay_is_a_400(server, value):
    status, response, body, elapsed = request(server.port, f"/api/v1/movies?delay={value}")
    assert status == 400
    assert response.getheader("Content-Type") == "application/json"
    assert body == {"error": "delay must be a number of seconds from 0 to 60"}
    assert elapsed < 0.2  # rejected before any waiting


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("60", 60.0), ("0.25", 0.25)])
def test_parse_delay_accepts_zero_to_sixty(text, seconds):
    assert slow_server.parse_delay(text) == seconds


@pytest.mark.parametrize("text", ["-0.001", "60.5", "1e3", "nan", "inf", "one", ""])
def test_parse_delay_rejects_everything_else(text):
    with pytest.raises(ValueError, match="from 0 to 60"):
        slow_server.parse_delay(text)


# --- other paths and methods ------------------------------------------------------------


def test_healthz_answers_at_once(server):
    status, _, body, elapsed = request(server.port, "/healthz")
    assert status == 200
    assert body == {"status": "ok"}
    assert elapsed < 0.1


def test_unknown_path_is_a_json_404(server):
    status, response, body, _ = request(server.port, "/api/v1/nothing")
    assert status == 404
    assert response.getheader("Content-Type") == "application/json"
    assert "error" in body


def test_post_is_a_json_405_with_allow_header(server):
    status, response, body, _ = request(server.port, "/api/v1/movies", method="POST")
    assert status == 405
    assert response.getheader("Allow") == "GET, HEAD"
    assert "error" in body


def test_head_sends_headers_without_body(server):
    status, response, body, _ = request(server.port, "/healthz", method="HEAD")
    assert status == 200
    assert int(response.getheader("Content-Length")) > 0
    assert body is None


# --- access log ---------------------------------------------------------------------------


def test_access_log_is_one_json_object_per_request(server):
    request(server.port, "/api/v1/movies?delay=0.05&marker=log-test")
    # The line is written right after the answer; give the server a moment to get to it.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        lines = server.log_path.read_text().splitlines()
        records = [json.loads(line) for line in lines]  # every line must be JSON
        mine = [r for r in records if r["path"] == "/api/v1/movies?delay=0.05&marker=log-test"]
        if mine:
            break
        time.sleep(0.02)
    assert len(mine) == 1
    record = mine[0]
    assert set(record) == {"time", "client", "method", "path", "status", "bytes", "duration_s"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["client"].startswith("127.0.0.1:")
    assert record["method"] == "GET"
    assert record["status"] == 200
    assert record["bytes"] > 0
    assert 0.05 <= record["duration_s"] < 0.5
    assert round(record["duration_s"], 4) == record["duration_s"]


# --- oversized requests -------------------------------------------------------------------


def test_request_line_over_8_kib_is_a_414(server):
    answer = raw_exchange(server.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, body = parse_raw(answer)
    assert status == 414
    assert "error" in body


def test_header_line_over_8_kib_is_a_431(server):
    big = b"X-Big: " + b"b" * 8300 + b"\r\n"
    answer = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + big + b"\r\n")
    status, _, body = parse_raw(answer)
    assert status == 431
    assert "error" in body


def test_header_line_just_under_the_limit_is_fine(server):
    header = b"X-Big: " + b"b" * 8000 + b"\r\n"
    data = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + header + b"\r\n"
    status, _, _ = parse_raw(raw_exchange(server.port, data))
    assert status == 200


def test_more_than_100_headers_is_a_431(server):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    answer = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
    status, _, body = parse_raw(answer)
    assert status == 431
    assert "error" in body


def test_garbled_request_line_is_a_json_400(server):
    status, head, body = parse_raw(raw_exchange(server.port, b"GARBAGE\r\n\r\n"))
    assert status == 400
    assert "Content-Type: application/json" in head
    assert "error" in body


# --- command line -------------------------------------------------------------------------
# (its mistakes, one line each, are in tests/test_cli_errors_tools.py: bad flags, the HOST:PORT
# grammar of --bind case by case, addresses it cannot listen on)


def test_startup_line_names_the_port_and_delay():
    port = free_port()
    proc = ServerProcess("--bind", f"127.0.0.1:{port}", "--delay", "0.25")
    try:
        assert proc.wait_started() == port
        assert f"http://127.0.0.1:{port} (delay 0.25 s)" in proc.stderr[-1]
        assert request(port, "/healthz")[0] == 200
    finally:
        proc.stop()


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_bracketed_ipv6_address_is_served_over_ipv6():
    port = free_port()
    proc = ServerProcess("--bind", f"[::1]:{port}", "--delay", "0")
    try:
        proc.wait_started()
        assert f"serving on http://[::1]:{port} (delay 0.0 s)" in proc.stderr[-1]
        with socket.create_connection(("::1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert parse_raw(answer)[0] == 200
    finally:
        proc.stop()


def test_non_loopback_bind_warns():
    proc = ServerProcess("--bind", f"0.0.0.0:{free_port()}")
    try:
        proc.wait_started()
        assert proc.stderr[0].startswith("slow_server.py: warning: ")
    finally:
        proc.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_promptly_even_while_a_request_sleeps(sig):
    proc = ServerProcess("--bind", f"127.0.0.1:{free_port()}", "--delay", "30")
    try:
        port = proc.wait_started()
        sleeper = socket.create_connection(("127.0.0.1", port))
        sleeper.sendall(b"GET /api/v1/movies HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)  # let the request reach its sleep
        started = time.monotonic()
        returncode = proc.stop(sig)
        elapsed = time.monotonic() - started
        sleeper.close()
    finally:
        proc.stop(signal.SIGKILL)
    stderr = proc.stderr_text()
    assert elapsed < 2
    assert returncode == 0
    assert stderr.endswith("slow_server.py: stopped\n")
    assert "Traceback" not in stderr


# --- out of file descriptors --------------------------------------------------------------


def cpu_seconds(pid):
    """User plus system CPU time of a running process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux: prlimit, /proc")
def test_out_of_file_descriptors_is_logged_once_a_second_without_spinning():
    """With 64 descriptors and 200 clients holding their connections, accept() fails on
    every try; the log gets a line a second with a count, not one line per failure, the
    CPU stays idle, and once the clients let go the server answers again."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--bind", f"127.0.0.1:{port}", "--delay", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients = []
    try:
        # As `prlimit --nofile=64 --pid PID` would; the server has fewer open than that yet.
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (64, 64))
        assert STARTUP.fullmatch(proc.stderr.readline().rstrip("\n"))
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # keep-alive
            clients.append(sock)
        time.sleep(0.5)  # the server uses up its descriptors
        cpu_before = cpu_seconds(proc.pid)
        time.sleep(3)
        cpu_used = cpu_seconds(proc.pid) - cpu_before
        for sock in clients:
            sock.close()
        clients.clear()
        # Once the clients are gone the server frees its descriptors and answers again.
        deadline = time.monotonic() + 10
        while True:
            try:
                status = request(port, "/healthz", timeout=2)[0]
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not recover"
        assert status == 200
    finally:
        for sock in clients:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = stderr.splitlines()
    failures = [line for line in lines if "accept failed" in line]
    assert failures, stderr
    assert len(lines) < 50, f"{len(lines)} lines of log, first ones: {lines[:5]}"
    assert re.fullmatch(
        r"slow_server\.py: accept failed \d+ times? in the last \d+\.\d s: "
        r"\[Errno 24\] Too many open files",
        failures[0],
    ), failures[0]
    assert "Traceback" not in stderr
    assert cpu_used < 1.0, f"{cpu_used:.2f} s of CPU in 3 s while out of descriptors: spinning"
    assert proc.returncode == 0


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux: /proc")
def test_a_low_soft_open_file_limit_is_raised_to_the_hard_one():
    """A desktop's soft limit of 1,024 open files would stop the 1,000-at-once runs (each lab
    keeps up to 1,000 idle connections here): the server takes its hard limit, as hey does."""
    port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = subprocess.Popen(  # started as from a shell whose soft limit is 256
        ["bash", "-c", f'ulimit -Sn {min(256, hard)} && exec "$0" "$@"', sys.executable,
         str(SERVER), "--bind", f"127.0.0.1:{port}", "--delay", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert STARTUP.fullmatch(proc.stderr.readline().rstrip("\n"))
        assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0] == hard
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
