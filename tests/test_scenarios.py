"""End to end: ./run_all.sh runs lab.py's scenarios for real, and each has the model's shape.

Short delays keep it quick; the shape does not depend on them. Tolerances are honest for a
noisy two-core machine: a serial scenario takes about n delays, an overlapping one about one,
and the two differ by a factor of ten, far beyond any noise.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))

from labkit import plan

DELAY = 0.3
N = 10

# setup, route -> the model's total for n = c = 10 (lab.py's SETUPS say why)
SHAPES = {(setup, route): plan.model_seconds(setup, route, N, N, DELAY, DELAY)
          for setup, route, _ in plan.SCENARIOS}


def lab_processes(tmp):
    """Processes this run may start: run from this folder (gunicorn masters and workers, the
    servers, load.py), or naming its private TMPDIR (PostgreSQL). Runs of other checkouts on
    the same machine are not ours."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        try:
            ours = tmp in cmdline or (proc.cwd() == str(ROOT) and any(
                name in cmdline for name in ("lab.py", "slow_server.py", "load.py")))
        except psutil.Error:
            continue
        if ours:
            found.add(proc.info["pid"])
    return found


@pytest.fixture(scope="module")
def run_all():
    tmp = tempfile.mkdtemp(prefix="awls-")  # short: PostgreSQL's socket path must stay short
    os.chmod(tmp, 0o1777)  # as /tmp: as root, PostgreSQL runs as another user
    before = lab_processes(tmp)
    started = time.monotonic()
    result = subprocess.run(["./run_all.sh", "--delay", str(DELAY), "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "TMPDIR": tmp})
    took = time.monotonic() - started
    time.sleep(0.5)  # let the last exits be reaped
    left, folders = lab_processes(tmp) - before, set(os.listdir(tmp))
    shutil.rmtree(tmp, ignore_errors=True)
    return result, took, left, folders


def scenarios(result):
    return {(s["mode"], s["route"]): s for s in map(json.loads, result.stdout.splitlines())}


# What each scenario must take, as the article reasons it, written out here rather than asked
# of the model report.py asks: n requests sent all at once, h the slow HTTP call, d pg_sleep.
n, h, d = N, DELAY, DELAY
ARTICLE = {
    ("nothing", "both"): n * (h + d),  # one sync worker: one request at a time, both waits each
    ("almost_all", "both"): h + n * d,  # the HTTP calls overlap; unpatched psycopg2 queues
    ("almost_all", "http"): h,  # patched sockets: all ten calls at once
    ("almost_all", "db"): n * d,  # psycopg2 blocks the event loop: one query after another
    ("all", "db"): d,  # psycogreen's wait callback: the queries overlap
    ("all", "both"): h + d,  # each request waits twice, all requests together
    ("all", "fanout"): h,  # each request's ten calls at once, and the requests too
}


def test_run_all_succeeds_with_every_response_200(run_all):
    result, _, _, _ = run_all
    assert result.returncode == 0, result.stderr[-3000:]
    found = scenarios(result)
    assert list(found) == list(ARTICLE), "the article's six in its order, then the fan-out"
    for scenario in found.values():
        assert scenario["statuses"] == {"200": N}, scenario
        assert scenario["requests"] == N and scenario["concurrency"] == N


@pytest.mark.parametrize("key", list(ARTICLE), ids=["/".join(k) for k in ARTICLE])
def test_each_scenario_has_the_model_shape(run_all, key):
    scenario = scenarios(run_all[0])[key]
    model = ARTICLE[key]
    assert scenario["model_s"] == pytest.approx(model, abs=1e-6), "report.py's model"
    # Never faster than the model (that would mean a wait was skipped), and never so slow that
    # an overlapping scenario could pass for a serial one or a serial one gain a request's worth.
    assert model * 0.97 <= scenario["total_s"] <= model * 1.2 + 0.15, scenario


def test_serial_scenarios_are_ten_times_the_overlapping_ones(run_all):
    found = scenarios(run_all[0])
    serial_db, overlapped_db = found["almost_all", "db"], found["all", "db"]
    assert serial_db["total_s"] / overlapped_db["total_s"] > 6


def test_summaries_and_timelines_go_to_stderr_with_json(run_all):
    result = run_all[0]
    assert result.stderr.count("Summary:") == len(SHAPES)
    assert "Traceback" not in result.stderr


def test_nothing_is_left_behind(run_all):
    _, _, processes_left, folders_left = run_all
    assert not processes_left, [psutil.Process(p).cmdline() for p in processes_left
                                if psutil.pid_exists(p)]
    assert not folders_left


# --- The timelines and the event loop's blocking, from the same run -------------------------------

def end_times(scenario):
    return sorted(end for _, end, _ in scenario["timeline"])


def test_every_scenario_has_one_timeline_row_per_request(run_all):
    for key, scenario in scenarios(run_all[0]).items():
        assert len(scenario["timeline"]) == N, key
        assert all(start < end and status == 200 for start, end, status in scenario["timeline"])


def test_psycopg2_without_the_wait_callback_makes_a_staircase(run_all):
    from itertools import pairwise

    ends = end_times(scenarios(run_all[0])["almost_all", "db"])
    gaps = [later - earlier for earlier, later in pairwise(ends)]
    assert all(gap >= 0.6 * DELAY for gap in gaps), gaps


def test_the_wait_callback_makes_a_block(run_all):
    ends = end_times(scenarios(run_all[0])["all", "db"])
    assert ends[-1] - ends[0] <= 0.5 * DELAY, ends


def test_the_blocked_event_loop_names_psycopg2(run_all):
    found = scenarios(run_all[0])
    blocked = found["almost_all", "db"]
    # One block per query, each named by its call and view.
    assert blocked["blocks"] == N, blocked
    assert blocked["top_culprit"] == f"psycopg2 execute from only_database_call ({N}x)"
    assert blocked["blocked_s"] >= N * DELAY * 0.9


def test_the_wait_callback_never_blocks_the_event_loop(run_all):
    found = scenarios(run_all[0])
    for key in (("all", "db"), ("all", "both")):
        assert (found[key]["blocks"], found[key]["top_culprit"]) == (0, None), key


def test_the_sync_worker_has_no_event_loop_to_block(run_all):
    sync = scenarios(run_all[0])["nothing", "both"]
    assert (sync["blocks"], sync["blocked_s"], sync["top_culprit"]) == (None, None, None)


def test_each_scenario_says_what_blocked_its_event_loop(run_all):
    lines = [line for line in run_all[0].stderr.splitlines() if line.startswith("Event loop:")]
    assert len(lines) == len(SHAPES)
    assert lines[0].startswith("Event loop: (sync worker: no event loop)")
    assert lines[3].startswith("Event loop: blocked ") and "psycopg2 execute" in lines[3]
    assert lines[4].startswith("Event loop: never blocked over 0.1 s")
