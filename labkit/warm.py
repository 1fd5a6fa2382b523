"""Warm-up: first-use costs out of the timed requests, with no change to what overlaps.

A worker that has just booted pays, in its first requests, for imports (Django's PostgreSQL
backend, the driver, urllib's handlers), compiled URL patterns and new connections: a forked
PostgreSQL backend each (~3 ms alone, ~25 ms for ten at once on two cores) and a TCP connect
to the slow service. Tens of milliseconds that a measured request should not carry. So, in
each worker, once Django is set up (lab.build_application calls warm_up):

- keep_database_connections: finished requests hand their PostgreSQL connection to the next
  one (Django closes it at the end of each request; under gevent every request is a new
  greenlet, so no connection would ever be reused);
- the slow service's client keeps its connections open between calls (PooledSlowService,
  which lab.py uses in place of its one-GET-per-call client when the kit is there), and opens
  them now;
- the worker serves one request to itself.
"""

import socket
import urllib.parse

import lab as app
from labkit import procs


def warm_up(application, lab):
    """Everything above, for the worker's WSGI or ASGI application; `lab`: its lab.Lab."""
    options = lab.options
    keeps = not options.pool and not options.conn_max_age  # else Django keeps them itself
    keep_database_connections(options.kit.db_pool if keeps else 0)
    forget_no_query_log()
    if app.SERVERS[lab.setup.server].app == "asgi":
        warm_up_asgi(application, lab)
    else:
        warm_up_wsgi(application, lab)


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


def warm_up_wsgi(application, lab):
    """Pay first-use costs before the first request is timed, not inside it.

    A fresh worker's first request imports Django's PostgreSQL backend, psycopg2 and urllib's
    handlers, compiles the URL patterns and forks PostgreSQL backends for its connections: tens
    of milliseconds that a measured request should not carry. So the worker serves one request
    to itself first. A database that is down is not fatal here: the views answer 503 until it
    is back.
    """
    import io

    lab.slow_service.warm()
    if not open_idle_database_connections():
        return  # no request to ourselves: it would only log a 503
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": app.ROUTES["db"].path,
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
        procs.log_line(f"database unavailable as this worker boots ({reason}): its database routes "
                 "answer 503 until it is back")
        return False
    finally:
        connection.close()


def warm_up_asgi(application, lab):
    """warm_up_wsgi() for an ASGI server: one request to itself, on the worker's own loop."""
    import asyncio

    from asgiref.sync import sync_to_async

    loop = asyncio.get_event_loop()  # the asgi worker's, set before it loads the app
    lab.slow_service.warm()
    loop.run_until_complete(sync_to_async(open_idle_database_connections)())
    loop.run_until_complete(lab.async_slow_service.warm())
    path = app.ROUTES["db"].path
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"seconds_to_sleep=0", "root_path": "",
             "headers": [(b"host", b"localhost")], "server": ("localhost", 80),
             "client": ("127.0.0.1", 0)}
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message):
        pass

    loop.run_until_complete(application(scope, receive, send))


class PooledSlowService(app.SlowService):
    """A client for slow_server.py that keeps its connections open between calls.

    A new TCP connection per call costs the worker about as much CPU as the rest of the call:
    a hundred calls at once add tens of milliseconds to a one-second wait. Like any pooling
    HTTP client (urllib3, requests.Session), this keeps up to `keep` idle connections, and
    warm() opens them at boot. Any greenlet may take any idle connection: each call holds its
    own while it waits, so nothing about the overlap changes.
    """

    def __init__(self, base_url, timeout, keep):
        import http.client

        base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(base_url)
        self.connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                                 else http.client.HTTPConnection)
        self.host, self.port = parts.hostname, parts.port
        self.url = base_url
        self.path = parts.path.rstrip("/") + "/api/v1/movies"
        self.timeout, self.keep, self.idle = timeout, keep, []
        self.address = None  # (family, type, proto, sockaddr), resolved once: see resolve()

    def warm(self):
        self.resolve()
        while len(self.idle) < self.keep:
            conn = self.new_connection()
            try:
                conn.connect()
            except OSError:
                return  # the service is down: calls will say so
            self.idle.append(conn)

    def resolve(self):
        """Look the service's name up once, at boot. socket.create_connection() looks it up
        at every connect, and under gevent each lookup, even of 127.0.0.1, is a round trip
        through a thread pool: at 1,000 requests at once that was a fifth of the worker's CPU."""
        try:
            self.address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        except (OSError, UnicodeError):
            pass  # connects will look it up, and say what is wrong

    def new_connection(self):
        conn = self.connection_class(self.host, self.port, timeout=self.timeout)
        if self.address is not None:
            conn._create_connection = self.connect  # http.client's hook for making the socket
        return conn

    def connect(self, address, timeout, source_address=None):
        family, kind, proto, _, sockaddr = self.address
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
            raise app.SlowServiceError(504, f"slow service at {self.url} did not answer within "
                                        f"{self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise app.SlowServiceError(502, f"slow service unreachable at {self.url}: {reason} "
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
        return app.movie_from(self.url, response.status, body)
