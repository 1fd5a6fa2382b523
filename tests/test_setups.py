"""Every way out, on real processes: each setup beyond the article has the model's shape, the two
traps are serial and named by the monitor, and CPU work overlaps only across processes.

Short delays keep it quick; the shapes do not depend on them. Each total is checked against
lab.py's own model (plan.model_seconds) with the same honest bounds as the article's scenarios:
never faster than the model, and never slow enough to pass for the other shape.
"""

import json
import os
import sys
import threading
import time

import pytest
from conftest import ROOT, get, load, module_lab

sys.path.insert(0, str(ROOT))

import lab
import report
from labkit import plan

DELAY = 0.3
N = 10


@pytest.fixture(scope="module")
def slow_url(tmp_path_factory):
    from conftest import Process, free_port

    port = free_port()
    server = Process(["slow_server.py", "--bind", f"127.0.0.1:{port}", "--delay", str(DELAY)],
                     tmp_path_factory.mktemp("slow") / "slow.log")
    server.wait_until_answering(f"http://127.0.0.1:{port}/healthz")
    yield f"http://127.0.0.1:{port}"
    server.stop()


def events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_model_shape(setup, route, total, settings=None, p=lab.CPU_SECONDS):
    model = plan.model_seconds(setup, route, N, N, DELAY, DELAY, p=p, settings=settings)
    assert model * 0.97 <= total <= model * 1.25 + 0.15, (setup, route, total, model)


@pytest.mark.parametrize("setup, routes", [
    ("threads", ["http", "db", "both", "fanout"]),
    ("processes", ["http", "db", "both"]),
    ("psycopg3", ["db", "both"]),
    ("asgi", ["http", "db", "both", "fanout"]),
])
def test_each_way_out_overlaps_every_wait(setup, routes, slow_url, start_lab):
    lab_ = start_lab(setup, slow_url, delay=DELAY)
    for route in routes:
        figures = load(lab_.url + lab.ROUTES[route].path)
        assert figures["status_codes"] == {"200": N}, (route, figures["status_codes"])
        assert_model_shape(setup, route, figures["total_s"])
        assert figures["total_s"] < 2.5 * plan.model_seconds(setup, route, 1, 1, DELAY, DELAY)


def test_four_threads_take_three_rounds(slow_url, start_lab):
    lab_ = start_lab("threads", slow_url, delay=DELAY, extra=["--threads", "4"])
    total = load(lab_.url + lab.ROUTES["db"].path)["total_s"]
    assert_model_shape("threads", "db", total, settings={"threads": 4})
    assert total >= 3 * DELAY * 0.97  # ceil(10 / 4) rounds


def test_psycopg3_imported_before_patching_is_serial_and_named(slow_url, start_lab, tmp_path):
    trace = tmp_path / "early.events"
    lab_ = start_lab("psycopg3_early", slow_url, delay=DELAY, extra=["--events", str(trace)])
    total = load(lab_.url + lab.ROUTES["db"].path)["total_s"]
    assert_model_shape("psycopg3_early", "db", total)
    assert total >= N * DELAY * 0.97
    time.sleep(0.3)
    blocks = events(trace)
    assert len(blocks) == N and {(b["call"], b["view"]) for b in blocks} == {
        ("psycopg wait", "only_database_call")}, blocks


def test_a_blocking_call_in_an_async_view_serialises_and_is_named(slow_url, start_lab, tmp_path):
    trace = tmp_path / "asgi_blocking.events"
    lab_ = start_lab("asgi_blocking", slow_url, delay=DELAY, extra=["--events", str(trace)])
    total = load(lab_.url + lab.ROUTES["http"].path)["total_s"]
    assert_model_shape("asgi_blocking", "http", total)
    assert total >= N * DELAY * 0.97
    time.sleep(0.3)
    blocks = events(trace)
    # Back-to-back blocks of an asyncio loop may merge (no heartbeat runs between them), so
    # count the blocked time, not the blocks.
    assert sum(b["seconds"] for b in blocks) >= (N - 1) * DELAY
    assert {b["view"] for b in blocks} == {"only_http_call_async"}, blocks
    assert all(b["call"].startswith("socket ") for b in blocks), blocks


