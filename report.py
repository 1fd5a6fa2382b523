"""Put the lab's scenarios side by side: measured total, the model's time, the article's figure.

run_all.sh saves each scenario's figures as load.py JSON, named NN-MODE-ROUTE.json, and the lab's
server log next to it as NN-MODE-ROUTE.log, and calls

    python report.py blocking RESULTS_DIR/NN-MODE-ROUTE.log  # one line: what blocked the loop
    python report.py --delay 1 RESULTS_DIR/*.json            # the results table
    python report.py --delay 1 --json RESULTS_DIR/*.json     # one JSON object per scenario
    python report.py --delay 1 --html report.html RESULTS_DIR/*.json   # also a one-file page

The model is the lesson in one line per mode (h = HTTP delay, d = DB delay, n requests sent c at a
time, one worker; ceil(n/c) "rounds" where waits overlap):
    nothing     one request at a time:                    n * (time of one request)
    almost_all  HTTP waits overlap, psycopg2 blocks all:  http: rounds*h   db: n*d   both: h + n*d
    all         every wait overlaps:                      rounds * (time of one request)

The server log backs the model with evidence: in the gevent modes lab.py logs one line each time
the event loop was blocked, naming the library call and the view that made it.
"""

import argparse
import json
import math
import re
import sys
from collections import Counter
from datetime import datetime
from html import escape
from pathlib import Path

ROUTES = {
    "http": "/only-http-call/",
    "db": "/only-database-call/",
    "both": "/both-http-and-database-calls/",
    "fanout": "/only-http-do-ten_calls_with_gevent/",
}
FAN_OUT_CALLS = 10  # lab.py makes this many slow calls in the fan-out route
# lab.py's view functions: the frame that says which route blocked the event loop.
LAB_VIEWS = {"only_http_call", "only_database_call", "both_http_and_database_calls",
             "ten_calls_with_gevent"}

# The article's totals for hey -n 10 -c 10 at 1 s delays (seconds).
ARTICLE_TOTALS = {
    ("nothing", "both"): 20.88,
    ("almost_all", "both"): 11.25,
    ("almost_all", "http"): 1.04,
    ("almost_all", "db"): 10.17,
    ("all", "db"): 1.105,
    ("all", "both"): 2.135,
}

MODE_NOTES = {
    "nothing": "Gunicorn's sync worker: one request at a time. Every wait, HTTP or database, "
               "holds the only worker, so n requests take n times one request.",
    "almost_all": "gevent worker, monkey-patched stdlib: waits on Python sockets (the slow HTTP "
                  "call) yield to other requests, but psycopg2 waits inside libpq, which gevent "
                  "cannot see, so each query blocks the whole event loop.",
    "all": "gevent worker plus psycopg2's wait callback (psycogreen): libpq runs non-blocking "
           "and hands each wait to gevent, so database waits overlap too.",
}

# lab.py's --monitor-threshold default, which run_all.sh keeps: shorter blocks are not logged.
MONITOR_THRESHOLD_S = 0.1
# One line of lab.py's server log per blocked stretch (after Gunicorn's "[date] [pid] [LEVEL] "),
# e.g. "event loop blocked for 1.002 s in psycopg2 execute (django/db/backends/utils.py:105
# _execute) from lab.py:452 sleep_in_database <- lab.py:470 only_database_call".
BLOCK_LINE = re.compile(r"event loop blocked for (?P<seconds>[0-9.]+) s in (?P<culprit>.+?) "
                        r"\((?P<where>[^)]*)\)(?: from (?P<caller>.*))?$")


# --- The model ----------------------------------------------------------------------------------

def request_time(mode, route, h, d):
    """How long one request takes when nothing else is running."""
    if route == "fanout":
        return FAN_OUT_CALLS * h if mode == "nothing" else h
    return {"http": h, "db": d, "both": h + d}[route]


def model_seconds(mode, route, n, c, h, d):
    """The total the model predicts for n requests sent c at a time to one worker."""
    rounds = math.ceil(n / c)
    if mode == "nothing":
        return n * request_time(mode, route, h, d)
    if mode == "almost_all":
        # The slow service keeps sleeping while the worker is stuck in psycopg2, so HTTP waits
        # hide behind DB waits; DB waits never overlap.
        return {"http": rounds * h, "fanout": rounds * h, "db": n * d, "both": h + n * d}[route]
    return rounds * request_time(mode, route, h, d)


# --- One scenario: its figures, its timeline, its server log ------------------------------------

