"""The plan: what each setup's model predicts, which scenarios a run measures, and the
article's figures beside them.

lab.py holds the lesson as data: each setup's model per route (Setup.model), each route's
time alone (Route.alone), each server's requests at once per worker (Server.slots). This
module evaluates them and lists what run_all runs; report.py, the tests and the benches read
it, so that a model is written once.

    python lab.py --list [--all] [--json]      the scenarios of ./run_all.sh [--all]
    python lab.py --list --scale [--json]      those of ./run_all.sh --scale
"""

import json
import math
import os

import lab

# --- The models ----------------------------------------------------------------------------
# A model is a formula of h (the slow HTTP call), d (pg_sleep), n requests sent c at a time,
# t (one request alone: the route's `alone`), k (calls per fan-out request), p (CPU seconds of
# the CPU route), workers, pool and rounds = ceil(n / min(c, workers x slots)), where one
# worker runs `slots` requests at once (its server's entry says how many).

VARIABLES = {"h": "slow HTTP call, s", "d": "pg_sleep, s", "n": "requests", "c": "concurrency",
             "rounds": "ceil(n / min(c, workers x requests a worker runs at once))",
             "workers": "server processes (--workers)",
             "pool": "setup pooled: PostgreSQL connections a worker holds at most",
             "k": f"calls per fan-out request ({lab.FAN_OUT_CALLS})",
             "p": f"CPU seconds of one /cpu/ request ({lab.CPU_SECONDS:g})",
             "cores": "the machine's cores",
             "t": "one request alone (the route's `alone`)"}


def model_formula(setup, route):
    """The formula for SETUP on ROUTE, None where the setup does not run it."""
    model = lab.SETUPS[setup].model
    if route in model:
        return model[route]
    return lab.ROUTES[route].model or model["*"]


def pool_size(setup, settings=None):
    """A worker's most PostgreSQL connections under Django's pool (settings' "pool_size", from
    --pool-size, else the setup's max_size); without a pool, no limit from the lab."""
    given = (settings or {}).get("pool_size")
    if given is not None:
        return given
    return lab.SETUPS[setup].pool["max_size"] if lab.SETUPS[setup].pool else math.inf


def model_seconds(setup, route, n, c, h, d, p=lab.CPU_SECONDS, settings=None, cores=None):
    """The total the model predicts for n requests sent c at a time. `settings`: the lab's
    flags where a run changes them (workers, threads, worker_connections, pool_size)."""
    formula = model_formula(setup, route)
    if formula is None:
        return None
    workers = lab.server_settings(setup, settings)["workers"]
    names = {"h": h, "d": d, "n": n, "c": c, "p": p, "k": lab.FAN_OUT_CALLS,
             "workers": workers, "cores": cores or os.cpu_count() or 1,
             "pool": pool_size(setup, settings), "ceil": math.ceil, "min": min}
    names["rounds"] = math.ceil(n / min(c, workers * lab.worker_slots(setup, settings)))
    names["t"] = eval(lab.ROUTES[route].alone, {"__builtins__": {}}, names)  # our text, not input
    return eval(formula, {"__builtins__": {}}, names)


# --- The scenarios -------------------------------------------------------------------------
# What ./run_all.sh runs: the article's six scenarios (its totals for hey -n 10 -c 10 at 1 s
# delays), then the fan-out route. `./run_all.sh --all` runs every setup with every route.

SCENARIOS = [
    ("nothing", "both", 20.88),
    ("almost_all", "both", 11.25),
    ("almost_all", "http", 1.04),
    ("almost_all", "db", 10.17),
    ("all", "db", 1.105),
    ("all", "both", 2.135),
    ("all", "fanout", None),
]
# Left out of --all: they only repeat a lesson, slowly (nothing/fanout alone is 100 h).
TOO_SLOW_FOR_ALL = {("nothing", "fanout"), ("processes", "fanout")}


def scenarios(every=False):
    """[(setup, route, article total or None)]: the default run, or every setup x route."""
    if not every:
        return list(SCENARIOS)
    article = {(s, r): total for s, r, total in SCENARIOS}
    return [(s, r, article.get((s, r))) for s in lab.SETUPS for r in lab.ROUTES
            if model_formula(s, r) is not None and (s, r) not in TOO_SLOW_FOR_ALL]


def article_total(setup, route):
    return next((total for s, r, total in SCENARIOS if (s, r) == (setup, route)), None)


