"""Put the lab's scenarios side by side: measured total, the model's time, the article's figure.

run_all.sh saves each scenario's figures as load.py JSON, named NN-MODE-ROUTE.json, and calls

    python report.py --delay 1 RESULTS_DIR/*.json            # the results table
    python report.py --delay 1 --json RESULTS_DIR/*.json     # one JSON object per scenario

The model is the lesson in one line per mode (h = HTTP delay, d = DB delay, n requests sent c at a
time, one worker; ceil(n/c) "rounds" where waits overlap):
    nothing     one request at a time:                    n * (time of one request)
    almost_all  HTTP waits overlap, psycopg2 blocks all:  http: rounds*h   db: n*d   both: h + n*d
    all         every wait overlaps:                      rounds * (time of one request)
"""

import argparse
import json
import math
import sys
from pathlib import Path

ROUTES = {
    "http": "/only-http-call/",
    "db": "/only-database-call/",
    "both": "/both-http-and-database-calls/",
    "fanout": "/only-http-do-ten_calls_with_gevent/",
}
FAN_OUT_CALLS = 10  # lab.py makes this many slow calls in the fan-out route

# The article's totals for hey -n 10 -c 10 at 1 s delays (seconds).
ARTICLE_TOTALS = {
    ("nothing", "both"): 20.88,
    ("almost_all", "both"): 11.25,
    ("almost_all", "http"): 1.04,
    ("almost_all", "db"): 10.17,
    ("all", "db"): 1.105,
    ("all", "both"): 2.135,
}


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


def load_scenario(path, delay):
    """One load.py JSON file, named NN-MODE-ROUTE.json, plus the model and the article."""
    _, mode, route = Path(path).stem.split("-", 2)
    figures = json.loads(Path(path).read_text())
    n, c = figures["requests"], figures["concurrency"]
    model = model_seconds(mode, route, n, c, delay, delay)
    article = ARTICLE_TOTALS.get((mode, route)) if (n, c, delay) == (10, 10, 1.0) else None
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
        "figures": figures,
    }


def ok(figures, n):
    """A scenario passes only if every request it sent got a 200."""
    return figures["status_codes"] == {"200": n} and not figures["errors"]


def format_table(scenarios):
    header = (f"{'scenario':<22} {'measured':>10} {'req/s':>7} {'model':>8} {'vs model':>9} "
              f"{'article':>8}  result")
    lines = [header]
    for s in scenarios:
        over = (s["total_s"] / s["model_s"] - 1) * 100 if s["model_s"] else 0.0
        article = f"{s['article_s']:.2f} s" if s["article_s"] else "-"
        result = "ok" if s["ok"] else "FAILED " + describe_failures(s)
        lines.append(
            f"{s['mode'] + ' / ' + s['route']:<22} {s['total_s']:>8.3f} s {s['rps']:>7.2f} "
            f"{s['model_s']:>6.2f} s {over:>+8.1f}% {article:>8}  {result}"
        )
    return "\n".join(lines)


def describe_failures(scenario):
    parts = [f"{count}x{status}" for status, count in scenario["statuses"].items()
             if status != "200"]
    parts += [f"{count}x error" for count in scenario["errors"].values()]
    return ", ".join(parts) or "missing responses"


def json_line(scenario):
    keys = ("mode", "route", "requests", "concurrency", "delay", "total_s", "rps", "model_s",
            "article_s", "statuses")
    return json.dumps({key: scenario[key] for key in keys})


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, required=True, help="the run's delay, seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument("files", nargs="+", help="NN-MODE-ROUTE.json files from load.py")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    scenarios = [load_scenario(path, args.delay) for path in sorted(args.files)]
    if args.json:
        for scenario in scenarios:
            print(json_line(scenario))
    else:
        print(format_table(scenarios))
    return 0 if all(s["ok"] for s in scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
