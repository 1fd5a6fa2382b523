"""Faults, on real processes: counted errors for faults while serving, nothing left behind
after a signal, and safe defaults. (Bad flags and environments, one line each: in
tests/test_cli_errors_tools.py.)

"Nothing left behind" is checked with the sandbox of tests/conftest.py, which follows every
process a test starts: after the signal, every recorded process must be gone and the private
TMPDIR empty.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import (
    PY,
    ROOT,
    assert_one_error,
    free_port,
    get,
    postgres_started,
    run,
    send,
    wait_for_initdb,
    wait_until,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lab
from labkit import checks, postgres

INTERRUPTED = re.compile(r"^run_all\.sh: interrupted during (.+); stopping everything it started$",
                         re.MULTILINE)


# --- helpers ---------------------------------------------------------------------------------

def timed_get(url, timeout=30):
    started = time.monotonic()
    status, body = get(url, timeout=timeout)
    return status, body, time.monotonic() - started


def run_load(url, *args, timeout=120):
    """load.py --json: (exit code, figures)."""
    result = run(["load.py", "--json", "-t", "30", *args, url], timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def pgserver_postgres():
    """PostgreSQL processes owned by the embedded server's system user (as root)."""
    found = set()
    for proc in psutil.process_iter(["pid", "name", "username"]):
        if proc.info["name"] == "postgres" and proc.info["username"] == postgres.PG_SYSTEM_USER:
            found.add(proc.info["pid"])
    return found