# --- At scale: PostgreSQL's connection limit, and a pool that stays under it ---------------
# Every request in flight on the database route holds a PostgreSQL connection, a backend
# process: c at once need c connections, and past the server's max_connections the rest are
# refused: 503 "too many clients already". A pool caps what a worker holds at `pool`; requests
# beyond it wait for a free connection (up to its timeout, then a 503 that says so).
#
# What `./run_all.sh --scale` runs, against an embedded PostgreSQL with max_connections =
# SCALE_MAX_CONNECTIONS: (setup, route, n, c). Each setup's lab runs with its SCALE_SETTINGS
# (flags of lab.py, `_` for `-`), and no lab keeps idle connections (db_pool 0), so that one
# lab's burst is not refused because the idle ones of the others fill the server.

SCALE_MAX_CONNECTIONS = 100
SCALE_SETTINGS = {
    "*": {"db_pool": 0},
    "all": {"worker_connections": 1000},
    "pooled": {"worker_connections": 1000},
    "asgi": {"worker_connections": 1000},
    "threads": {"threads": 50},
}
SCALE_SCENARIOS = [
    ("almost_all", "http", 1000, 1000),  # the article's 50 a worker: ceil(1000/50) = 20 rounds
    ("all", "http", 1000, 1000),  # 1,000 a worker: one round, as far as its CPU keeps up
    ("nothing", "db", 10, 10),  # connections held at once: 1
    ("threads", "db", 50, 50),  # one per busy thread: c
    ("asgi", "db", 50, 50),  # one per sync_to_async thread: c
    ("all", "db", 300, 300),  # past max_connections: 503 "too many clients", then recovery
    # Last: the pool keeps what it opened (up to max_size, for max_idle = 10 min), which would
    # leave the scenarios after it less of the server.
    ("pooled", "db", 300, 300),  # at most 50 connections: ceil(300/50) = 6 rounds, no errors
]


def scale_settings(setup):
    """The lab flags `./run_all.sh --scale` gives SETUP (see SCALE_SETTINGS)."""
    return {**SCALE_SETTINGS["*"], **SCALE_SETTINGS.get(setup, {})}


# --- `lab.py --list` -------------------------------------------------------------------------

def describe_lab(every=False):
    """SETUPS, SERVERS, ROUTES and the scenarios as plain JSON-ready data."""
    return {
        "variables": VARIABLES,
        "servers": {name: {"event_loop": s.event_loop, "slots": s.slots, "app": s.app,
                           "modules": list(s.modules)} for name, s in lab.SERVERS.items()},
        "setups": {name: {"server": s.server, "story": s.story, "why": s.why,
                          "model": s.model, "cooperative_driver_hook": getattr(
                              s.post_fork, "__name__", None), "fan_out": s.fan_out,
                          "settings": lab.server_settings(name)}
                   for name, s in lab.SETUPS.items()},
        "routes": {name: {"path": r.path, "view": r.view.__name__, "alone": r.alone,
                          "says": r.says} for name, r in lab.ROUTES.items()},
        "scenarios": [{"setup": s, "route": r, "path": lab.ROUTES[r].path,
                       "model": model_formula(s, r), "article_s": article}
                      for s, r, article in scenarios(every)],
    }


def scale_rows():
    return [{"setup": setup, "route": route, "path": lab.ROUTES[route].path,
             "model": model_formula(setup, route), "requests": n, "concurrency": c,
             "settings": scale_settings(setup), "max_connections": SCALE_MAX_CONNECTIONS}
            for setup, route, n, c in SCALE_SCENARIOS]


def print_list(every=False, as_json=False, scale=False):
    """One line a scenario, for shell scripts: SETUP ROUTE PATH MODEL, and with --scale also
    N C --FLAG=VALUE...; or all of it as JSON."""
    if scale:
        rows = scale_rows()
        if as_json:
            print(json.dumps(rows, indent=2))
            return 0
        for row in rows:
            flags = " ".join(f"--{key.replace('_', '-')}={value}"
                             for key, value in row["settings"].items())
            print(row["setup"], row["route"], row["path"], row["model"].replace(" ", ""),
                  row["requests"], row["concurrency"], flags)
        return 0
    if as_json:
        print(json.dumps(describe_lab(every), indent=2))
        return 0
    for setup, route, _ in scenarios(every):
        print(setup, route, lab.ROUTES[route].path, model_formula(setup, route).replace(" ", ""))
    return 0