def scenario_name(path):
    """(mode, route) from NN-MODE-ROUTE.json or .log."""
    _, mode, route = Path(path).stem.split("-", 2)
    return mode, route


def load_scenario(path, delay):
    """One load.py JSON file plus the model, the article and the server log's blocking lines."""
    mode, route = scenario_name(path)
    figures = json.loads(Path(path).read_text())
    n, c = figures["requests"], figures["concurrency"]
    model = model_seconds(mode, route, n, c, delay, delay)
    article = ARTICLE_TOTALS.get((mode, route)) if (n, c, delay) == (10, 10, 1.0) else None
    log = Path(path).with_suffix(".log")
    return {
        "mode": mode,
        "route": route,
        "path": ROUTES[route],
        "requests": n,
        "concurrency": c,
        "delay": delay,
        "total_s": figures["total_s"],
        "rps": figures["rps"],
        "model_s": round(model, 6),
        "article_s": article,
        "statuses": figures["status_codes"],
        "errors": figures["errors"],
        "ok": ok(figures, n),
        "timeline": timeline(figures),
        "blocking": blocking_summary(log) if mode != "nothing" and log.exists() else None,
        "figures": figures,
    }


def ok(figures, n):
    """A scenario passes only if every request it sent got a 200."""
    return figures["status_codes"] == {"200": n} and not figures["errors"]


def timeline(figures):
    """[[start_s, end_s, status], ...] in start order; status is None when no response came."""
    rows = sorted(figures["timeline"], key=lambda r: (r["start_s"], r["end_s"]))
    return [[r["start_s"], r["end_s"], r["status"]] for r in rows]


def parse_block_line(line):
    """A blocking line of the server log as a dict (seconds, culprit, where, caller), else None."""
    match = BLOCK_LINE.search(line.rstrip())
    if not match:
        return None
    block = match.groupdict()
    block["seconds"] = float(block["seconds"])
    return block


def culprit_label(block):
    """'psycopg2 execute from only_database_call': the library call and the view that made it.

    The caller lists the lab's frames innermost first ("lab.py:452 sleep_in_database <-
    lab.py:470 only_database_call <- lab.py:450 middleware"). Middleware and decorators wrap
    every view, so the view is picked by name; failing that, the innermost frame is the best clue.
    """
    functions = [frame.split()[-1] for frame in (block["caller"] or "").split(" <- ") if frame]
    views = [name for name in functions if name in LAB_VIEWS]
    where = views[-1] if views else functions[0] if functions else None
    return f"{block['culprit']} from {where}" if where else block["culprit"]


def blocking_summary(log_path):
    """What blocked the event loop, from a gevent scenario's server log.

    {"blocks": count, "blocked_s": total seconds, "top_culprit": "psycopg2 execute from
    only_database_call (10x)" or None, "example": the first blocking line or None}
    """
    lines = Path(log_path).read_text(errors="replace").splitlines()
    found = [(line, block) for line in lines if (block := parse_block_line(line))]
    labels = Counter(culprit_label(block) for _, block in found)
    top = labels.most_common(1)
    return {
        "blocks": len(found),
        "blocked_s": round(sum(block["seconds"] for _, block in found), 3),
        "top_culprit": f"{top[0][0]} ({top[0][1]}x)" if top else None,
        "example": found[0][0].strip() if found else None,
    }


def describe_blocking(mode, blocking):
    """The one line run_all.sh prints after each scenario's load report."""
    if mode == "nothing":
        return "Event loop: (sync worker: no event loop)"
    if blocking is None:
        return "Event loop: (no server log)"
    if not blocking["blocks"]:
        return f"Event loop: never blocked over {MONITOR_THRESHOLD_S} s"
    count = blocking["blocks"]
    return (f"Event loop: blocked {count} time{'s' * (count != 1)} "
            f"({blocking['blocked_s']:.1f} s in all); top culprit: {blocking['top_culprit']}")


# --- Text and JSON -----------------------------------------------------------------------------

def format_table(scenarios):
    header = (f"{'scenario':<22} {'measured':>10} {'req/s':>7} {'model':>8} {'vs model':>9} "
              f"{'article':>8} {'blocked':>7}  result")
    lines = [header]
    for s in scenarios:
        article = f"{s['article_s']:.2f} s" if s["article_s"] else "-"
        lines.append(
            f"{s['mode'] + ' / ' + s['route']:<22} {s['total_s']:>8.3f} s {s['rps']:>7.2f} "
            f"{s['model_s']:>6.2f} s {over_model(s):>+8.1f}% {article:>8} "
            f"{blocked_count(s):>7}  {result(s)}"
        )
    return "\n".join(lines)