def listening_addresses(pid):
    return {c.laddr for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


# --- 1. faults while serving: counted, not crashed ---------------------------------------------

@pytest.mark.parametrize("mode", ["nothing", "all"])
def test_slow_service_never_started_is_a_502_at_once(mode, start_lab):
    lab_ = start_lab(mode, f"http://127.0.0.1:{free_port()}", delay=0.05)
    for route in ("/only-http-call/", "/both-http-and-database-calls/",
                  "/only-http-do-ten_calls_with_gevent/"):
        status, body, took = timed_get(lab_.url + route)
        assert status == 502, (route, body)
        assert set(body) == {"error"} and "slow service unreachable at http://" in body["error"]
        assert "is slow_server.py running?" in body["error"], body
        assert len(body["error"]) < 200 and took < 2, (body, took)
    assert get(lab_.url + "/healthcheck/liveness") == (200, {"status": "alive"})
    assert get(lab_.url + "/only-database-call/")[0] == 200  # the database side still works

    code, figures = run_load(lab_.url + "/only-http-call/", "-n", "10", "-c", "10")
    assert code == 0  # responses arrived, whatever their status
    assert figures["status_codes"] == {"502": 10} and figures["errors"] == {}

    # ... and once the lab itself is gone, load.py counts errors and exits 1.
    lab_.stop()
    code, figures = run_load(lab_.url + "/only-http-call/", "-n", "4", "-c", "2")
    assert code == 1 and figures["status_codes"] == {}
    [(message, count)] = figures["errors"].items()
    assert count == 4 and "connection refused" in message


def test_slow_service_stopped_mid_run_is_counted(start_slow_server, start_lab):
    slow = start_slow_server(delay=0.2)
    lab_ = start_lab("all", slow.url)
    load = subprocess.Popen([PY, "load.py", "--json", "-t", "30", "-n", "60", "-c", "4",
                             lab_.url + "/only-http-call/"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert slow.stop() == 0
    out, err = load.communicate(timeout=60)
    assert load.returncode == 0 and "Traceback" not in err, err
    figures = json.loads(out)
    codes = figures["status_codes"]
    assert set(codes) <= {"200", "502"} and figures["errors"] == {}, figures["errors"]
    assert codes.get("200", 0) >= 4 and codes.get("502", 0) >= 30, codes
    assert sum(codes.values()) == 60
    status, body = get(lab_.url + "/only-http-call/")
    assert status == 502 and "slow service" in body["error"]


@pytest.mark.parametrize("mode", ["nothing", "almost_all", "all"])
def test_hanging_slow_service_is_a_504_after_the_http_timeout(mode, start_slow_server,
                                                              start_lab):
    slow = start_slow_server(delay=2)
    lab_ = start_lab(mode, slow.url, delay=0.05, extra=("--http-timeout", "0.5"))
    for route in ("/only-http-call/", "/only-http-do-ten_calls_with_gevent/"):
        status, body, took = timed_get(lab_.url + route)
        assert status == 504, (route, body)
        assert body == {"error": f"slow service at {slow.url} did not answer within 0.5 s"}, body
        assert 0.45 <= took < 1.5, (route, took)
    if mode != "nothing":
        code, figures = run_load(lab_.url + "/only-http-call/", "-n", "10", "-c", "10")
        assert code == 0 and figures["status_codes"] == {"504": 10}, figures
        assert figures["total_s"] < 1.5, figures["total_s"]  # ten 504s side by side


def raw(*lines, body=b""):
    """A request as bytes: its lines (request line, then headers), a blank line, the body."""
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


HOST = b"Host: localhost"
# Requests Gunicorn refuses itself, and what it answers. "unparsed": no request object could
# be made of it (lab.py logs those with "request": "-" and the error).
MALFORMED = [
    # (name, bytes, status, unparsed)
    ("two Host headers", raw(b"GET /healthcheck/liveness HTTP/1.1", HOST, b"Host: evil"),
     400, False),
    ("negative Content-Length", raw(b"POST /only-database-call/ HTTP/1.1", HOST,
                                    b"Content-Length: -1"), 400, False),
    ("Content-Length and Transfer-Encoding",
     raw(b"POST /only-database-call/ HTTP/1.1", HOST, b"Content-Length: 5",
         b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400, False),
    ("two Content-Lengths", raw(b"POST / HTTP/1.1", HOST, b"Content-Length: 1",
                                b"Content-Length: 2", body=b"xx"), 400, False),
    ("Content-Length not a number", raw(b"POST / HTTP/1.1", HOST, b"Content-Length: abc"),
     400, False),
    ("unknown Transfer-Encoding", raw(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: gzip"),
     400, False),
    ("no request line", raw(b"GARBAGE"), 400, True),
    ("bad method", raw(b"G@T / HTTP/1.1", HOST), 400, True),
    ("unknown HTTP version", raw(b"GET / HTTP/9.9", HOST), 400, True),
    ("no HTTP version", raw(b"GET /"), 400, True),
    ("NUL in the path", raw(b"GET /\x00 HTTP/1.1", HOST), 400, True),
    ("raw UTF-8 in the path", raw("GET /é HTTP/1.1".encode(), HOST), 400, True),
    ("bare LF", raw(b"GET / HTTP/1.1", HOST).replace(b"\r\n", b"\n"), 400, True),
    ("HTTP/2 preface", raw(b"PRI * HTTP/2.0", body=b"SM\r\n\r\n"), 400, True),
    ("PROXY line unasked", raw(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b"GET / HTTP/1.1"), 400, True),
    ("space in a header name", raw(b"GET / HTTP/1.1", HOST, b"Bad Name: x"), 400, True),
    ("space before the colon", raw(b"GET / HTTP/1.1", b"Host : localhost"), 400, True),
    ("folded header", raw(b"GET / HTTP/1.1", HOST, b"X: a", b" b"), 400, True),
    ("contradictory scheme headers", raw(b"GET / HTTP/1.1", HOST, b"X-Forwarded-Proto: https",
                                         b"X-Forwarded-Ssl: off"), 400, True),
    ("a 20 KB header", raw(b"GET / HTTP/1.1", HOST, b"X-Big: " + b"a" * 20000), 431, True),
    ("200 headers", raw(b"GET / HTTP/1.1", HOST, *(b"X-%d: a" % i for i in range(200))),
     431, True),
    ("a 10 KB request line", raw(b"GET /" + b"a" * 10000 + b" HTTP/1.1", HOST), 414, True),
    ("odd Expect", raw(b"POST / HTTP/1.1", HOST, b"Expect: 100-banana", b"Content-Length: 1",
                       body=b"x"), 417, True),
    # Parsed by Gunicorn, refused by Django (ALLOWED_HOSTS): the app's 400.
    ("Host not a host name", raw(b"GET /healthcheck/liveness HTTP/1.1", b"Host: [::1"),
     400, False),
]


def send_raw(url, data):
    """One request as raw bytes on a new connection: the status line's code, or None."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(data)
        answer = b""
        while b"\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def worker_pids(lab_):
    return sorted(p.pid for p in psutil.Process(lab_.popen.pid).children())


@pytest.mark.parametrize("mode", ["nothing", "almost_all", "all"])
def test_malformed_requests_cost_no_worker_and_are_logged(mode, start_slow_server, start_lab):
    """A few hundred malformed requests, some at once: Gunicorn answers each itself, the same
    workers serve on, every answer has its JSON access line, and no traceback is logged."""
    lab_ = start_lab(mode, start_slow_server(delay=0.05).url, delay=0.05,
                     extra=("--workers", "2"))
    before = worker_pids(lab_)
    assert len(before) == 2
    rounds = 12
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: (case[0], case[2], send_raw(lab_.url, case[1])),
                                MALFORMED * rounds))
    wrong = {(name, want, got) for name, want, got in answers if got != want}
    assert not wrong, wrong
    assert worker_pids(lab_) == before
    db_route = lab_.url + "/only-database-call/"
    assert [get(db_route)[0] for _ in range(4)] == [200] * 4
    assert get(lab_.url + "/healthcheck/liveness") == (200, {"status": "alive"})
    assert worker_pids(lab_) == before

    time.sleep(0.3)  # the last access lines
    log = lab_.output
    assert "Traceback" not in log, log[-3000:]
    assert "exited with code" not in log and "Booting worker" in log
    access = [json.loads(line) for line in log.splitlines() if line.startswith('{"request"')]
    statuses = [entry["status"] for entry in access]
    for status in {want for _, _, want, _ in MALFORMED}:
        sent = sum(want == status for _, _, want, _ in MALFORMED) * rounds
        assert statuses.count(status) >= sent, (status, statuses.count(status), sent)
    unparsed = [entry for entry in access if entry["request"] == "-"]
    assert len(unparsed) == sum(case[3] for case in MALFORMED) * rounds
    assert all(entry["error"] and entry["status"] >= 400 for entry in unparsed), unparsed[:3]
    assert 500 not in statuses


@pytest.fixture(scope="module")
def own_database():
    """A PostgreSQL of this module's own, to stop and restart (postgres.EmbeddedPostgres)."""
    db = postgres.EmbeddedPostgres()
    db.start()
    yield db
    db.stop()


@pytest.fixture
def restartable(own_database):
    yield own_database
    if own_database.process.poll() is not None:
        own_database.launch()


@pytest.mark.parametrize("mode, extra", [("almost_all", ()), ("all", ()),
                                         ("all", ("--db-pool", "0")), ("nothing", ())],
                         ids=["almost_all", "all", "all-pool0", "nothing"])
def test_database_restart_is_a_503_then_recovers_at_once(mode, extra, restartable,
                                                         start_slow_server, start_lab):
    db = restartable
    slow = start_slow_server(delay=0.05)
    lab_ = start_lab(mode, slow.url, delay=0.05, extra=extra, database=db.url)
    db_route = lab_.url + "/only-database-call/"
    assert [get(db_route)[0] for _ in range(3)] == [200] * 3  # the pool now holds connections

    # A query in flight when PostgreSQL shuts down is a 503 too, not a 500 or a dropped line.
    in_flight = {}
    sleeper = threading.Thread(target=lambda: in_flight.update(
        r=timed_get(db_route + "?seconds_to_sleep=5")))
    sleeper.start()
    time.sleep(0.7)
    db.halt()
    sleeper.join(30)
    status, body, took = in_flight["r"]
    assert status == 503 and body["error"].startswith("database unavailable"), body
    assert took < 3, took

    for route in ("/only-database-call/", "/both-http-and-database-calls/"):
        status, body, took = timed_get(lab_.url + route)
        assert status == 503, (route, body)
        assert set(body) == {"error"} and body["error"].startswith("database unavailable"), body
        assert len(body["error"]) < 300 and took < 2, (body, took)
    assert get(lab_.url + "/healthcheck/liveness") == (200, {"status": "alive"})
    assert get(lab_.url + "/only-http-call/")[0] == 200  # no database needed there
    if mode != "nothing":
        code, figures = run_load(db_route, "-n", "10", "-c", "10")
        assert code == 0 and figures["status_codes"] == {"503": 10}, figures

    db.launch()
    first = get(db_route)
    assert first == (200, {"slept_in_database_s": 0.05}), f"first request after restart: {first}"
    assert [get(db_route)[0] for _ in range(5)] == [200] * 5

    # Restarted with no request in between: the pooled connections are all dead, and the
    # ping before reuse must notice it, not the view.
    db.halt()
    db.launch()
    assert [get(db_route)[0] for _ in range(5)] == [200] * 5
    if mode != "nothing":
        code, figures = run_load(db_route, "-n", "10", "-c", "10")
        assert code == 0 and figures["status_codes"] == {"200": 10}, figures


def wait_for_new_workers(lab_, old, count, timeout=60):
    def replaced():
        pids = worker_pids(lab_)
        return len(pids) == count and not set(pids) & set(old)
    wait_until(replaced, timeout, f"{count} new workers")
    return worker_pids(lab_)


@pytest.mark.parametrize("mode", ["nothing", "all"])
def test_worker_restarted_while_the_database_is_down_boots_and_recovers(
        mode, restartable, start_slow_server, start_lab):
    """Workers (re)started with PostgreSQL down boot anyway, answer 503 on the database routes
    and 200 elsewhere, and serve queries again once it is back."""
    db = restartable
    lab_ = start_lab(mode, start_slow_server(delay=0.05).url, delay=0.05, database=db.url,
                     extra=("--workers", "2"))
    db_route = lab_.url + "/only-database-call/"
    assert get(db_route)[0] == 200
    db.halt()
    old = worker_pids(lab_)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    new = wait_for_new_workers(lab_, old, 2)
    wait_until(lambda: lab_.output.count("database unavailable as this worker boots") == 2, 30,
               "both workers to boot")
    for _ in range(4):
        status, body = get(db_route)
        assert status == 503 and body["error"].startswith("database unavailable"), body
    assert get(lab_.url + "/healthcheck/liveness") == (200, {"status": "alive"})
    assert get(lab_.url + "/only-http-call/")[0] == 200
    db.launch()
    assert [get(db_route)[0] for _ in range(6)] == [200] * 6
    assert worker_pids(lab_) == new  # the same workers: nothing died of the outage
    assert "Traceback" not in lab_.output


def test_pools_fit_in_the_connections_postgresql_allows():
    limits = {"max_connections": 200, "superuser_reserved_connections": 3}
    assert checks.fit_db_pool(10, 19, limits) == 10  # 190 fit in 197
    assert checks.fit_db_pool(10, 25, limits) == 7  # 250 do not: 7 x 25 = 175
    assert checks.fit_db_pool(10, 25, {**limits, "reserved_connections": 30}) == 6  # 167 / 25
    assert checks.fit_db_pool(10, 300, limits) == 0  # more workers than connections: none kept
    assert checks.fit_db_pool(0, 300, limits) == 0
    assert checks.fit_db_pool(10, 25, {}) == 10  # unknown limits: as asked


def test_25_workers_boot_against_the_embedded_server(sandbox, warm_cache):
    """25 workers x --db-pool 10 is 250 idle connections; the embedded server allows 200, less
    3 for superusers. Each worker keeps 7, says one line, and every request is served."""
    sandbox.env["AWL_CACHE_DIR"] = str(warm_cache)
    port = free_port()
    proc = sandbox.popen([PY, "lab.py", "--workers", "25", "--bind", f"127.0.0.1:{port}",
                          "--slow-url", f"http://127.0.0.1:{free_port()}", "--delay", "0"],
                         new_session=True)
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc, timeout=120)
        wait_until(lambda: "".join(proc.err).count("Booting worker") == 25, 60, "25 workers")
        time.sleep(1)  # the last workers open their pools
        statuses = [get(proc.url + "/only-database-call/")[0] for _ in range(40)]
        assert statuses == [200] * 40, statuses
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    err = "".join(proc.err)
    assert ("lab.py: --db-pool 10 x 25 workers exceeds the 197 connections PostgreSQL allows "
            "(max_connections 200, 3 reserved); keeping 7 idle connections per worker") in err
    assert "too many clients" not in err and "Traceback" not in err, err[-3000:]
    assert "database unavailable" not in err


# --- 2. nothing left behind ------------------------------------------------------------------

def wait_for_text(proc, text, timeout):
    wait_until(lambda: text in "".join(proc.out), timeout, f"{text!r} on stdout")


RUN_ALL_POINTS = {
    # name: (how to wait for the moment, signal, whole group?, expected phase[, run_all flags])
    "0.3s-term": (lambda p, b: time.sleep(0.3), signal.SIGTERM, False, r"set-up"),
    "pg-initdb-ctrl-c": (lambda p, b: wait_for_initdb(b, 60), signal.SIGINT, True,
                         r"set-up \(starting the slow service and PostgreSQL\)"),
    "3s-ctrl-c": (lambda p, b: time.sleep(3), signal.SIGINT, True, r"(set-up|scenario)"),
    "scenario-ctrl-c": (lambda p, b: (wait_for_text(p, "=== nothing / both", 60),
                                      time.sleep(1.5)),
                        signal.SIGINT, True, r"scenario nothing / both"),
    "scenario-term": (lambda p, b: (wait_for_text(p, "=== nothing / both", 60),
                                    time.sleep(1.5)),
                      signal.SIGTERM, False, r"scenario nothing / both"),
    # After the first scenario: fewer requests reach it sooner (the sync one takes n rounds).
    "between-ctrl-c": (lambda p, b: wait_for_text(p, "Summary:", 60), signal.SIGINT, True,
                       r"scenario (nothing|almost_all) / both", ["-n", "2", "-c", "2"]),
    "mid-run-term": (lambda p, b: (wait_for_text(p, "=== almost_all / both", 120),
                                   time.sleep(1)),
                     signal.SIGTERM, False, r"scenario almost_all / both", ["-n", "4", "-c", "4"]),
}


# As root, a killed initdb's server runs as awl-postgres: the pg-initdb case also checks, in
# CI's root pass, that those processes end (pgserver_postgres finds none as a user).
@pytest.mark.parametrize("point", [
    pytest.param(point, marks=pytest.mark.root(also_as_user=True))
    if point == "pg-initdb-ctrl-c" else point for point in RUN_ALL_POINTS])
def test_run_all_interrupted_leaves_nothing_behind(point, sandbox, warm_cache):
    wait, sig, group, phase, *flags = RUN_ALL_POINTS[point]
    if point != "pg-initdb-ctrl-c":  # the others must reach their phase in time
        sandbox.env["AWL_CACHE_DIR"] = str(warm_cache)
    postgres_before = pgserver_postgres()
    proc = sandbox.popen(["./run_all.sh", "--delay", "0.3", *(flags[0] if flags else [])],
                         new_session=True)
    try:
        wait(proc, sandbox)
        assert proc.poll() is None, "".join(proc.err)
        send(proc, sig, group)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)  # let the readers drain
    out, err = "".join(proc.out), "".join(proc.err)
    left = sandbox.wait_all_gone()
    assert not left, f"left running after {point}:\n" + "\n".join(left)
    assert sandbox.files() == [], f"left in TMPDIR after {point}: {sandbox.files()}"
    assert sandbox.half_built() == [], f"half-built in the cache after {point}"
    # A killed initdb's bootstrap postgres is reaped by init a moment later: allow for that.
    wait_until(lambda: not ((pgserver_postgres() - postgres_before) & set(sandbox.seen)), 10,
               f"the PostgreSQL processes of {point} to end")
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), (proc.returncode, err)
    lines = INTERRUPTED.findall(err)
    print(f"{point}: exit {proc.returncode}, {lines}")  # shown with -rA: what was hit
    assert len(lines) == 1, err
    assert re.fullmatch(phase + r".*", lines[0]), lines[0]
    assert "Traceback" not in out + err, err


def start_lab_alone(box, *extra, new_session=True):
    port = free_port()
    proc = box.popen([PY, "lab.py", "--patch", "all", "--bind", f"127.0.0.1:{port}",
                      "--slow-url", f"http://127.0.0.1:{free_port()}", "--delay", "0.05",
                      *extra], new_session=new_session)
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def wait_serving(proc, timeout=60):
    def answering():
        assert proc.poll() is None, "".join(proc.err)
        try:
            return get(proc.url + "/only-database-call/", timeout=2)[0] == 200
        except OSError:
            return False
    wait_until(answering, timeout, f"{proc.url} to serve")


LAB_POINTS = {
    "serving-term": ("serving", signal.SIGTERM, False),
    "serving-ctrl-c": ("serving", signal.SIGINT, True),
    "initdb-term": ("initdb", signal.SIGTERM, False),
    "initdb-ctrl-c": ("initdb", signal.SIGINT, True),
    "postgres-starting-term": ("postgres", signal.SIGTERM, False),
}


@pytest.mark.parametrize("point", list(LAB_POINTS))
def test_lab_alone_interrupted_leaves_nothing_behind(point, sandbox, warm_cache):
    moment, sig, group = LAB_POINTS[point]
    if moment == "serving":  # interrupted long after the cache was built: no initdb first
        sandbox.env["AWL_CACHE_DIR"] = str(warm_cache)
    proc = start_lab_alone(sandbox)
    try:
        if moment == "serving":
            wait_serving(proc)
        elif moment == "initdb":
            wait_for_initdb(sandbox, 60)
        else:  # the postgres server process exists, but lab.py is not serving yet
            wait_until(lambda: postgres_started(sandbox), 30, "postgres to start")
        assert proc.poll() is None, "".join(proc.err)
        send(proc, sig, group)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    err = "".join(proc.err) + "".join(proc.out)
    left = sandbox.wait_all_gone()
    assert not left, f"left running after {point}:\n" + "\n".join(left)
    assert sandbox.files() == [], f"left in TMPDIR after {point}: {sandbox.files()}"
    assert sandbox.half_built() == [], f"half-built in the cache after {point}"
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 130, 143), (proc.returncode, err)


@pytest.mark.root
def test_embedded_postgres_that_cannot_start_is_one_line(sandbox):
    """As root, a TMPDIR the server user cannot enter is one line (checked before initdb)."""
    sandbox.tmp.chmod(0o700)
    proc = start_lab_alone(sandbox, new_session=False)
    proc.wait(60)
    time.sleep(0.2)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(proc.out),
                                         "".join(proc.err))
    assert_one_error(result, "lab.py", "PostgreSQL")
    assert sandbox.files() == [], sandbox.files()


