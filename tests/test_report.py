"""Tests for report.py: the blocking lines of the server log, the table and JSON lines, and the
HTML page, drawn by a real headless Chromium from real load.py figures.

The figures come from load.py runs against a small local server started here (sleepy, and for
one scenario also answering 503 or hanging up), saved as NN-MODE-ROUTE.json as run_all.sh saves
them, with hand-written server logs next to them.
"""

import itertools
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT, run

sys.path.insert(0, str(ROOT))

import report

DELAY = 0.05  # the test server's sleep per request

# What lab.py logs (real lines), then the brief's shape: no Gunicorn prefix, no middleware.
PREFIX = "[2026-11-28 04:10:40 +0000] [6637] [WARNING] "
DB_LINE = (PREFIX + "event loop blocked for 0.205 s in psycopg2 execute "
           "(django/db/backends/utils.py:105 _execute) from lab.py:511 sleep_in_database <- "
           "lab.py:549 only_database_call <- lab.py:466 __call__ <- lab.py:450 middleware")
BOTH_LINE = (PREFIX + "event loop blocked for 0.204 s in psycopg2 execute "
             "(django/db/backends/utils.py:105 _execute) from lab.py:511 sleep_in_database <- "
             "lab.py:556 both_http_and_database_calls <- lab.py:532 wrapped <- "
             "lab.py:466 __call__ <- lab.py:450 middleware")
BRIEF_LINE = ("event loop blocked for 1.002 s in psycopg2 execute "
              "(django/db/backends/utils.py:105 _execute) from lab.py:452 sleep_in_database <- "
              "lab.py:470 only_database_call")
NO_CALLER_LINE = PREFIX + "event loop blocked for 0.150 s in time sleep (threading.py:320 wait)"
NOISE = [
    "[2026-11-28 04:10:39 +0000] [6630] [INFO] Starting gunicorn 27.0.1",
    "[2026-11-28 04:10:39 +0000] [6637] [INFO] Booting worker with pid: 6637",
    '127.0.0.1 - - "GET /only-database-call/ HTTP/1.1" 200 35 0.205',
    "event loop blocked for a while",
]

JSON_KEYS = {"mode", "route", "requests", "concurrency", "delay", "total_s", "rps", "model_s",
             "article_s", "statuses", "blocks", "blocked_s", "top_culprit", "timeline"}


# --- The blocking lines ------------------------------------------------------------------------

@pytest.mark.parametrize("line, seconds, culprit, label", [
    (DB_LINE, 0.205, "psycopg2 execute", "psycopg2 execute from only_database_call"),
    (BOTH_LINE, 0.204, "psycopg2 execute", "psycopg2 execute from both_http_and_database_calls"),
    (BRIEF_LINE, 1.002, "psycopg2 execute", "psycopg2 execute from only_database_call"),
    (NO_CALLER_LINE, 0.150, "time sleep", "time sleep"),
], ids=["real-db", "real-both", "brief", "no-caller"])
def test_a_blocking_line_gives_seconds_culprit_and_view(line, seconds, culprit, label):
    block = report.parse_block_line(line)
    assert block["seconds"] == seconds
    assert block["culprit"] == culprit
    assert report.culprit_label(block) == label


def test_the_where_and_caller_parts_are_kept_whole():
    block = report.parse_block_line(BRIEF_LINE + "\n")
    assert block["where"] == "django/db/backends/utils.py:105 _execute"
    assert block["caller"] == "lab.py:452 sleep_in_database <- lab.py:470 only_database_call"


@pytest.mark.parametrize("line", NOISE)
def test_other_log_lines_are_not_blocking_lines(line):
    assert report.parse_block_line(line) is None


def test_a_view_without_a_known_name_falls_back_to_the_innermost_frame():
    line = BRIEF_LINE.replace("only_database_call", "some_new_view")
    assert (report.culprit_label(report.parse_block_line(line))
            == "psycopg2 execute from sleep_in_database")


def test_blocking_summary_counts_adds_and_names_the_top_culprit(tmp_path):
    log = tmp_path / "04-almost_all-db.log"
    log.write_text("\n".join([NOISE[0], BOTH_LINE, DB_LINE, NOISE[2], DB_LINE, DB_LINE,
                              NO_CALLER_LINE]) + "\n")
    assert report.blocking_summary(log) == {
        "blocks": 5,
        "blocked_s": round(0.204 + 3 * 0.205 + 0.150, 3),
        "top_culprit": "psycopg2 execute from only_database_call (3x)",
        "example": BOTH_LINE,
    }


def test_a_log_without_blocking_lines_summarises_to_zero(tmp_path):
    log = tmp_path / "05-all-db.log"
    log.write_text("\n".join(NOISE) + "\n")
    assert report.blocking_summary(log) == {"blocks": 0, "blocked_s": 0, "top_culprit": None,
                                            "example": None}


