"""Tests for report.py: what blocked the event loop, the table and JSON lines, and the HTML page,
drawn by a real headless Chromium from real load.py figures.

The figures come from load.py runs against a small local server started here (sleepy, and for
one scenario also answering 503 or hanging up), saved as NN-SETUP-ROUTE.json as run_all.sh saves
them, with lab.py event records (SETUP.events) next to them.
"""

import contextlib
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_error, run

sys.path.insert(0, str(ROOT))

import report

DELAY = 0.05  # the test server's sleep per request

# What `lab.py --events` records (real records), and one with no view found.
DB_EVENT = {"event": "blocked", "at": 0.0, "seconds": 0.205, "pid": 6637, "setup": "almost_all",
            "call": "psycopg2 execute", "where": "django/db/backends/utils.py:105 _execute",
            "view": "only_database_call", "route": "db",
            "frames": ["lab.py:143 sleep_in_database", "lab.py:119 only_database_call",
                       "lab.py:804 __call__"]}
BOTH_EVENT = {**DB_EVENT, "seconds": 0.204, "view": "both_http_and_database_calls",
              "route": "both", "frames": ["lab.py:143 sleep_in_database",
                                          "lab.py:125 both_http_and_database_calls"]}
NO_VIEW_EVENT = {**DB_EVENT, "seconds": 0.150, "call": "time sleep",
                 "where": "threading.py:320 wait", "view": None, "route": None, "frames": []}

JSON_KEYS = {"mode", "setup", "route", "requests", "concurrency", "delay", "total_s", "rps",
             "model", "model_s", "article_s", "statuses", "blocks", "blocked_s", "top_culprit",
             "timeline", "workers", "worker_rss_mb", "settings", "peak_connections",
             "peak_active_connections", "connections_left", "idle_connections_left"}


def at(event, seconds):
    return {**event, "at": seconds}


def write_events(path, events, torn=False):
    text = "".join(json.dumps(event) + "\n" for event in events)
    path.write_text(text + ('{"event": "blo' if torn else ""))


# --- What blocked the event loop -----------------------------------------------------------------

@pytest.mark.parametrize("event, label", [
    (DB_EVENT, "psycopg2 execute from only_database_call"),
    (BOTH_EVENT, "psycopg2 execute from both_http_and_database_calls"),
    (NO_VIEW_EVENT, "time sleep"),
])
def test_a_block_is_named_by_its_call_and_view(event, label):
    assert report.culprit_label(event) == label


def test_blocking_summary_counts_adds_and_names_the_top_culprit(tmp_path):
    events = tmp_path / "almost_all.events"
    write_events(events, [BOTH_EVENT, DB_EVENT, DB_EVENT, DB_EVENT, NO_VIEW_EVENT], torn=True)
    assert report.blocking_summary(report.read_events(events)) == {
        "blocks": 5,
        "blocked_s": round(0.204 + 3 * 0.205 + 0.150, 3),
        "top_culprit": "psycopg2 execute from only_database_call (3x)",
        "example": ("event loop blocked for 0.204 s in psycopg2 execute (django/db/backends/"
                    "utils.py:105 _execute) from lab.py:143 sleep_in_database <- "
                    "lab.py:125 both_http_and_database_calls"),
    }


def test_blocks_belong_to_the_run_during_which_they_began(tmp_path):
    records = [at(BOTH_EVENT, 99.9), at(DB_EVENT, 100.5), at(DB_EVENT, 101.0), at(DB_EVENT, 102)]
    summary = report.blocking_summary(records, window=(100.0, 101.5))
    assert summary["blocks"] == 2 and summary["top_culprit"].endswith("(2x)")


def scenario_files(folder, name, events, started_at=100.0, ended_at=101.0):
    figures = {"requests": 10, "concurrency": 10, "total_s": 1.0, "rps": 10, "timeline": [],
               "status_codes": {"200": 10}, "errors": {}, "started_at": started_at,
               "ended_at": ended_at}
    (folder / f"{name}.json").write_text(json.dumps(figures))
    if events is not None:
        write_events(folder / f"{name.split('-')[1]}.events", events)
    return str(folder / f"{name}.json")