def over_model(scenario):
    """How much slower than the model, in percent."""
    if not scenario["model_s"]:
        return 0.0
    return (scenario["total_s"] / scenario["model_s"] - 1) * 100


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
    keys = ("mode", "route", "requests", "concurrency", "delay", "total_s", "rps", "model_s",
            "article_s", "statuses")
    line = {key: scenario[key] for key in keys}
    blocking = scenario["blocking"] or {}  # null for the sync worker: it has no event loop
    line.update(blocks=blocking.get("blocks"), blocked_s=blocking.get("blocked_s"),
                top_culprit=blocking.get("top_culprit"), timeline=scenario["timeline"])
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
.legend svg { margin-left: 1em; vertical-align: -.1em; }
"""


def write_html(path, scenarios, settings):
    Path(path).write_text(html_page(scenarios, settings))


def html_page(scenarios, settings):
    title = "Async Workers Lab: sync worker vs gevent"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        html_settings(settings),
        "<h2>The three modes</h2>",
        html_mode_notes(),
        "<h2>Results</h2>",
        html_table(scenarios),
        "<h2>Timelines</h2>",
        f"<p>{escape(TIMELINE_INTRO)}</p>",
        html_legend(),
        *(html_scenario(number, s) for number, s in enumerate(scenarios, 1)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def html_settings(settings):
    return (f'<p class="settings">{settings["requests"]} requests per scenario, '
            f'{settings["concurrency"]} at a time, one worker; slow HTTP call and pg_sleep '
            f'{settings["delay"]:g} s each. Run on {escape(settings["date"])}.</p>')


def html_mode_notes():
    items = [f"<dt>{escape(mode)}</dt><dd>{escape(note)}</dd>" for mode, note in MODE_NOTES.items()]
    return "<dl>" + "".join(items) + "</dl>"


def html_table(scenarios):
    head = ("scenario", "measured", "req/s", "model", "measured/model", "article", "blocked",
            "result")
    rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for s in scenarios:
        ratio = f"{s['total_s'] / s['model_s']:.2f}\u00d7" if s["model_s"] else "-"
        article = f"{s['article_s']:.2f} s" if s["article_s"] else "-"
        cells = (f"{s['mode']} / {s['route']}", f"{s['total_s']:.3f} s", f"{s['rps']:.2f}",
                 f"{s['model_s']:.2f} s", ratio, article, blocked_count(s))
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
    title = f"{s['mode']} / {s['route']}: GET {s['path']}"
    return "\n".join([
        f'<section class="scenario" id="scenario-{number}">',
        f"<h3>{number}. {escape(title)}</h3>",
        f"<p>Measured {s['total_s']:.3f} s, model {s['model_s']:.2f} s: {escape(result(s))}.</p>",
        svg_timeline(s),
        f'<p class="blocking">{escape(describe_blocking(s["mode"], blocking))}</p>',
        f"<p>For example:</p><pre>{escape(example)}</pre>" if example else "",
        "</section>",
    ])


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

    name = escape(f"{s['mode']}/{s['route']}")
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

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="report.py", description=__doc__.splitlines()[0],
        epilog="report.py blocking FILE.log prints what blocked one scenario's event loop.")
    parser.add_argument("--delay", type=float, required=True, help="the run's delay, seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument("--html", metavar="FILE", help="also write the report as one HTML page")
    parser.add_argument("files", nargs="+", help="NN-MODE-ROUTE.json files from load.py")
    return parser.parse_args(argv)


def print_blocking(argv):
    """`report.py blocking NN-MODE-ROUTE.log`: the scenario's one "Event loop:" line."""
    parser = argparse.ArgumentParser(prog="report.py blocking",
                                     description="What blocked a scenario's event loop.")
    parser.add_argument("log", help="the lab's server log, named NN-MODE-ROUTE.log")
    log = Path(parser.parse_args(argv).log)
    if not log.is_file():
        parser.error(f"no such file: {log}")
    mode, _ = scenario_name(log)
    print(describe_blocking(mode, None if mode == "nothing" else blocking_summary(log)))
    return 0


def run_settings(args, scenarios):
    """What the HTML page says about the run: run_all.sh sends every scenario the same n and c."""
    return {"requests": scenarios[0]["requests"], "concurrency": scenarios[0]["concurrency"],
            "delay": args.delay, "date": datetime.now().strftime("%Y-%m-%d %H:%M")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
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
    return 0 if all(s["ok"] for s in scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