def test_lab_killed_takes_postgres_and_workers_with_it(sandbox, warm_cache):
    sandbox.env["AWL_CACHE_DIR"] = str(warm_cache)
    proc = start_lab_alone(sandbox, "--workers", "2")
    wait_serving(proc)
    time.sleep(0.5)  # let the watcher see both workers and PostgreSQL's backends
    kinds = [d for _, d in list(sandbox.seen.values())]
    assert sum("postgres" in d for d in kinds) >= 2, kinds
    proc.kill()
    proc.wait(10)
    left = sandbox.wait_all_gone(timeout=20)
    assert not left, "left running after SIGKILL of lab.py:\n" + "\n".join(left)
    # The awl-pg-* folder stays behind after SIGKILL, until the next lab.py starts (see
    # tests/test_embedded_postgres.py); here the sandbox removes it.


# --- 3. safe defaults -------------------------------------------------------------------------

def test_lab_binds_to_loopback_by_default_and_warns_otherwise(database_url, sandbox):
    default_port = int(lab.DEFAULT_BIND.rsplit(":", 1)[1])
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", default_port))
            default_free = True
        except OSError:
            default_free = False
    if default_free:
        proc = sandbox.popen([PY, "lab.py", "--database-url", database_url, "--delay", "0"])
        proc.url = f"http://127.0.0.1:{default_port}"
        try:
            wait_serving(proc)
            assert listening_addresses(proc.pid) == {("127.0.0.1", default_port)}
            assert "warning" not in "".join(proc.err)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    else:  # someone else holds port 8000: check the default the parser gives instead
        assert lab.parse_args([]).bind == "127.0.0.1:8000"

    port = free_port()
    proc = sandbox.popen([PY, "lab.py", "--database-url", database_url, "--delay", "0",
                          "--bind", f"0.0.0.0:{port}"])
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc)
        assert listening_addresses(proc.pid) == {("0.0.0.0", port)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    warnings = [line for line in "".join(proc.err).splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("lab.py: warning: binding to 0.0.0.0"), \
        warnings


def test_slow_server_listens_on_loopback_by_default(sandbox):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8001)) == 0:
            pytest.skip("port 8001, slow_server.py's default, is taken on this machine")
    proc = sandbox.popen([PY, "slow_server.py", "--delay", "0"])
    try:
        wait_until(lambda: "serving on" in "".join(proc.err), 15, "slow_server to start")
        [(host, port)] = listening_addresses(proc.pid)
        assert (host, port) == ("127.0.0.1", 8001)
        assert "warning" not in "".join(proc.err)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_error_pages_are_not_django_debug_pages(start_slow_server, start_lab):
    lab_ = start_lab("all", start_slow_server(delay=0.05).url, delay=0.05)
    debug_words = ("Traceback", "DEBUG = True", "URLconf", "Django tried", "settings.py")
    status, body = get(lab_.url + "/nope")
    assert status == 404
    assert not any(word in str(body) for word in debug_words), body