@pytest.mark.parametrize("name, events, expected", [
    ("01-nothing-both", None, "Event loop: (sync worker: no event loop)"),
    ("05-all-db", [], "Event loop: never blocked over 0.1 s"),
    ("04-almost_all-db", [at(DB_EVENT, 100.1)] * 10 + [at(BOTH_EVENT, 99)],
     ("Event loop: blocked 10 times (2.0 s in all); "
      "top culprit: psycopg2 execute from only_database_call (10x)")),
    ("03-almost_all-http", [at(NO_VIEW_EVENT, 100.2)],
     "Event loop: blocked 1 time (0.1 s in all); top culprit: time sleep (1x)"),
    ("06-all-both", None, "Event loop: (no events recorded)"),
])
def test_the_blocking_command_prints_one_line(tmp_path, name, events, expected):
    result = run(["report.py", "blocking", scenario_files(tmp_path, name, events)])
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")


@pytest.mark.parametrize("args, words", [
    (["blocking", "missing/04-almost_all-db.json"], "no such file"),
    (["blocking", "x.json"], "not a scenario file"),
    (["blocking"], "the following arguments are required"),
    (["--delay", "1", "missing/01-all-db.json"], "no such file"),
    (["--delay", "abc", "x.json"], "invalid float value"),
    (["--delay", "1", "--nope", "x.json"], "unrecognized arguments"),
    (["--delay", "1", "--html", "/no/such/dir/r.html", "x.json"], "no such directory"),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    assert_one_error(run(["report.py", *args]), "report.py", words)


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"requests": 1}', "\xff\xfe"])
def test_a_file_that_is_not_load_figures_is_one_line(tmp_path, content):
    path = tmp_path / "01-all-db.json"
    path.write_bytes(content.encode("latin-1"))
    assert_one_error(run(["report.py", "--delay", "1", str(path)]), "report.py",
                     "not load.py's JSON figures")


FIGURES = {"requests": 2, "concurrency": 2, "total_s": 0.5, "rps": 4.0, "status_codes": {"200": 2},
           "errors": {}, "latency_distribution": {"50": 0.25},
           "timeline": [{"start_s": 0.0, "end_s": 0.25, "status": 200},
                        {"start_s": 0.0, "end_s": 0.5, "status": 200}]}


@pytest.mark.parametrize("field, literal, text", [
    ("total_s", "NaN", '"total_s": NaN'),
    ("rps", "Infinity", '"rps": Infinity'),
    ("timeline[1].end_s", "-Infinity", '"end_s": -Infinity'),
    ("latency_distribution.50", "Infinity", '"50": 1e999'),  # too big for a float: infinity
])
def test_figures_that_are_not_finite_numbers_are_refused(tmp_path, field, literal, text):
    """Python's json reads NaN and Infinity; a table of them would say "nan s ... ok"."""
    good = json.dumps(FIGURES)
    old = {"total_s": '"total_s": 0.5', "rps": '"rps": 4.0', "timeline[1].end_s": '"end_s": 0.5',
           "latency_distribution.50": '"50": 0.25'}[field]
    path = tmp_path / "01-all-db.json"
    path.write_text(good.replace(old, text))
    assert path.read_text() != good
    message = f"{path}: not load.py's JSON figures: {field} is {literal}, not a finite number"
    for args in (["--delay", "1", str(path)], ["--delay", "1", "--json", str(path)],
                 ["blocking", str(path)]):
        assert_one_error(run(["report.py", *args]), "report.py", message=message)
    path.write_text(good)
    assert run(["report.py", "--delay", "1", str(path)]).returncode == 0


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


# name -> (requests, concurrency, path, extra load.py flags, the setup's event records)
SCENARIOS = {
    "01-nothing-both": (4, 1, "/sleep", [], None),
    "02-almost_all-db": (6, 2, "/sleep", [], [DB_EVENT, BOTH_EVENT, DB_EVENT]),
    "03-all-db": (9, 9, "/mixed", ["-disable-keepalive"], []),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder as run_all.sh leaves it: NN-SETUP-ROUTE.json, SETUP.events."""
    folder = tmp_path_factory.mktemp("results")
    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for name, (n, c, path, flags, events) in SCENARIOS.items():
            url = f"http://127.0.0.1:{httpd.server_address[1]}{path}"
            saved = run(["load.py", "-n", str(n), "-c", str(c), "-t", "10", *flags,
                         "--save", str(folder / f"{name}.json"), url])
            assert saved.returncode == 0, saved.stderr
            if events is not None:  # the blocks, dated during the run
                ran = json.loads((folder / f"{name}.json").read_text())
                during = (ran["started_at"] + ran["ended_at"]) / 2
                write_events(folder / f"{name.split('-')[1]}.events",
                             [at(event, during) for event in events])
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
    assert header.split()[-3:] == ["blocked", "conns", "result"]
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
    # The scenarios' n and c differ (as with run_all.sh --scale): each heading says its own.
    assert "each scenario its own n and c, one worker;" in text
    for n, c, *_ in SCENARIOS.values():
        assert f"<p>n = {n}, c = {c}: measured " in text
    assert f"pg_sleep {DELAY:g} s each" in text
    for heading in ("scenario", "measured", "req/s", "model", "measured/model", "article",
                    "memory", "blocked", "result"):
        assert f"<th>{heading}</th>" in text
    for mode in ("nothing", "almost_all", "all"):
        assert f"<dt>{mode}</dt>" in text
    assert "Event loop: (sync worker: no event loop)" in text
    assert ("Event loop: blocked 3 times (0.6 s in all); top culprit: psycopg2 execute from "
            "only_database_call (2x)") in text
    assert "Event loop: never blocked over 0.1 s" in text
    assert "<h2>Setups side by side</h2>" in text and text.count('<g class="setup"') == 3
    assert "lab.py:143 sleep_in_database &lt;- lab.py:119 only_database_call" in text


# Places that refuse a new file, as root too (tests run as root in CI): sysfs makes none
# (EACCES; EROFS where it is mounted read-only), /proc has no such entry to open, and every
# write to /dev/full fails as on a full disk.
UNWRITABLE = [
    ("/sys/report.html", ("Permission denied", "Read-only file system")),
    ("/proc/report.html", ("No such file or directory",)),
    ("/dev/full", ("No space left on device",)),
]


@pytest.mark.parametrize("path, causes", UNWRITABLE, ids=["sysfs", "proc", "dev-full"])
@pytest.mark.parametrize("json_lines", [False, True], ids=["table", "json"])
def test_a_page_that_cannot_be_written_comes_after_the_whole_table(results, path, causes,
                                                                   json_lines):
    flags = ["--delay", str(DELAY), *(["--json"] if json_lines else [])]
    alone = run(["report.py", *flags, *report_files(results)])
    assert alone.returncode == 1 and alone.stdout.count("\n") == len(SCENARIOS) + (not json_lines)
    # One stream, as on a terminal: the table must not be stuck in a buffer behind the error.
    merged = subprocess.run([sys.executable, "report.py", *flags, "--html", path,
                             *report_files(results)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60, check=False)
    assert merged.returncode == 2, "the page unwritten (2), not only some responses not 200 (1)"
    assert merged.stdout.startswith(alone.stdout), merged.stdout
    error = merged.stdout[len(alone.stdout):]
    assert error in [f"report.py: error: --html {path}: cannot write the page: {cause}\n"
                     for cause in causes], error
    assert not Path(path).exists() or path == "/dev/full"


def test_a_page_that_cannot_be_written_is_exit_2_even_when_all_went_well(results, tmp_path):
    (tmp_path / "01-nothing-both.json").write_text((results / "01-nothing-both.json").read_text())
    result = run(["report.py", "--delay", str(DELAY), "--html", "/dev/full",
                  str(tmp_path / "01-nothing-both.json")])
    assert_one_error(result, "report.py", message="--html /dev/full: cannot write the page: "
                     "No space left on device", stdout=None)
    assert result.stdout.count(" ok\n") == 1, result.stdout


def test_a_page_on_a_full_disk_leaves_no_half_page_and_the_old_one_whole(results):
    """A regular file on a really full file system (a small tmpfs, filled: root only, as
    mounting one needs root), where /dev/full above is a device written to directly."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    full = Path(tempfile.mkdtemp(prefix="awlr-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                      capture_output=True, check=False).returncode:
        full.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        page = full / "report.html"
        page.write_text("the old page\n")
        with open(full / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:  # every block left
                filler.write(b"\0" * 4096)
        result = run(["report.py", "--delay", str(DELAY), "--html", str(page),
                      *report_files(results)])
        assert_one_error(result, "report.py", message=f"--html {page}: cannot write the page: "
                         "No space left on device", stdout=None)
        assert result.stdout.count("\n") == 1 + len(SCENARIOS), "the table, whole"
        assert page.read_text() == "the old page\n"
        assert sorted(p.name for p in full.iterdir()) == ["filler", "report.html"]
    finally:
        subprocess.run(["umount", str(full)], check=False)
        full.rmdir()


def test_a_page_written_again_replaces_the_old_one_whole(results, tmp_path):
    page = tmp_path / "report.html"
    page.write_text("the old page\n")
    page.chmod(0o640)
    link = tmp_path / "link.html"
    link.symlink_to(page.name)
    result = run(["report.py", "--delay", str(DELAY), "--html", str(link),
                  *report_files(results)])
    assert result.returncode == 1 and result.stderr == "", result.stderr
    assert link.is_symlink() and page.read_text().startswith("<!DOCTYPE html>")
    assert page.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "report.html"]


def test_run_all_tells_a_page_not_written_from_responses_not_200():
    """Not "some scenarios had responses other than 200": report.py's own line says what."""
    result = subprocess.run(["./run_all.sh", "--delay", "0.05", "-n", "1", "-c", "1",
                             "--report", "/dev/full"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "all / fanout" in result.stdout and result.stdout.rstrip().endswith("ok")
    assert result.stderr.strip().splitlines()[-1] == (
        "report.py: error: --html /dev/full: cannot write the page: No space left on device")
    assert "other than 200" not in result.stderr and "wrote" not in result.stderr, result.stderr


# --- ...drawn by a real browser -----------------------------------------------------------------

# Appended to a copy of the page only: the report itself has no script. It writes what the
# browser laid out into the DOM, so --dump-dom shows geometry, not just the markup we wrote.
MEASURE_SCRIPT = """<script>
for (const bar of document.querySelectorAll("rect.bar, svg.timeline")) {
  const box = bar.getBoundingClientRect();
  bar.dataset.drawn = [box.x, box.y, box.width, box.height].map(Math.round).join(",");
  bar.dataset.fill = getComputedStyle(bar).fill;
}
document.body.dataset.height = document.documentElement.scrollHeight;
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
    """The rect.bar elements of each timeline <svg>, by its data-scenario, with attributes;
    the <svg> elements' own attributes, and the <body>'s."""

    def __init__(self):
        super().__init__()
        self.bars, self.svgs, self.body, self.scenario = {}, {}, {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "svg" and "timeline" in attrs.get("class", "").split():
            self.scenario = attrs["data-scenario"]
            self.bars[self.scenario] = []
            self.svgs[self.scenario] = attrs
        elif (tag == "rect" and "bar" in attrs.get("class", "").split()
              and self.scenario is not None):  # not the bars of the side-by-side picture
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


def png_pixels(data):
    """(width, height, pixel): a PNG of 8-bit RGB or RGBA, as Chromium writes its screenshots,
    decoded with zlib alone; pixel(x, y) is (r, g, b)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, packed = 8, []
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        position += 12 + length  # length, type, body, CRC
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, interlace) == (8, 0) and colour in (2, 6), (depth, colour, interlace)
            size = 3 if colour == 2 else 4  # bytes a pixel: RGB or RGBA
        elif kind == b"IDAT":
            packed.append(body)
        elif kind == b"IEND":
            break
    raw, stride, rows = zlib.decompress(b"".join(packed)), width * size, []
    above = bytearray(stride)
    for y in range(height):  # each row: a filter byte, then the row filtered by it
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:  # Sub: plus the byte to the left
            for i in range(size, stride):
                row[i] = (row[i] + row[i - size]) & 255
        elif kind == 2:  # Up: plus the byte above
            row = bytearray((a + b) & 255 for a, b in zip(row, above, strict=True))
        elif kind == 3:  # Average of left and above
            for i in range(stride):
                row[i] = (row[i] + ((row[i - size] if i >= size else 0) + above[i]) // 2) & 255
        elif kind == 4:  # Paeth: whichever of left, above, upper left is nearest their sum
            for i in range(stride):
                a = row[i - size] if i >= size else 0
                b, c = above[i], above[i - size] if i >= size else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(row)
        above = row

    def pixel(x, y):
        return tuple(rows[y][x * size:x * size + 3])

    return width, height, pixel


def near(colour, other, tolerance=24):
    return max(abs(a - b) for a, b in zip(colour, other, strict=True)) <= tolerance


def test_the_screenshot_shows_each_bar_where_its_svg_puts_it_in_its_colour(page, tmp_path):
    """What a reader sees, not what the markup says: in Chromium's screenshot of the page,
    the middle of each bar (the <svg>'s place on the page, measured in a copy, plus the bar's
    x, y, width and height in it) has the colour the page's style gives its status, and just
    past its end the bar's colour is gone. An error bar is white inside a red outline."""
    measured = tmp_path / "measured.html"
    measured.write_text(page.read_text().replace("</body>", MEASURE_SCRIPT + "</body>"))
    collector = BarCollector()
    collector.feed(chromium("--dump-dom", "--window-size=1200,3000", measured.as_uri()))
    height = int(collector.body["data-height"])  # the whole page, in one screenshot
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", f"--window-size=1200,{height}", page.as_uri())
    width, shot_height, pixel = png_pixels(shot.read_bytes())
    assert (width, shot_height) == (1200, height), "one CSS pixel, one pixel of the image"

    def rgb(hex_colour):  # #3a923a or #fff
        return tuple(bytes.fromhex(hex_colour if len(hex_colour) == 6
                                   else "".join(digit * 2 for digit in hex_colour)))

    style = page.read_text()  # the page's own <style>
    colours = {kind: rgb(value) for kind, value in
               re.findall(r"\.(s\dxx|error) \{ fill: #([0-9a-f]+);", style)}
    red = rgb(re.search(r"\.error \{[^}]*stroke: #([0-9a-f]+);", style)[1])
    assert len({colours["s2xx"], colours["s5xx"], colours["error"]}) == 3, colours
    seen = Counter()
    for scenario, bars in collector.bars.items():
        left, top = map(int, collector.svgs[scenario]["data-drawn"].split(",")[:2])
        for bar in bars:
            kind = bar["class"].split()[1]
            assert kind in colours, (scenario, "a bar of no status the page colours", bar)
            x, y, w, h = (float(bar[key]) for key in ("x", "y", "width", "height"))
            assert w >= 4 and h >= 4, (scenario, bar)  # wide and tall enough to look inside
            middle_x, middle_y = round(left + x + w / 2), round(top + y + h / 2)
            assert near(pixel(middle_x, middle_y), colours[kind]), (scenario, kind, bar)
            if kind == "error":  # white, as the page: its dashed outline is what shows
                outline = [pixel(round(left + x + i), round(top + y)) for i in range(int(w))]
                assert sum(near(colour, red, 60) for colour in outline) > w / 3, (scenario, bar)
            else:
                assert not near(pixel(round(left + x + w + 3), middle_y), colours[kind]), (
                    scenario, "drawn past its end", bar)
            seen[kind] += 1
    assert seen == {"s2xx": 4 + 6 + 3, "s5xx": 3, "error": 3}, seen


def test_connections_left_after_a_burst_only_when_the_lab_was_left_alone(tmp_path):
    """run_all.sh waits for the after-burst figure only with --scale: in the default run the
    next scenario on the same lab starts sooner, so what its burst holds is not passed off as
    "left open after the previous one"."""
    def figures(started, ended):
        return json.dumps({"requests": 1, "concurrency": 1, "total_s": ended - started,
                           "timeline": [], "started_at": started, "ended_at": ended})

    (tmp_path / "01-all-db.json").write_text(figures(100.0, 101.0))
    (tmp_path / "02-nothing-db.json").write_text(figures(101.1, 102.0))
    (tmp_path / "03-all-http.json").write_text(figures(101.2, 102.0))  # 0.2 s after 01
    (tmp_path / "all.connections").write_text("\n".join(json.dumps(
        {"event": "connections", "at": at, "held": held, "active": active, "idle": held - active})
        for at, held, active in [(99.0, 3, 0), (100.2, 9, 9), (101.05, 3, 0), (101.85, 7, 7)]))
    early = report.connections_of(tmp_path / "01-all-db.json", "all",
                                  json.loads((tmp_path / "01-all-db.json").read_text()))
    assert early == {"peak": 9, "peak_active": 9, "left": None, "left_idle": None}
    assert report.describe_connections(early) == ("PostgreSQL connections: 9 held at most "
                                                  "(9 in a query)")
    (tmp_path / "03-all-http.json").write_text(figures(101.8, 102.5))  # 0.8 s after: measured
    left = report.connections_of(tmp_path / "01-all-db.json", "all",
                                 json.loads((tmp_path / "01-all-db.json").read_text()))
    assert left["left"] == 3 and left["left_idle"] == 3
    assert "3 left open after the burst (3 idle)" in report.describe_connections(left)
    (tmp_path / "stopped_at").write_text("102,6\n")  # the labs stopped 0.1 s after 03 ended
    last = report.connections_of(tmp_path / "03-all-http.json", "all",
                                 json.loads((tmp_path / "03-all-http.json").read_text()))
    assert last["left"] is None