@pytest.mark.parametrize("setup", ["nothing", "all", "threads", "asgi"])
def test_cpu_work_takes_turns_in_one_process(setup, slow_url, start_lab):
    """One process runs Python on one core at a time (the GIL, or one event loop): ten
    requests of 0.1 s of CPU cannot end before 1 s, however many cores are free. (No upper
    bound: the wall time of CPU work depends on what else the cores run; the bench has it.)"""
    lab_ = start_lab(setup, slow_url, delay=DELAY)
    figures = load(lab_.url + "/cpu/?ms=100")
    assert figures["status_codes"] == {"200": N}
    assert figures["total_s"] >= plan.model_seconds(setup, "cpu", N, N, DELAY, DELAY, p=0.1) * 0.97
    assert figures["total_s"] >= N * 0.1 * 0.97


def test_processes_spread_cpu_work_over_the_cores(slow_url, start_lab):
    """Ten processes run CPU work on every core: sent at once, ten requests end well before
    the same ten sent one after another (both measured now, under whatever else runs)."""
    cores = os.cpu_count()
    lab_ = start_lab("processes", slow_url, delay=DELAY)
    total = load(lab_.url + "/cpu/?ms=100")["total_s"]
    assert total >= plan.model_seconds("processes", "cpu", N, N, DELAY, DELAY, p=0.1) * 0.97
    if cores > 1:
        one_by_one = load(lab_.url + "/cpu/?ms=100", N, 1)["total_s"]
        assert total < 0.75 * one_by_one, ("no overlap across processes", total, one_by_one)
    workers = report.worker_memory(lab_.popen.pid)
    assert workers["workers"] == 10 and workers["rss_bytes"] > 10 * 20 * 2**20, workers


def test_cpu_work_under_gevent_delays_other_requests_and_is_named(slow_url, start_lab, tmp_path):
    """HTTP requests in flight wait while a CPU-bound request holds the hub."""
    trace = tmp_path / "all.events"
    lab_ = start_lab("all", slow_url, delay=DELAY, extra=["--events", str(trace)])
    alone = load(lab_.url + lab.ROUTES["http"].path, 5, 5)["total_s"]
    burner = threading.Thread(target=get, args=(lab_.url + "/cpu/?ms=1000",))
    burner.start()
    time.sleep(0.1)
    beside = load(lab_.url + lab.ROUTES["http"].path, 5, 5)["total_s"]
    burner.join()
    assert beside > alone + 0.4, (alone, beside)
    time.sleep(0.3)
    cpu_blocks = [b for b in events(trace) if b["view"] == "cpu_bound"]
    assert cpu_blocks and cpu_blocks[0]["call"].startswith("CPU work in"), json.dumps(events(trace))
    assert cpu_blocks[0]["seconds"] >= 0.8


@pytest.fixture(scope="module")
def threads_lab(tmp_path_factory, database_url, slow_url):
    """One lab for the refused amounts: each is a 400 before any work is done."""
    yield from module_lab(tmp_path_factory, database_url, "threads", slow_url, delay=DELAY)


@pytest.mark.parametrize("raw", ["-1", "abc", "10001", "1e3", "%D9%A3"])  # the last: Arabic 3
def test_cpu_route_refuses_odd_amounts(raw, threads_lab):
    status, body = get(threads_lab.url + f"/cpu/?ms={raw}")
    assert status == 400 and "ms must be" in body["error"], body


def test_every_setup_has_a_model_for_every_route_it_runs():
    for setup, route, _ in plan.scenarios(every=True):
        seconds = plan.model_seconds(setup, route, N, N, 1.0, 1.0)
        assert seconds > 0, (setup, route)
    assert len({s for s, _, _ in plan.scenarios(every=True)}) == len(lab.SETUPS)
