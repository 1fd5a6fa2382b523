"""At scale: PostgreSQL's connection limit, Django's pool, and the connections a lab holds.

Real processes and a real embedded PostgreSQL, small sizes and short delays.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import embedded_database, get, load, run

import report
from labkit import plan


@pytest.fixture(scope="module")
def small_database(tmp_path_factory):
    """An embedded PostgreSQL of its own with max_connections = 20."""
    yield from embedded_database(tmp_path_factory.mktemp("smalldb") / "database.log",
                                 "--max-connections", "20")


def burst(url, count):
    """count GETs at once -> [(status, body)]."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: get(url), range(count)))


def peak_of(connections_file, started_at, ended_at):
    records = report.read_events(connections_file, "connections")
    return report.connection_summary(records, (started_at, ended_at))


def test_past_max_connections_503_counted_and_recovers(start_lab, start_slow_server,
                                                       small_database, tmp_path):
    slow = start_slow_server(0.1)
    connections = tmp_path / "all.connections"
    lab_process = start_lab("all", slow.url, delay=0.5, database=small_database,
                            extra=("--db-pool", "0", "--connections", str(connections)))
    url = lab_process.url + "/only-database-call/"
    answers = burst(url, 30)
    refused = [body for status, body in answers if status == 503]
    assert refused and any(status == 200 for status, _ in answers), answers
    assert all("too many clients already" in body["error"] for body in refused), refused
    figures = load(url, 30, 30)  # load.py counts them as 503s
    assert figures["status_codes"].get("503", 0) > 0, figures["status_codes"]
    assert figures["status_codes"].get("200", 0) > 0, figures["status_codes"]
    assert not figures["errors"]
    # No restart: the next requests are served again, and the lab held what the server allowed.
    assert get(url)[0] == 200
    assert load(url, 5, 5)["status_codes"] == {"200": 5}
    summary = peak_of(connections, figures["started_at"], figures["ended_at"])
    assert 10 <= summary["peak"] <= 19, summary  # 20, minus the sampler's own


def test_pool_no_errors_in_rounds_of_its_size(start_lab, start_slow_server, tmp_path):
    slow = start_slow_server(0.1)
    connections = tmp_path / "pooled.connections"
    lab_process = start_lab("pooled", slow.url, delay=0.3,
                            extra=("--pool-size", "4", "--connections", str(connections)))
    figures = load(lab_process.url + "/only-database-call/", 12, 12)
    assert figures["status_codes"] == {"200": 12} and not figures["errors"], figures
    model = plan.model_seconds("pooled", "db", 12, 12, 0.1, 0.3, settings={"pool_size": 4})
    assert model == pytest.approx(0.9)
    assert model * 0.95 <= figures["total_s"] <= model + 1.0, figures["total_s"]
    time.sleep(0.2)
    summary = peak_of(connections, figures["started_at"], figures["ended_at"])
    assert 2 <= summary["peak"] <= 4, summary


def test_pool_timeout_is_a_quick_503(start_lab, start_slow_server):
    slow = start_slow_server(0.1)
    lab_process = start_lab("pooled", slow.url, delay=0.1,
                            extra=("--pool-size", "1", "--pool-timeout", "0.3"))
    url = lab_process.url + "/only-database-call/?seconds_to_sleep=3"
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(get, url)
        time.sleep(0.3)  # the first holds the pool's only connection
        second = pool.submit(get, url)
        status, body = second.result()
        waited = time.monotonic() - started
        assert first.result()[0] == 200
    assert status == 503, body
    assert body == {"error": "no database connection free within 0.3 s: all 1 of the "
                             "worker's pool are in use"}
    assert waited < 1.5, waited  # the pool's timeout, never the query's 3 s


@pytest.mark.parametrize(("setup", "expected"), [("nothing", 1), ("all", 8)])
def test_peak_connections_figure(start_lab, start_slow_server, tmp_path, setup, expected):
    """The figure report.py puts in the table: sync holds one, gevent one per request."""
    slow = start_slow_server(0.1)
    results = tmp_path / "results"
    results.mkdir()
    lab_process = start_lab(setup, slow.url, delay=0.3,
                            extra=("--db-pool", "0",
                                   "--connections", str(results / f"{setup}.connections")))
    figures_file = results / f"01-{setup}-db.json"
    result = run(["load.py", "-n", "8", "-c", "8", "-t", "60", "--json", "--save",
                  str(figures_file), lab_process.url + "/only-database-call/"], timeout=60)
    assert result.returncode == 0, result.stderr
    time.sleep(0.7)  # "left after the burst" is read 0.5 s after it
    scenario = report.load_scenario(figures_file, 0.3)
    assert scenario["connections"]["peak"] == expected, scenario["connections"]
    assert scenario["connections"]["left"] == 0  # CONN_MAX_AGE 0 and no idle ones kept
    line = json.loads(report.json_line(scenario))
    assert line["peak_connections"] == expected
    assert "peak" not in report.html_table([scenario])  # a column, not a key
    assert f"<td>{expected}</td>" in report.html_table([scenario])


def test_scale_list_has_counts_and_flags():
    result = run(["lab.py", "--list", "--scale"])
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0].split()
    assert first[:2] == ["almost_all", "http"] and first[4:6] == ["1000", "1000"]
    rows = json.loads(run(["lab.py", "--list", "--scale", "--json"]).stdout)
    pooled = next(row for row in rows if row["setup"] == "pooled")
    model = plan.model_seconds("pooled", "db", pooled["requests"], pooled["concurrency"], 1, 1,
                              settings=pooled["settings"])
    assert model == 6  # ceil(300 / 50) rounds of d


def test_workers_share_the_requests_and_multiply_connections(start_lab, start_slow_server,
                                                             tmp_path):
    """--workers 2 under almost_all: each worker runs its queries one at a time, so two
    workers take half as long and hold two connections at once (N x one per worker)."""
    slow = start_slow_server(0.1)
    connections = tmp_path / "almost_all.connections"
    lab_process = start_lab("almost_all", slow.url, delay=0.3,
                            extra=("--workers", "2", "--db-pool", "0",
                                   "--connections", str(connections)))
    figures = load(lab_process.url + "/only-database-call/", 6, 6)
    assert figures["status_codes"] == {"200": 6}, figures
    model = plan.model_seconds("almost_all", "db", 6, 6, 0.1, 0.3, settings={"workers": 2})
    assert model == pytest.approx(0.9)
    assert model * 0.95 <= figures["total_s"] <= model + 0.6, figures["total_s"]
    summary = peak_of(connections, figures["started_at"], figures["ended_at"])
    assert summary["peak"] == 2, summary