def test_unknown_host_header_is_refused_on_loopback(start_slow_server, start_lab):
    """lab.py sets ALLOWED_HOSTS to loopback names when bound to loopback (DNS rebinding)."""
    lab_ = start_lab("all", start_slow_server(delay=0.05).url, delay=0.05)
    debug_words = ("Traceback", "DEBUG = True", "settings.py", "ALLOWED_HOSTS")
    request = urllib.request.Request(lab_.url + "/only-database-call/",
                                     headers={"Host": "evil.example"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    assert status == 400, text
    assert not any(word in text for word in debug_words), text


def test_no_hard_coded_secret_key():
    source = (ROOT / "lab.py").read_text()
    assert not re.search(r"""SECRET_KEY["']?\s*[=:]\s*[rbuf]*["']""", source)
    assert not re.search(r"""get\(\s*["']SECRET_KEY["']\s*,\s*["']""", source)  # no fallback


SECRET = "s3cret-pass"
PS_WARNING = ("lab.py: warning: --database-url puts the password on the command line, where ps "
              "shows it to every user; pass it as DATABASE_URL in the environment instead")


def url_with_password(url):
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        pytest.skip("DATABASE_URL already has a password")
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user or 'postgres'}:{SECRET}@{host}").geturl()


def command_lines_with(text):
    """Every process's command line that contains `text`, read from /proc now."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if text.encode() in data:
            found.append(data.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_no_password_on_any_command_line_during_a_run(sandbox, database_url):
    """run_all.sh hands DATABASE_URL to the labs, and lab.py to its probe, in the environment.
    The embedded server trusts every local connection: the password is accepted and unused."""
    sandbox.env["DATABASE_URL"] = url_with_password(database_url)
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.extend(command_lines_with(SECRET))
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # Every command the run starts, to the report; two requests a scenario are enough for that.
    proc = sandbox.popen(["./run_all.sh", "--delay", "0.05", "-n", "2", "-c", "2"])
    try:
        proc.wait(300)
    finally:
        done.set()
        watcher.join(10)
    time.sleep(0.2)
    out, err = "".join(proc.out), "".join(proc.err)
    assert proc.returncode == 0, err[-3000:]
    assert "=== Results" in out
    assert not seen, sorted(set(seen))
    assert SECRET not in out + err


def test_database_url_flag_works_and_warns_about_ps(sandbox, database_url):
    url = url_with_password(database_url)
    port = free_port()
    args = [PY, "lab.py", "--bind", f"127.0.0.1:{port}", "--delay", "0",
            "--slow-url", f"http://127.0.0.1:{free_port()}"]
    proc = sandbox.popen([*args, "--database-url", url])
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc)
        assert any(SECRET in line for line in command_lines_with(SECRET))  # what ps shows
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    warnings = [line for line in "".join(proc.err).splitlines() if "warning" in line]
    assert warnings == [PS_WARNING], warnings
    assert SECRET not in "".join(proc.err + proc.out)

    sandbox.env["DATABASE_URL"] = url  # the same URL from the environment: no warning
    proc = sandbox.popen(args)
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc)
        assert not command_lines_with(SECRET)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "warning" not in "".join(proc.err), "".join(proc.err)
