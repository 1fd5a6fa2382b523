"""Put the lab's scenarios side by side: measured total, the model's time, the article's figure.

run_all.sh saves each scenario's figures as load.py JSON, named NN-SETUP-ROUTE.json, and each
lab's event records (one JSON object a line, from `lab.py --events`) as SETUP.events beside
them, and calls

    python report.py blocking RESULTS_DIR/NN-SETUP-ROUTE.json  # one line: what blocked the loop
    python report.py --delay 1 RESULTS_DIR/*.json              # the results table
    python report.py --delay 1 --json RESULTS_DIR/*.json       # one JSON object per scenario
    python report.py --delay 1 --html report.html RESULTS_DIR/*.json   # also a one-file page

The setups, routes, models and the article's figures are lab.py's (SETUPS, ROUTES, SCENARIOS):
this file only reads them. A block of the event loop belongs to the scenario during whose load
run it began (load.py's started_at and ended_at).

Exit status: 0 when every request of every scenario got a 200, 1 when some did not, 2 for a bad
flag or file, or an --html page that could not be written (the table is printed first, whole).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from datetime import datetime
from html import escape
from pathlib import Path
from stat import S_ISDIR

import lab
from labkit import checks, plan, sampler

PROG = "report.py"


class ReportError(Exception):
    """A bad file or flag: main() prints it as one line and exits with status 2."""


# --- One scenario: its figures, its timeline, what blocked its event loop ------------------------

def scenario_name(path):
    """(setup, route) from NN-SETUP-ROUTE.json."""
    parts = Path(path).stem.split("-", 2)
    if len(parts) != 3 or parts[1] not in lab.SETUPS or parts[2] not in lab.ROUTES:
        raise ReportError(f"{path}: not a scenario file (NN-SETUP-ROUTE.json, with a setup and "
                          "a route of lab.py --list)")
    return parts[1], parts[2]


def read_figures(path):
    try:
        figures = json.loads(Path(path).read_text())
        if not all(key in figures for key in ("requests", "concurrency", "total_s", "timeline")):
            raise ValueError
    except FileNotFoundError:
        raise ReportError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not load.py's JSON figures"
        raise ReportError(f"{path}: {reason}") from None
    found = non_finite(figures)
    if found:
        field, literal = found
        raise ReportError(f"{path}: not load.py's JSON figures: {field} is {literal}, "
                          "not a finite number")
    return figures


def non_finite(value, where=""):
    """(field, literal) of the first NaN or infinity in parsed JSON, or None. Python's json
    reads the literals NaN, Infinity and -Infinity (and 1e999 as infinity); load.py never
    writes them, and a table of them would read "nan s ... ok"."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the file", {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN")
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = non_finite(item, f"{where}[{key}]" if isinstance(key, int)
                           else f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def article_total(setup, route):
    return next((total for s, r, total in plan.SCENARIOS if (s, r) == (setup, route)), None)


def load_scenario(path, delay):
    """One load.py JSON file plus the model, the article and the blocks of the event loop."""
    setup, route = scenario_name(path)
    figures = read_figures(path)
    n, c = figures["requests"], figures["concurrency"]
    settings = read_settings(path, setup)
    model = plan.model_seconds(setup, route, n, c, delay, delay, settings=settings)
    article = article_total(setup, route) if (n, c, delay) == (10, 10, 1.0) else None
    return {
        "mode": setup,
        "setup": setup,
        "route": route,
        "path": lab.ROUTES[route].path,
        "requests": n,
        "concurrency": c,
        "delay": delay,
        "total_s": figures["total_s"],
        "rps": figures["rps"],
        "model": plan.model_formula(setup, route),
        "model_s": round(model, 6),
        "settings": settings,
        "article_s": article,
        "statuses": figures["status_codes"],
        "errors": figures["errors"],
        "ok": ok(figures, n),
        "timeline": timeline(figures),
        "blocking": blocking_of(path, setup, figures),
        "connections": connections_of(path, setup, figures),
        **read_workers(path),
        "figures": figures,
    }


def read_settings(path, setup):
    """The lab's settings where run_all.sh changed them (SETUP.settings beside the figures, JSON:
    workers, worker_connections, pool_size), for the model; {} for the setup's own."""
    try:
        kept = json.loads(Path(path).with_name(f"{setup}.settings").read_text())
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in kept.items()
            if key in ("workers", "worker_connections", "threads", "pool_size")
            and isinstance(value, int)}


def read_workers(path):
    """The workers' count and memory that run_all.sh kept beside the figures, if any."""
    try:
        kept = json.loads(Path(path).with_suffix(".workers").read_text())
        return {"workers": kept["workers"], "worker_rss_mb": round(kept["rss_bytes"] / 2**20, 1)}
    except (OSError, ValueError, KeyError, TypeError):
        return {"workers": None, "worker_rss_mb": None}


def ok(figures, n):
    """A scenario passes only if every request it sent got a 200."""
    return figures["status_codes"] == {"200": n} and not figures["errors"]


def timeline(figures):
    """[[start_s, end_s, status], ...] in start order; status is None when no response came."""
    rows = sorted(figures["timeline"], key=lambda r: (r["start_s"], r["end_s"]))
    return [[r["start_s"], r["end_s"], r["status"]] for r in rows]


def has_event_loop(setup):
    return lab.SERVERS[lab.SETUPS[setup].server].event_loop is not None


def blocking_of(path, setup, figures):
    """The blocks of the scenario's run, from SETUP.events beside its figures; None where the
    setup has no event loop or no events file was kept."""
    events = Path(path).with_name(f"{setup}.events")
    if not has_event_loop(setup) or not events.exists():
        return None
    window = (figures.get("started_at", 0), figures.get("ended_at", math.inf))
    return blocking_summary(read_events(events), window)


def read_events(path, kind="blocked"):
    """lab.py's event records: one JSON object a line (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == kind:
            records.append(record)
    return records


# --- Connections: what the lab held in PostgreSQL (lab.py --connections) ---------------------

CONNECTIONS_AFTER_S = 0.5  # "left behind": what the lab still holds this long after the burst


def connections_of(path, setup, figures, until=None):
    """The lab's PostgreSQL connections during the scenario's run, from SETUP.connections
    beside its figures; None where none were sampled. What was left after the burst counts
    only if the lab was left alone long enough: until its next scenario, or until it stopped
    (run_all.sh --scale waits for it; the default run does not)."""
    samples = Path(path).with_name(f"{setup}.connections")
    if not samples.exists():
        return None
    window = (figures.get("started_at", 0), figures.get("ended_at", math.inf))
    if until is None:
        until = quiet_until(path, setup)
    return connection_summary(read_events(samples, "connections"), window, until)


def quiet_until(path, setup):
    """When the lab was next busy after this scenario: its next scenario's start, or the moment
    run_all.sh stopped the labs (the file `stopped_at` beside the figures)."""
    number = int(Path(path).name.split("-", 1)[0])
    later = []
    for other in Path(path).parent.glob(f"*-{setup}-*.json"):
        name = other.name.split("-", 1)[0]
        if name.isdigit() and int(name) > number and scenario_name(other)[0] == setup:
            later.append(read_figures(other).get("started_at", math.inf))
    stopped = Path(path).with_name("stopped_at")
    if stopped.exists():
        try:  # bash's $EPOCHREALTIME has the locale's decimal mark
            later.append(float(stopped.read_text().strip().replace(",", ".")))
        except ValueError:
            pass
    return min(later, default=math.inf)


def connection_summary(records, window, until=math.inf):
    """{"peak": most held at once, "peak_active": most running a query at once, "left": held
    CONNECTIONS_AFTER_S after the burst, "left_idle": of which idle (None when the lab was busy
    again, or stopped, before then)}. The sampler writes a record when the count changes, so the
    count at a moment is the last record before it."""
    records = sorted(records, key=lambda r: r["at"])

    def state_at(moment):
        return next((r for r in reversed(records) if r["at"] <= moment), None)

    seen = [r for r in records if window[0] <= r["at"] <= window[1]]
    before = state_at(window[0])
    seen += [before] if before else []
    after = window[1] + CONNECTIONS_AFTER_S
    left = state_at(after) if after <= until else None
    return {"peak": max((r["held"] for r in seen), default=None),
            "peak_active": max((r["active"] for r in seen), default=None),
            "left": left and left["held"], "left_idle": left and left["idle"]}


def describe_connections(connections):
    if connections is None or connections["peak"] is None:
        return "PostgreSQL connections: (not sampled)"
    line = (f"PostgreSQL connections: {connections['peak']} held at most "
            f"({connections['peak_active']} in a query)")
    if connections["left"] is None:  # not measured: the next burst came first
        return line
    return f"{line}; {connections['left']} left open after the burst ({connections['left_idle']} idle)"


def blocking_summary(records, window=(0, math.inf)):
    """{"blocks": count, "blocked_s": total seconds, "top_culprit": "psycopg2 execute from
    only_database_call (10x)" or None, "example": one block in words, or None}"""
    found = [r for r in records if window[0] <= r["at"] <= window[1]]
    labels = Counter(culprit_label(r) for r in found)
    top = labels.most_common(1)
    return {
        "blocks": len(found),
        "blocked_s": round(sum(r["seconds"] for r in found), 3),
        "top_culprit": f"{top[0][0]} ({top[0][1]}x)" if top else None,
        "example": block_in_words(found[0]) if found else None,
    }


def culprit_label(record):
    """'psycopg2 execute from only_database_call': the blocking call and the view that made it."""
    return f"{record['call']} from {record['view']}" if record.get("view") else record["call"]


def block_in_words(record):
    frames = " <- ".join(record.get("frames") or [])
    return (f"event loop blocked for {record['seconds']:.3f} s in {record['call']} "
            f"({record['where']})" + (f" from {frames}" if frames else ""))


def describe_blocking(setup, blocking):
    """The one line run_all.sh prints after each scenario's load report."""
    if not has_event_loop(setup):
        return f"Event loop: ({lab.SETUPS[setup].server} worker: no event loop)"
    if blocking is None:
        return "Event loop: (no events recorded)"
    if not blocking["blocks"]:
        return f"Event loop: never blocked over {checks.DEFAULT_MONITOR_THRESHOLD} s"
    count = blocking["blocks"]
    return (f"Event loop: blocked {count} time{'s' * (count != 1)} "
            f"({blocking['blocked_s']:.1f} s in all); top culprit: {blocking['top_culprit']}")


# --- Text and JSON -----------------------------------------------------------------------------

def format_table(scenarios):
    header = (f"{'scenario':<24} {'measured':>10} {'req/s':>7} {'model':>8} {'vs model':>9} "
              f"{'article':>8} {'memory':>7} {'blocked':>7} {'conns':>5}  result")
    lines = [header]
    for s in scenarios:
        article = f"{s['article_s']:.2f} s" if s["article_s"] else "-"
        lines.append(
            f"{s['setup'] + ' / ' + s['route']:<24} {s['total_s']:>8.3f} s {s['rps']:>7.2f} "
            f"{s['model_s']:>6.2f} s {over_model(s):>+8.1f}% {article:>8} "
            f"{memory(s):>7} {blocked_count(s):>7} {peak_connections(s):>5}  {result(s)}"
        )
    return "\n".join(lines)


def memory(scenario):
    """The memory column: the workers' resident memory, summed, where it was measured."""
    return "-" if scenario["worker_rss_mb"] is None else f"{scenario['worker_rss_mb']:.0f} MB"


def over_model(scenario):
    """How much slower than the model, in percent."""
    if not scenario["model_s"]:
        return 0.0
    return (scenario["total_s"] / scenario["model_s"] - 1) * 100


def peak_connections(scenario):
    """The conns column: the most PostgreSQL connections the lab held during the run."""
    connections = scenario["connections"]
    return "-" if connections is None or connections["peak"] is None else str(connections["peak"])


def blocked_count(scenario):
    """The blocked column: a count, or "-" where there is no event loop (or no log)."""
    return "-" if scenario["blocking"] is None else str(scenario["blocking"]["blocks"])


def result(scenario):
    return "ok" if scenario["ok"] else "FAILED " + describe_failures(scenario)


def describe_failures(scenario):
    parts = [f"{count}x{status}" for status, count in scenario["statuses"].items()
             if status != "200"]
    parts += [f"{count}x error" for count in scenario["errors"].values()]
    return ", ".join(parts) or "missing responses"


def json_line(scenario):
    keys = ("mode", "setup", "route", "requests", "concurrency", "delay", "total_s", "rps",
            "model", "model_s", "article_s", "statuses", "workers", "worker_rss_mb", "settings")
    line = {key: scenario[key] for key in keys}
    blocking = scenario["blocking"] or {}  # null for the sync worker: it has no event loop
    line.update(blocks=blocking.get("blocks"), blocked_s=blocking.get("blocked_s"),
                top_culprit=blocking.get("top_culprit"))
    connections = scenario["connections"] or {}  # null where nothing was sampled
    line.update(peak_connections=connections.get("peak"),
                peak_active_connections=connections.get("peak_active"),
                connections_left=connections.get("left"),
                idle_connections_left=connections.get("left_idle"), timeline=scenario["timeline"])
    return json.dumps(line)


# --- The HTML page: one file, no scripts, no network --------------------------------------------

SVG_WIDTH = 960
SVG_LEFT, SVG_RIGHT, SVG_TOP, SVG_AXIS = 20, 24, 20, 30  # margins around the bars, in px
SVG_MAX_BARS_HEIGHT = 420  # many requests share this height rather than make a huge page
SVG_ROW_HEIGHT = 14
TIMELINE_INTRO = ("One bar per request, from when load.py sent it to when its response ended, "
                  "in the order they ended; each scenario has its own time axis. The dashed "
                  "line is the model's total. "
                  "A staircase means the requests waited for each other; a block means they "
                  "overlapped.")

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1000px; margin: 2em auto;
       padding: 0 1em; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.settings { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .3em .7em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child, td.result { text-align: left; }
tr.failed td { background: #fdecea; }
dt { font-weight: 600; } dd { margin: 0 0 .6em 1.5em; }
code, pre { font: 13px ui-monospace, monospace; }
pre { background: #f6f6f6; padding: .5em; white-space: pre-wrap; overflow-wrap: anywhere; }
svg.timeline { display: block; font: 11px system-ui, sans-serif; }
.s2xx { fill: #3a923a; } .s3xx { fill: #3b75af; } .s4xx { fill: #e69f00; } .s5xx { fill: #d62728; }
.error { fill: #fff; stroke: #d62728; stroke-width: 1.5; stroke-dasharray: 3 2; }
.axis line { stroke: #999; } .axis text { fill: #555; }
.model line { stroke: #555; stroke-dasharray: 5 4; } .model text { fill: #555; }
svg.compare { display: block; font: 12px system-ui, sans-serif; }
svg.compare .route { font-weight: 600; } svg.compare .tick { stroke: #222; stroke-width: 2; }
.legend svg { margin-left: 1em; vertical-align: -.1em; }
"""


def check_html_path(path, flag="--html"):
    """Refuse, before anything runs, a page that could not be written at the end: no name, a
    missing folder, a folder for a name, or a file or folder we may not write (read-only,
    another user's). Returns the path, absolute; raises ReportError naming `flag`."""
    if not path:
        raise ReportError(f"{flag} needs a file name")
    target = Path(os.path.abspath(path))
    folder = target.parent
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    except PermissionError:  # a folder on the way we may not even enter (/root, as a user)
        raise ReportError(f"{flag}: cannot write into {folder}: permission denied") from None
    except OSError:  # a file where a folder should be, a loop of links: no such folder
        raise ReportError(f"{flag}: no such directory: {folder}") from None
    if info is not None and S_ISDIR(info.st_mode):
        raise ReportError(f"{flag}: '{path}' is a directory, not a file name")
    if not os.path.isdir(folder):
        raise ReportError(f"{flag}: no such directory: {folder}")
    if info is not None and not os.access(target, os.W_OK):
        raise ReportError(f"{flag}: cannot write {target}: permission denied")
    if info is None and not os.access(folder, os.W_OK | os.X_OK):
        raise ReportError(f"{flag}: cannot write into {folder}: permission denied")
    return target


def write_html(path, scenarios, settings):
    """The page, whole or not at all: a file is written beside PATH and renamed over it once
    complete, so a full disk leaves no half page (and an older page as it was). A PATH that
    is not a file (/dev/stdout, a pipe) is written to directly."""
    page = html_page(scenarios, settings).encode()  # the page says charset=utf-8
    direct = Path(path).exists() and not Path(path).is_file()
    target = Path(path) if direct else Path(os.path.realpath(path))  # through a symlink
    partial = target if direct else target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            out.write(page)
        if not direct:
            if target.exists():  # an older page keeps its permissions
                os.chmod(partial, target.stat().st_mode & 0o7777)
            os.replace(partial, target)
    except OSError as exc:
        if not direct:
            with contextlib.suppress(OSError):
                partial.unlink()
        raise ReportError(f"--html {path}: cannot write the page: {exc.strerror or exc}") from None


def html_page(scenarios, settings):
    title = "Async Workers Lab: which setup overlaps what"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        html_settings(settings),
        "<h2>The setups</h2>",
        html_setup_notes(dict.fromkeys(s["setup"] for s in scenarios)),
        "<h2>Results</h2>",
        html_table(scenarios),
        *(["<h2>Setups side by side</h2>", f"<p>{escape(COMPARE_INTRO)}</p>",
           svg_compare(scenarios)] if len({s["setup"] for s in scenarios}) > 1 else []),
        "<h2>Timelines</h2>",
        f"<p>{escape(TIMELINE_INTRO)}</p>",
        html_legend(),
        *(html_scenario(number, s) for number, s in enumerate(scenarios, 1)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def html_settings(settings):
    (n, c), *others = settings["loads"]
    load = ("each scenario its own n and c" if others
            else f"{n} requests per scenario, {c} at a time")
    counts = set(settings["workers"].values())
    others = ", ".join(f"{setup} {count}" for setup, count in settings["workers"].items()
                       if count != 1)
    per_lab = ("one worker" if counts == {1} else f"{counts.pop()} workers per lab"
               if len(counts) == 1 else f"one worker per lab (workers: {others})")
    return (f'<p class="settings">{load}, {per_lab}; slow HTTP call and pg_sleep '
            f'{settings["delay"]:g} s each. Run on {escape(settings["date"])}.</p>')


def html_setup_notes(setups):
    items = [f"<dt>{escape(name)}</dt><dd>{escape(lab.SETUPS[name].why)}</dd>" for name in setups]
    return "<dl>" + "".join(items) + "</dl>"


def html_table(scenarios):
    head = ("scenario", "measured", "req/s", "model", "measured/model", "article", "memory",
            "blocked", "connections", "result")
    rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for s in scenarios:
        ratio = f"{s['total_s'] / s['model_s']:.2f}\u00d7" if s["model_s"] else "-"
        article = f"{s['article_s']:.2f} s" if s["article_s"] else "-"
        cells = (f"{s['setup']} / {s['route']}", f"{s['total_s']:.3f} s", f"{s['rps']:.2f}",
                 f"{s['model_s']:.2f} s", ratio, article, memory(s), blocked_count(s),
                 peak_connections(s))
        rows.append(f'<tr class="{"ok" if s["ok"] else "failed"}">'
                    + "".join(f"<td>{escape(c)}</td>" for c in cells)
                    + f'<td class="result">{escape(result(s))}</td></tr>')
    return "<table>" + "\n".join(rows) + "</table>"


def html_legend():
    swatches = [("s2xx", "2xx"), ("s4xx", "4xx"), ("s5xx", "5xx"), ("error", "no response")]
    return '<p class="legend">' + "".join(
        f'<svg width="14" height="12"><rect class="swatch {cls}" x="1" y="1" width="12" '
        f'height="10"/></svg> {escape(label)} ' for cls, label in swatches) + "</p>"


def html_scenario(number, s):
    blocking = s["blocking"]
    example = blocking and blocking["example"]
    title = f"{s['setup']} / {s['route']}: GET {s['path']}"
    return "\n".join([
        f'<section class="scenario" id="scenario-{number}">',
        f"<h3>{number}. {escape(title)}</h3>",
        (f"<p>n = {s['requests']}, c = {s['concurrency']}: measured {s['total_s']:.3f} s, "
         f"model {escape(s['model'])} = {s['model_s']:.2f} s: {escape(result(s))}.</p>"),
        svg_timeline(s),
        f'<p class="blocking">{escape(describe_blocking(s["setup"], blocking))}</p>',
        (f'<p class="connections">{escape(describe_connections(s["connections"]))}</p>'
         if s["connections"] else ""),
        f"<p>For example:</p><pre>{escape(example)}</pre>" if example else "",
        "</section>",
    ])


COMPARE_INTRO = ("Each route, every setup that ran it: the bar is the measured total, the tick the "
                 "model's. Bars within a route share one scale; long bars queued, short ones "
                 "overlapped.")
COMPARE_LABEL_WIDTH = 150  # px for the setup names
COMPARE_BAR_HEIGHT, COMPARE_GAP = 16, 4


def svg_compare(scenarios):
    """One group of horizontal bars per route, one bar per setup: which setups overlap what."""
    routes = list(dict.fromkeys(s["route"] for s in scenarios))
    rows = sum(1 + sum(s["route"] == route for s in scenarios) for route in routes)
    height = SVG_TOP + rows * (COMPARE_BAR_HEIGHT + COMPARE_GAP) + 10
    width = SVG_WIDTH - COMPARE_LABEL_WIDTH - 170  # room for the figures after the bar
    parts = [(f'<svg class="compare" width="{SVG_WIDTH}" height="{height}" role="img" '
             'aria-label="measured totals by route and setup" xmlns="http://www.w3.org/2000/svg">')]
    y = SVG_TOP
    for route in routes:
        group = [s for s in scenarios if s["route"] == route]
        span = max(max(s["total_s"], s["model_s"]) for s in group) or 1e-9
        parts.append(f'<text class="route" x="0" y="{y + 12}">{escape(route)}: GET '
                     f'{escape(group[0]["path"])}</text>')
        y += COMPARE_BAR_HEIGHT + COMPARE_GAP
        for s in group:
            length = max(1.0, s["total_s"] / span * width)
            model_x = COMPARE_LABEL_WIDTH + s["model_s"] / span * width
            kind = "s2xx" if s["ok"] else "s5xx"
            parts.append(
                f'<g class="setup" data-scenario="{escape(s["setup"])}/{escape(route)}">'
                f'<text x="{COMPARE_LABEL_WIDTH - 6}" y="{y + 12}" text-anchor="end">'
                f'{escape(s["setup"])}</text>'
                f'<rect class="bar {kind}" x="{COMPARE_LABEL_WIDTH}" y="{y}" width="{length:.1f}" '
                f'height="{COMPARE_BAR_HEIGHT}"><title>{escape(s["setup"])} / {escape(route)}: '
                f'{s["total_s"]:.3f} s, model {escape(s["model"])} = {s["model_s"]:.2f} s'
                f'</title></rect>'
                f'<line class="tick" x1="{model_x:.1f}" y1="{y - 2}" x2="{model_x:.1f}" '
                f'y2="{y + COMPARE_BAR_HEIGHT + 2}"/>'
                f'<text x="{COMPARE_LABEL_WIDTH + width + 8}" y="{y + 12}">'
                f'{s["total_s"]:.2f} s (model {s["model_s"]:.2f} s)</text></g>')
            y += COMPARE_BAR_HEIGHT + COMPARE_GAP
    parts.append("</svg>")
    return "\n".join(parts)


def svg_timeline(s):
    """One <rect class="bar"> per request on a 0..span seconds axis, in the order they ended.

    Requests sent together start within a millisecond of each other, so start order is noise;
    end order turns requests that waited for each other into a clean staircase.
    """
    rows = sorted(s["timeline"], key=lambda row: (row[1], row[0]))
    span = max([s["total_s"], s["model_s"], 1e-9] + [end for _, end, _ in rows])
    row_height = max(1.5, min(SVG_ROW_HEIGHT, SVG_MAX_BARS_HEIGHT / max(len(rows), 1)))
    bars_bottom = SVG_TOP + len(rows) * row_height
    height = bars_bottom + SVG_AXIS

    def x(seconds):
        return SVG_LEFT + seconds / span * (SVG_WIDTH - SVG_LEFT - SVG_RIGHT)

    name = escape(f"{s['setup']}/{s['route']}")
    svg = (f'<svg class="timeline" data-scenario="{name}" width="{SVG_WIDTH}" '
           f'height="{height:.0f}" role="img" aria-label="timeline of {len(rows)} requests" '
           'xmlns="http://www.w3.org/2000/svg">')
    parts = [svg]
    for index, (start, end, status) in enumerate(rows, 1):
        kind = "error" if status is None else f"s{str(status)[0]}xx"
        outcome = "no response" if status is None else f"status {status}"
        top = SVG_TOP + (index - 1) * row_height
        width = max(1.0, x(end) - x(start))  # at least 1 px, so even an instant failure shows
        parts.append(
            f'<rect class="bar {kind}" x="{x(start):.1f}" y="{top:.1f}" width="{width:.1f}" '
            f'height="{row_height * 0.75:.1f}">'
            f"<title>request {index}: {start:.3f} to {end:.3f} s ({end - start:.3f} s), "
            f"{outcome}</title></rect>")
    parts.append(svg_axis(span, bars_bottom, x))
    parts.append(f'<g class="model"><line x1="{x(s["model_s"]):.1f}" y1="{SVG_TOP - 6}" '
                 f'x2="{x(s["model_s"]):.1f}" y2="{bars_bottom:.1f}"/>'
                 f'<text x="{x(s["model_s"]) + 4:.1f}" y="{SVG_TOP - 8}">model</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_axis(span, top, x):
    """A time axis under the bars: a tick and a label every 1, 2 or 5 times a power of ten."""
    step = tick_step(span)
    y = top + 4
    parts = ['<g class="axis">',
             f'<line x1="{x(0):.1f}" y1="{y:.1f}" x2="{x(span):.1f}" y2="{y:.1f}"/>']
    for i in range(int(span / step + 1e-9) + 1):
        seconds = round(i * step, 9)  # 3 * 0.1 would print as 0.30000000000000004
        parts.append(f'<line x1="{x(seconds):.1f}" y1="{y:.1f}" x2="{x(seconds):.1f}" '
                     f'y2="{y + 5:.1f}"/><text x="{x(seconds):.1f}" y="{y + 18:.1f}" '
                     f'text-anchor="middle">{seconds:g} s</text>')
    return "".join(parts) + "</g>"


def tick_step(span, most=10):
    """The smallest of 1, 2, 5 x 10^k that puts at most `most` intervals on 0..span."""
    magnitude = 10 ** math.floor(math.log10(span / most))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude * most >= span)


# --- Command line -------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ReportError(f"{message} (see --help)")


def parse_args(argv):
    parser = OneLineParser(
        prog=PROG, description=__doc__.splitlines()[0],
        epilog="report.py blocking NN-SETUP-ROUTE.json prints what blocked one scenario's loop. "
        "Exit status: 0 when every response was a 200, 1 when some were not, 2 for bad input "
        "or an --html page not written.")
    parser.add_argument("--delay", type=float, required=True, help="the run's delay, seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument("--html", metavar="FILE", help="also write the report as one HTML page")
    parser.add_argument("files", nargs="+", help="NN-SETUP-ROUTE.json files from load.py")
    args = parser.parse_args(argv)
    if not (0 < args.delay <= lab.MAX_SLEEP):
        raise ReportError(f"--delay must be above 0 and at most {lab.MAX_SLEEP:g} seconds")
    if args.html:
        folder = Path(args.html).resolve().parent
        if not folder.is_dir():
            raise ReportError(f"--html: no such directory: {folder}")
        if Path(args.html).is_dir():
            raise ReportError(f"--html: '{args.html}' is a directory, not a file name")
    return args


def print_blocking(argv):
    """`report.py blocking NN-SETUP-ROUTE.json [--lab-pid PID]`: the scenario's "Event loop:"
    line; with the lab's PID, also its workers' memory, kept beside the figures."""
    parser = OneLineParser(prog=f"{PROG} blocking",
                           description="What blocked a scenario's event loop.")
    parser.add_argument("figures", help="the scenario's load.py figures, NN-SETUP-ROUTE.json")
    parser.add_argument("--lab-pid", type=int, help="the lab's Gunicorn master: measure its "
                        "workers' memory and save it (JSON) as NN-SETUP-ROUTE.workers")
    args = parser.parse_args(argv)
    setup, _ = scenario_name(args.figures)
    figures = read_figures(args.figures)
    line = describe_blocking(setup, blocking_of(args.figures, setup, figures))
    # What the sampler has seen so far: its last look may be up to one period old.
    connections = connections_of(args.figures, setup, figures,
                                 until=time.time() - sampler.SAMPLE_PERIOD)
    if connections is not None:
        line += "\n" + describe_connections(connections)
    if args.lab_pid:
        workers = worker_memory(args.lab_pid)
        Path(args.figures).with_suffix(".workers").write_text(json.dumps(workers))
        line += (f"; {workers['workers']} worker{'s' * (workers['workers'] != 1)}, "
                 f"{workers['rss_bytes'] / 2**20:.0f} MB resident")
    print(line)
    return 0


def worker_memory(master):
    """{"workers": count, "rss_bytes": their resident memory, summed}: the Gunicorn master's
    children, found in /proc (Linux)."""
    rss, count = 0, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != master:  # the parent's PID
                continue
            if b"labkit.sampler" in (stat.parent / "cmdline").read_bytes():
                continue  # the lab's connection sampler, not a worker
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        kb = next((int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:")), 0)
        rss, count = rss + kb * 1024, count + 1
    return {"workers": count, "rss_bytes": rss}


def run_settings(args, scenarios):
    """What the HTML page says about the run: n and c, when every scenario has the same (run_all.sh
    --scale gives each its own), and how many workers each lab ran."""
    loads = {(s["requests"], s["concurrency"]) for s in scenarios}
    workers = {s["setup"]: s["workers"] or s["settings"].get("workers", 1) for s in scenarios}
    return {"loads": sorted(loads), "workers": workers, "delay": args.delay,
            "date": datetime.now().strftime("%Y-%m-%d %H:%M")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["blocking"]:
            return print_blocking(argv[1:])
        args = parse_args(argv)
        scenarios = [load_scenario(path, args.delay) for path in sorted(args.files)]
        if args.json:
            for scenario in scenarios:
                print(json_line(scenario))
        else:
            print(format_table(scenarios))
        if args.html:
            write_html(args.html, scenarios, run_settings(args, scenarios))
    except (ReportError, OSError) as exc:
        sys.stdout.flush()  # what was printed (the table, the JSON lines) first, then the error
        message = exc if isinstance(exc, ReportError) else f"{exc.strerror}: {exc.filename}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    return 0 if all(s["ok"] for s in scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
