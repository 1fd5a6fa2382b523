"""Tests for load.py: the statistics by hand, the command line, and real runs
against small local servers started here (sleepy, big, resetting, hanging)."""

import json
import os
import pty
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

import load

JSON_KEYS = {
    "url", "method", "requests", "concurrency", "started_at", "ended_at", "total_s",
    "slowest_s", "fastest_s",
    "average_s", "rps", "total_data_bytes", "size_per_request", "histogram",
    "latency_distribution", "details", "status_codes", "errors", "interrupted", "timeline",
}
TIMELINE_KEYS = {
    "start_s", "end_s", "status", "error", "dns_dialup_s", "dns_s", "req_write_s",
    "resp_wait_s", "resp_read_s", "bytes",
}


# --- Servers ---------------------------------------------------------------------

MIB = b"\0" * (1 << 20)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Gunicorn's gevent worker
    disable_nagle_algorithm = True  # else the body waits ~40 ms behind the headers

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        getattr(self, "route_" + url.path.strip("/"), self.route_ok)(query)

    def _send(self, body, headers=()):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def route_ok(self, query):
        self._send(b"ok\n")

    def route_sleep(self, query):
        time.sleep(float(query["s"]))
        self._send(b"slept\n")

    def route_big(self, query):
        size = int(query["bytes"])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        while size:
            part = MIB[:min(size, len(MIB))]
            self.wfile.write(part)
            size -= len(part)

    def route_chunked(self, query):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for size in (1, 1000, 70000):
            self.wfile.write(b"%x\r\n" % size + b"a" * size + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_reset(self, query):
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def route_hang(self, query):
        self.server.released.wait(30)
        self.close_connection = True

    def route_quietclose(self, query):
        # Closes after answering without saying "Connection: close": the client's
        # kept-alive connection goes stale and must be retried, not reported.
        self._send(b"bye\n")
        self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        pass  # clients that time out or are interrupted drop connections on purpose


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.released = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.released.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def refused_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/"


def run_cli(*args, timeout=30):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "load.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
    return proc, time.monotonic() - started


def run_json(*args):
    proc, elapsed = run_cli("--json", *args)
    assert "Traceback" not in proc.stderr
    return proc.returncode, json.loads(proc.stdout), elapsed


# --- Statistics ------------------------------------------------------------------


def test_percentiles_follow_hey_on_one_to_ten():
    assert load.percentiles([float(i) for i in range(1, 11)]) == {
        10: 2.0, 25: 4.0, 50: 6.0, 75: 9.0, 90: 10.0, 95: 10.0, 99: 10.0}


def test_percentiles_of_a_hundred_values_and_of_one():
    values = [float(i) for i in range(1, 101)]
    assert load.percentiles(values) == {
        10: 11.0, 25: 26.0, 50: 51.0, 75: 76.0, 90: 91.0, 95: 96.0, 99: 100.0}
    assert set(load.percentiles([0.25]).values()) == {0.25}
    assert set(load.percentiles([]).values()) == {None}


def test_histogram_counts_each_latency_at_the_first_mark_at_or_above_it():
    # 1..11: step 1, so marks are 1, 2, ..., 11 and each value sits on its own mark.
    assert load.histogram([float(i) for i in range(1, 12)]) == [
        (float(i), 1) for i in range(1, 12)]
    # 0.1..1.0: marks 0.1, 0.19, 0.28, ... 0.91, 1.0; 0.2 rounds up to 0.28, etc.
    buckets = load.histogram([i / 10 for i in range(1, 11)])
    assert [m for m, _ in buckets] == pytest.approx([0.1 + 0.09 * i for i in range(11)])
    assert [c for _, c in buckets] == [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_histogram_of_equal_or_single_latencies_puts_all_on_the_first_mark():
    assert load.histogram([0.5] * 4) == [(0.5, 4)] + [(0.5, 0)] * 10
    assert load.histogram([0.3]) == [(0.3, 1)] + [(0.3, 0)] * 10
    assert load.histogram([]) == []


def test_bar_length_rounds_like_hey():
    assert [load.bar_length(c, 6) for c in (0, 1, 6)] == [0, 7, 40]
    assert load.bar_length(0, 0) == 0


def row(start, end, status=200, size=10, error=None):
    return load.Row(start, end, 0.001, 0.0, 0.0, end - start - 0.002, 0.001, status, size, error)


def test_summary_counts_errors_but_times_only_responses():
    rows = [row(0.0, 1.0), row(0.0, 2.0, status=500), row(0.5, 0.6, None, 0, "boom")]
    s = load.summarize(rows, total=2.0)
    assert s["requests"] == 3
    assert s["rps"] == 1.0  # 2 responses in 2 s; the error does not count
    assert (s["fastest_s"], s["slowest_s"], s["average_s"]) == (1.0, 2.0, 1.5)
    assert s["status_codes"] == {"200": 1, "500": 1}
    assert s["errors"] == {"boom": 1}
    assert s["total_data_bytes"] == 20 and s["size_per_request"] == 10


def test_report_has_hey_layout():
    text = load.format_report(load.summarize([row(0.0, 1.0), row(0.0, 1.0)], total=1.0))
    lines = text.split("\n")
    assert lines[:3] == ["", "Summary:", "  Total:\t1.0000 secs"]
    assert "  Requests/sec:\t2.0000" in lines
    assert "  Total data:\t20 bytes" in lines and "  Size/request:\t10 bytes" in lines
    assert "  1.000 [2]\t|" + "\u25a0" * 40 in lines
    assert "  50% in 1.0000 secs" in lines
    assert "  [200]\t2 responses" in lines
    assert "Error distribution:" not in text
    assert text.endswith("responses\n\n\n\n")


def test_report_without_responses_shows_errors_and_no_data_lines():
    rows = [row(0.0, 0.1, None, 0, "Get \"x\": EOF")] * 3
    text = load.format_report(load.summarize(rows, total=0.1))
    assert "Total data" not in text
    assert "  Requests/sec:\t0.0000" in text
    assert "Error distribution:\n  [3]\tGet \"x\": EOF\n\n" in text


def bar_columns(timeline):
    """(first, last) column of each drawn bar."""
    spans = []
    for line in timeline.splitlines()[1:]:
        bar = line.split("|")[1]
        marks = [i for i, ch in enumerate(bar) if ch != " "]
        spans.append((marks[0], marks[-1]))
    return spans


def test_timeline_draws_a_staircase_for_serial_requests_and_a_block_for_parallel():
    serial = load.render_timeline([(2.0, 3.0, 200), (0.0, 1.0, 200), (1.0, 2.0, 200)], 3.0, 60)
    spans = bar_columns(serial)
    assert len(spans) == 3
    assert spans[0][0] == 0 and spans[0][0] < spans[1][0] < spans[2][0]
    assert all(a[1] <= b[0] for a, b in pairwise(spans))  # no overlap
    block = load.render_timeline([(0.0, 1.0, 200)] * 4, 1.0, 60)
    assert len(set(bar_columns(block))) == 1


def test_timeline_marks_errors_and_samples_long_runs():
    text = load.render_timeline([(0.0, 1.0, None)], 1.0, 50)
    assert "x" in text.splitlines()[1] and "error" in text
    many = load.render_timeline([(i / 100, i / 100 + 0.01, 200) for i in range(100)], 1.0, 80)
    assert len(many.splitlines()) == 1 + load.TIMELINE_MAX_ROWS
    assert "of 100 requests" in many.splitlines()[0]


def test_parse_duration():
    assert load.parse_duration("10s") == 10
    assert load.parse_duration("1m30s") == 90
    assert load.parse_duration("500ms") == 0.5
    for bad in ("10", "abc", "-5s", "5 s", ""):
        with pytest.raises(ValueError):
            load.parse_duration(bad)


def test_requests_are_shared_out_exactly():
    assert load.share(10, 10) == [1] * 10
    assert load.share(10, 3) == [4, 3, 3]


# --- Real runs -------------------------------------------------------------------


def test_ten_requests_at_c10_overlap(server):
    code, result, _ = run_json("-n", "10", "-c", "10", f"{server}/sleep?s=0.3")
    assert code == 0
    assert set(result) == JSON_KEYS
    assert result["status_codes"] == {"200": 10}
    assert 0.3 <= result["total_s"] < 0.6
    assert result["fastest_s"] >= 0.3
    timeline = result["timeline"]
    assert len(timeline) == 10
    assert all(set(t) == TIMELINE_KEYS and t["start_s"] <= t["end_s"] for t in timeline)
    assert max(t["start_s"] for t in timeline) < 0.1  # all sent together


def test_c1_runs_requests_one_after_another(server):
    code, result, _ = run_json("-n", "3", "-c", "1", f"{server}/sleep?s=0.3")
    assert code == 0 and result["total_s"] >= 0.9
    timeline = result["timeline"]
    assert all(a["end_s"] <= b["start_s"] for a, b in pairwise(timeline))
    # Only the first request dials; the others reuse the kept-alive connection.
    assert [t["dns_dialup_s"] > 0 for t in timeline] == [True, False, False]


def test_disable_keepalive_dials_every_time(server):
    code, result, _ = run_json("-n", "4", "-c", "1", "-disable-keepalive", f"{server}/")
    assert code == 0 and result["status_codes"] == {"200": 4}
    assert all(t["dns_dialup_s"] > 0 for t in result["timeline"])


def test_timeout_is_honoured_and_counted(server):
    code, result, elapsed = run_json("-n", "2", "-c", "2", "-t", "1", f"{server}/hang")
    assert code == 1
    assert elapsed < 3
    assert result["requests"] == 2 and result["status_codes"] == {}
    [(message, count)] = result["errors"].items()
    assert count == 2 and "Client.Timeout" in message


def test_refused_port_is_an_error_not_a_fast_run(refused_url):
    code, result, _ = run_json("-n", "4", "-c", "2", refused_url)
    assert code == 1
    assert result["rps"] == 0 and result["slowest_s"] is None
    [(message, count)] = result["errors"].items()
    assert count == 4 and "connection refused" in message
    assert all(t["status"] is None and t["error"] == message for t in result["timeline"])


def test_connection_reset_is_counted(server):
    code, result, _ = run_json("-n", "3", "-c", "1", f"{server}/reset")
    assert code == 1
    assert sum(result["errors"].values()) == 3
    assert all("reset" in message for message in result["errors"])


def test_stale_kept_alive_connection_is_retried_not_reported(server):
    code, result, _ = run_json("-n", "20", "-c", "2", f"{server}/quietclose")
    assert code == 0
    assert result["errors"] == {} and result["status_codes"] == {"200": 20}


def test_large_response_bytes_are_counted_exactly(server):
    size = 20 * (1 << 20) + 123
    code, result, _ = run_json("-n", "2", "-c", "2", f"{server}/big?bytes={size}")
    assert code == 0
    assert result["total_data_bytes"] == 2 * size
    assert [t["bytes"] for t in result["timeline"]] == [size, size]


def test_chunked_response_is_decoded(server):
    code, result, _ = run_json("-n", "3", "-c", "1", f"{server}/chunked")
    assert code == 0 and result["errors"] == {}
    assert result["total_data_bytes"] == 3 * 71001


def test_duration_mode_stops_after_the_duration(server):
    code, result, _ = run_json("-z", "500ms", "-c", "2", f"{server}/sleep?s=0.05")
    assert code == 0
    assert 0.5 <= result["total_s"] < 0.8
    assert 8 <= result["requests"] <= 22


def test_past_the_row_limit_requests_are_still_counted(server, monkeypatch):
    monkeypatch.setattr(load, "MAX_KEPT_ROWS", 4)
    opts = load.parse_args(["-n", "10", "-c", "2", f"{server}/"])
    run = load.run_load(opts)
    summary = load.summarize(run.rows(), run.total, overflow=run.overflow())
    assert summary["requests"] == 10 and summary["status_codes"] == {"200": 10}
    assert summary["kept_rows"] == 4 and summary["total_data_bytes"] == 30
    assert "latency figures cover the first 4 requests" in load.format_report(summary)


def test_text_report_and_no_progress_when_not_a_tty(server):
    proc, _ = run_cli("-n", "4", "-c", "2", f"{server}/")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("\nSummary:\n  Total:\t")
    assert "  [200]\t4 responses" in proc.stdout


def test_progress_line_on_a_tty_is_erased_before_the_report(server):
    main_end, tty_end = pty.openpty()
    proc = subprocess.Popen([sys.executable, "load.py", "-n", "6", "-c", "1",
                             f"{server}/sleep?s=0.25"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=tty_end, text=True)
    os.close(tty_end)
    out, _ = proc.communicate(timeout=20)
    seen = b""
    while True:
        try:
            data = os.read(main_end, 4096)
        except OSError:  # EIO once the child has gone
            break
        if not data:
            break
        seen += data
    os.close(main_end)
    assert proc.returncode == 0 and "Summary:" in out
    assert b"/6 requests done" in seen and b"Traceback" not in seen
    assert seen.endswith(b"\r\x1b[2K")


def test_csv_has_header_and_one_row_per_request(server):
    proc, _ = run_cli("-n", "6", "-c", "3", "-o", "csv", f"{server}/")
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == ("response-time,DNS+dialup,DNS,Request-write,Response-delay,"
                        "Response-read,status-code,offset")
    assert len(lines) == 7
    assert all(len(line.split(",")) == 8 and line.split(",")[6] == "200" for line in lines[1:])


def test_timeline_option_draws_a_staircase_at_c1(server):
    proc, _ = run_cli("-n", "3", "-c", "1", "--timeline", f"{server}/sleep?s=0.1")
    timeline = proc.stdout[proc.stdout.index("Timeline"):]
    spans = bar_columns(timeline)
    assert len(spans) == 3
    assert spans[0][0] < spans[1][0] < spans[2][0]


def test_ctrl_c_prints_the_report_and_exits_130(server):
    proc = subprocess.Popen([sys.executable, "load.py", "-n", "1000", "-c", "2",
                             f"{server}/sleep?s=0.2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 3
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert "Summary:" in out and "Interrupted after" in out
    assert "  [200]\t" in out


def test_ctrl_c_once_the_report_is_printing_is_no_traceback(server, tmp_path):
    """The run is over and the report is being written (run_all.sh's Ctrl-C "between"
    scenarios lands here): the report is finished, with no KeyboardInterrupt traceback."""
    saved = tmp_path / "figures.json"
    proc = subprocess.Popen([sys.executable, "load.py", "-n", "2", "-c", "2", "--timeline",
                             "--save", str(saved), f"{server}/sleep?s=0.01"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    while b"Summary:" not in out:
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, out
        out += chunk
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=10)
    assert "Traceback" not in err.decode(), err.decode()
    assert proc.returncode == 0 and b"Timeline" in out + rest
    assert json.loads(saved.read_text())["status_codes"] == {"200": 2}


def test_timeline_of_requests_sent_together_but_answered_in_turn_is_a_staircase():
    # Sent microseconds apart in an order unrelated to when they finished, as with -c 10.
    rows = [(0.0001 * i, float(end), 200) for i, end in enumerate([3, 1, 4, 10, 5, 9, 2, 6, 8, 7])]
    bars = load.render_timeline(rows, 10.0, 60).splitlines()[1:]
    widths = [bar.count("\u2588") for bar in bars]
    assert widths == sorted(widths) and len(set(widths)) == 10


# --- Start and end as Unix times -----------------------------------------------------


def test_json_says_when_the_run_started_and_ended(server, tmp_path):
    saved = tmp_path / "figures.json"
    before = time.time()
    code, result, _ = run_json("-n", "4", "-c", "2", "--save", str(saved),
                               f"{server}/sleep?s=0.2")
    after = time.time()
    assert code == 0
    assert before < result["started_at"] < result["ended_at"] < after
    assert result["ended_at"] - result["started_at"] == pytest.approx(result["total_s"], abs=2e-6)
    assert result["ended_at"] - result["started_at"] >= 0.4  # two requests in turn per worker
    assert json.loads(saved.read_text()) == result


# --- 1,000 connections at once ---------------------------------------------------------


def load_with_file_limit(soft, hard, *args, timeout=60):
    """The real load.py, in a process whose open-file limit is (soft, hard) from the start."""
    code = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, "load.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def slow_server_1s(start_slow_server):
    return start_slow_server(delay=1)


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1100, reason="needs an open-file limit over 1,100")
def test_a_thousand_connections_at_once_each_wait_the_delay_once(slow_server_1s):
    code, result, elapsed = run_json("-n", "1000", "-c", "1000", "-t", "30",
                                     f"{slow_server_1s.url}/api/v1/movies")
    assert code == 0
    assert result["status_codes"] == {"200": 1000} and result["errors"] == {}
    assert result["fastest_s"] >= 1.0
    # Served one after another, that would be 1,000 s. Waking 1,000 Python threads
    # takes a few tenths of a second (they take turns at the GIL), hence the margin.
    assert 1.0 <= result["total_s"] < 2.5, result["total_s"]
    assert elapsed < 10


def test_a_soft_open_file_limit_is_raised_to_the_hard_one(server):
    proc = load_with_file_limit(64, 1024, "--json", "-n", "200", "-c", "200", f"{server}/")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status_codes"] == {"200": 200}



# --- Threads that never run ------------------------------------------------------
# Under an address-space limit a thread the system created may die (MemoryError) before it
# runs a line, or as it starts waiting at the gate. threading.Thread.start() would wait for
# it forever (CPython gh-140746); load.py must refuse the run in one line instead. Here the
# death is made to happen, in the same places, without a limit (the real limit is in
# test_cli_errors_tools.py, on each Python found).


def refused_start(monkeypatch, capfd):
    """load.run_load() of 5 threads: the UsageError's message and how long it took."""
    monkeypatch.setattr(load, "START_TIMEOUT_S", 0.5)
    opts = load.parse_args(["-n", "5", "-c", "5", "http://127.0.0.1:9/"])
    started = time.monotonic()
    with pytest.raises(load.UsageError) as refused:
        load.run_load(opts)
    elapsed = time.monotonic() - started
    assert capfd.readouterr() == ("", "")  # not CPython's "Exception ignored in thread ..."
    return str(refused.value), elapsed


def test_a_thread_that_dies_before_it_runs_refuses_the_run(monkeypatch, capfd):
    real, seen = load.Spawned._run, []

    def first_call(self):  # as when CPython cannot push the new thread's first frame
        seen.append(self)
        if len(seen) == 4:
            raise MemoryError
        real(self)

    monkeypatch.setattr(load.Spawned, "_run", first_call)
    message, elapsed = refused_start(monkeypatch, capfd)
    assert message == "cannot start 5 threads (only 3): lower -c"
    assert elapsed < 3


def test_a_thread_that_dies_on_its_way_to_the_gate_refuses_the_run(monkeypatch, capfd):
    real, seen = load.Worker.run, []

    def run(self):  # the fifth says it runs, then dies before it waits at the gate
        seen.append(self)
        if len(seen) == 5:
            raise MemoryError
        real(self)

    monkeypatch.setattr(load.Worker, "run", run)
    message, elapsed = refused_start(monkeypatch, capfd)
    assert message == "cannot start 5 threads (not all of them could run): lower -c"
    assert elapsed < 3


def test_a_thread_out_of_memory_at_the_gate_breaks_it_at_once(monkeypatch, capfd):
    real, seen = load.Worker.run, []

    class Gate:  # the real gate, but the third worker's wait runs out of memory
        def __init__(self, gate):
            self.gate = gate

        def wait(self):
            raise MemoryError

        def abort(self):
            self.gate.abort()

    def run(self):
        seen.append(self)
        if len(seen) == 3:
            self.gate = Gate(self.gate)
        real(self)

    monkeypatch.setattr(load.Worker, "run", run)
    message, elapsed = refused_start(monkeypatch, capfd)
    assert message == "cannot start 5 threads (not all of them could run): lower -c"
    assert elapsed < 0.5  # the gate broke: nothing waited for START_TIMEOUT_S