@pytest.mark.parametrize("name, lines, expected", [
    ("01-nothing-both.log", NOISE, "Event loop: (sync worker: no event loop)"),
    ("05-all-db.log", NOISE, "Event loop: never blocked over 0.1 s"),
    ("04-almost_all-db.log", [BRIEF_LINE] * 10,
     ("Event loop: blocked 10 times (10.0 s in all); "
      "top culprit: psycopg2 execute from only_database_call (10x)")),
    ("03-almost_all-http.log", [NO_CALLER_LINE],
     "Event loop: blocked 1 time (0.1 s in all); top culprit: time sleep (1x)"),
])
def test_the_blocking_command_prints_one_line(tmp_path, name, lines, expected):
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    result = run(["report.py", "blocking", str(tmp_path / name)])
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")


def test_the_blocking_command_rejects_a_missing_log(tmp_path):
    result = run(["report.py", "blocking", str(tmp_path / "04-almost_all-db.log")])
    assert result.returncode == 2 and "no such file" in result.stderr


# --- Real load.py figures ----------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """/sleep answers 200 after DELAY; /mixed answers 200, then 503, then hangs up, in turn."""

    turns = itertools.cycle(("ok", "unavailable", "hang up"))
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        time.sleep(DELAY)
        with self.lock:
            turn = next(self.turns) if self.path == "/mixed" else "ok"
        if turn == "hang up":
            self.close_connection = True  # no response at all: load.py records an error
            return
        body = b"slept\n"
        self.send_response(200 if turn == "ok" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


# name -> (requests, concurrency, path, extra load.py flags, server log lines)
SCENARIOS = {
    "01-nothing-both": (4, 1, "/sleep", [], NOISE[:2]),
    "02-almost_all-db": (6, 2, "/sleep", [], NOISE[:2] + [DB_LINE, BOTH_LINE, DB_LINE]),
    "03-all-db": (9, 9, "/mixed", ["-disable-keepalive"], NOISE[:3]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder as run_all.sh leaves it: NN-MODE-ROUTE.json from load.py, and .log."""
    folder = tmp_path_factory.mktemp("results")
    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for name, (n, c, path, flags, log_lines) in SCENARIOS.items():
            url = f"http://127.0.0.1:{httpd.server_address[1]}{path}"
            saved = run(["load.py", "-n", str(n), "-c", str(c), "-t", "10", *flags,
                         "--save", str(folder / f"{name}.json"), url])
            assert saved.returncode == 0, saved.stderr
            (folder / f"{name}.log").write_text("\n".join(log_lines) + "\n")
    finally:
        httpd.shutdown()
        httpd.server_close()
    return folder


def figures(results, name):
    return json.loads((results / f"{name}.json").read_text())


def report_files(results):
    return [str(path) for path in sorted(results.glob("*.json"))]


def test_the_mixed_scenario_really_has_503s_and_errors(results):
    found = figures(results, "03-all-db")
    assert found["status_codes"] == {"200": 3, "503": 3}
    assert sum(found["errors"].values()) == 3


def test_the_table_has_a_blocked_column(results):
    result = run(["report.py", "--delay", str(DELAY), *report_files(results)])
    assert result.returncode == 1, "the mixed scenario failed, so the report does"
    header, *rows = result.stdout.splitlines()
    assert header.split()[-2:] == ["blocked", "result"]
    end = header.index("blocked") + len("blocked")  # the column is right-aligned
    blocked = {row.split()[0]: row[end - len("blocked"):end].strip() for row in rows}
    assert blocked == {"nothing": "-", "almost_all": "3", "all": "0"}
    assert "FAILED 3x503, 3x error" in rows[2]


def test_json_lines_gain_blocking_and_the_timeline(results):
    result = run(["report.py", "--delay", str(DELAY), "--json", *report_files(results)])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [set(line) for line in lines] == [JSON_KEYS] * 3
    sync, gevent_blocked, gevent_free = lines
    assert (sync["blocks"], sync["blocked_s"], sync["top_culprit"]) == (None, None, None)
    assert gevent_blocked["blocks"] == 3 and gevent_blocked["blocked_s"] == 0.614
    assert gevent_blocked["top_culprit"] == "psycopg2 execute from only_database_call (2x)"
    assert (gevent_free["blocks"], gevent_free["top_culprit"]) == (0, None)
    for line, name in zip(lines, SCENARIOS):
        timeline = figures(results, name)["timeline"]
        assert sorted(line["timeline"]) == sorted(
            [r["start_s"], r["end_s"], r["status"]] for r in timeline)
    assert Counter(status for _, _, status in gevent_free["timeline"]) == {200: 3, 503: 3,
                                                                           None: 3}


def test_the_sync_scenario_timeline_is_a_staircase(results):
    ends = sorted(end for _, end, _ in report.timeline(figures(results, "01-nothing-both")))
    assert all(later - earlier >= 0.8 * DELAY for earlier, later in itertools.pairwise(ends))


@pytest.mark.parametrize("span, step", [(0.2, 0.02), (0.217, 0.05), (2.03, 0.5), (4.06, 0.5),
                                        (10.2, 2), (21, 5), (0.0013, 0.0002)])
def test_axis_ticks_are_round_and_at_most_ten(span, step):
    assert report.tick_step(span) == pytest.approx(step)
    assert span / report.tick_step(span) <= 10


# --- The HTML page ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(results, tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "report.html"
    result = run(["report.py", "--delay", str(DELAY), "--html", str(path),
                  *report_files(results)])
    assert result.returncode == 1 and path.exists(), result.stderr
    return path


def test_the_page_is_one_file_that_fetches_nothing(page):
    text = page.read_text()
    for fetching in ("<script", "src=", "href=", "url(", "@import", "<link", "<iframe"):
        assert fetching not in text
    assert "://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_page_has_settings_table_notes_and_blocking(page):
    text = page.read_text()
    assert "<title>Async Workers Lab" in text
    assert "4 requests per scenario, 1 at a time" in text  # the first scenario's n and c
    assert f"pg_sleep {DELAY:g} s each" in text
    for heading in ("scenario", "measured", "req/s", "model", "measured/model", "article",
                    "blocked", "result"):
        assert f"<th>{heading}</th>" in text
    for mode in ("nothing", "almost_all", "all"):
        assert f"<dt>{mode}</dt>" in text
    assert "Event loop: (sync worker: no event loop)" in text
    assert ("Event loop: blocked 3 times (0.6 s in all); top culprit: psycopg2 execute from "
            "only_database_call (2x)") in text
    assert "Event loop: never blocked over 0.1 s" in text
    assert "lab.py:511 sleep_in_database &lt;- lab.py:549 only_database_call" in text


def test_a_report_into_a_missing_folder_is_refused_before_running():
    started = time.monotonic()
    result = subprocess.run(["./run_all.sh", "--delay", "0.2", "--report", "no/such/dir/r.html"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and time.monotonic() - started < 10
    assert result.stderr.startswith("run_all.sh: error: --report: no such directory")
    assert len(result.stderr.strip().splitlines()) == 1


# --- ...drawn by a real browser -----------------------------------------------------------------

# Appended to a copy of the page only: the report itself has no script. It writes what the
# browser laid out into the DOM, so --dump-dom shows geometry, not just the markup we wrote.
MEASURE_SCRIPT = """<script>
for (const bar of document.querySelectorAll("rect.bar")) {
  const box = bar.getBoundingClientRect();
  bar.dataset.drawn = [box.x, box.y, box.width, box.height].map(Math.round).join(",");
  bar.dataset.fill = getComputedStyle(bar).fill;
}
</script>"""


def chromium(*args):
    """Run headless Chromium with a throwaway profile; return its stdout."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        pytest.skip("no chromium or chromium-browser on PATH, so the page cannot be drawn")
    with tempfile.TemporaryDirectory(prefix="report-chromium-", ignore_cleanup_errors=True) as d:
        result = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={d}",
             "--virtual-time-budget=5000", *args],
            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]  # stderr is noisy (dbus) even when fine
    return result.stdout


class BarCollector(HTMLParser):
    """The rect.bar elements of each timeline <svg>, by its data-scenario, with attributes."""

    def __init__(self):
        super().__init__()
        self.bars, self.scenario = {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "timeline" in attrs.get("class", "").split():
            self.scenario = attrs["data-scenario"]
            self.bars[self.scenario] = []
        elif tag == "rect" and "bar" in attrs.get("class", "").split():
            self.bars[self.scenario].append(attrs)

    def handle_endtag(self, tag):
        if tag == "svg":
            self.scenario = None


def test_chromium_draws_one_bar_per_request_in_each_scenario(page, results, tmp_path):
    measured = tmp_path / "measured.html"
    measured.write_text(page.read_text().replace("</body>", MEASURE_SCRIPT + "</body>"))
    collector = BarCollector()
    collector.feed(chromium("--dump-dom", measured.as_uri()))

    expected = {name.split("-", 1)[1].replace("-", "/"): figures(results, name)["timeline"]
                for name in SCENARIOS}
    assert {s: len(bars) for s, bars in collector.bars.items()} == {
        s: len(rows) for s, rows in expected.items()}
    for scenario, bars in collector.bars.items():
        boxes = [tuple(map(int, bar["data-drawn"].split(","))) for bar in bars]
        assert all(width >= 1 and height >= 1 for _, _, width, height in boxes), scenario
        assert len({y for _, y, _, _ in boxes}) == len(boxes), "one row per request"
    # Errored requests look different from answered ones, and a 503 from a 200.
    fills = {}
    for bar in collector.bars["all/db"]:
        fills.setdefault(bar["class"].split()[1], set()).add(bar["data-fill"])
    assert set(fills) == {"s2xx", "s5xx", "error"}
    assert all(len(colours) == 1 for colours in fills.values())
    assert len(set.union(*fills.values())) == 3


def test_chromium_screenshots_the_page(page, tmp_path):
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert (width, height) == (1200, 3000)
    assert len(data) > 20_000, "a blank page compresses to a few kB"
