"""A deliberately slow HTTP service: the dependency in the Async Workers Lab.

The lab asks how a Django app behaves under Gunicorn's sync and gevent workers
when its views wait on something slow.  This server is that something: every
request to /api/v1/movies waits a fixed delay, then answers with a small JSON
object.  For the numbers to mean anything, the slow service itself must never
be the bottleneck, so:

* every connection gets its own thread, and the wait is a plain time.sleep(),
  so 1,000 concurrent requests each wait the delay once, side by side;
* the listen backlog is large: the stdlib default of 5 makes the kernel drop
  bursts of new connections, and the retries add whole seconds to timings;
* HTTP/1.1 keep-alive works, so clients that reuse connections can, and no
  answer is held back 40 ms by Nagle's algorithm on a reused connection.

Whatever is slow in a measurement is therefore the app, not this server.

Run it (stdlib only, Python 3.11+):

    python slow_server.py                       # http://127.0.0.1:8001, delay 1.0 s
    python slow_server.py --bind :9000 --delay 0.25
    python slow_server.py --bind 127.0.0.1:0    # any free port; the startup line says which

    curl 'http://127.0.0.1:8001/api/v1/movies?delay=0.2'

Endpoints (GET or HEAD; other methods get 405):

    /api/v1/movies[?delay=SECONDS]  {"character": ..., "movie": ...} after the delay
                                    (0 to 60 s; anything else is a 400)
    /healthz                        {"status": "ok"} at once

Every answer, errors included, is JSON with a Content-Length.

Output: one startup line on stderr, "slow_server: serving on http://HOST:PORT
(delay D s)", then one JSON access-log line per request on stdout with the
fields time, client, method, path, status, bytes (body bytes) and duration_s.

Exit codes: 0 after SIGINT or SIGTERM (stopping on request is not a failure;
sleeping requests are abandoned, not waited for); 2 for bad arguments or an
address that cannot be bound.
"""

import argparse
import datetime
import errno
import http.client
import ipaddress
import json
import math
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PROG = "slow_server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
DEFAULT_DELAY = 1.0
MAX_DELAY = 60.0
DELAY_ERROR = f"delay must be a number of seconds from 0 to {MAX_DELAY:g}"

MOVIES_PATH = "/api/v1/movies"
HEALTH_PATH = "/healthz"

# The stdlib accepts 64 KiB lines.  Nothing legitimate sent to this service comes
# close to 8 KiB, and a small limit keeps a misbehaving client cheap.
MAX_LINE = 8192
# The header count needs no help: http.client refuses more than 100 lines (the
# blank line that ends them counts, so at most 99 headers get through).

# A burst of connections waits in the kernel's accept queue until the accept loop
# gets to it.  The stdlib's default of 5 overflows at once; the kernel then drops
# connection attempts and the client retries a second or more later.
LISTEN_BACKLOG = max(1024, socket.SOMAXCONN)

# An idle keep-alive connection pins a thread; hang up on it after this long.
KEEPALIVE_TIMEOUT = 75.0

CHARACTERS = [
    ("Rick Blaine", "Casablanca"),
    ("Dorothy Gale", "The Wizard of Oz"),
    ("Vito Corleone", "The Godfather"),
    ("Darth Vader", "Star Wars"),
    ("Ellen Ripley", "Alien"),
    ("Indiana Jones", "Raiders of the Lost Ark"),
    ("Marty McFly", "Back to the Future"),
    ("Hannibal Lecter", "The Silence of the Lambs"),
]


def parse_delay(text):
    """Return the delay in seconds that `text` asks for, or raise ValueError."""
    try:
        delay = float(text)
    except (TypeError, ValueError):
        raise ValueError(DELAY_ERROR) from None
    # float() happily accepts "nan" and "inf"; neither is a way to wait.
    if not math.isfinite(delay) or not 0 <= delay <= MAX_DELAY:
        raise ValueError(DELAY_ERROR)
    return delay


def parse_bind(text):
    """Split HOST:PORT, :PORT or PORT into (host, port); the host defaults to loopback."""
    host, _, port_text = text.rpartition(":")
    host = host or DEFAULT_HOST
    if not port_text.isdigit() or int(port_text) > 65535 or any(c.isspace() for c in host):
        raise ValueError(f"--bind must be HOST:PORT, :PORT or PORT (port 0-65535), got {text!r}")
    return host, int(port_text)


_log_lock = threading.Lock()


def log_access(record):
    # Threads share stdout; the lock keeps each line whole.  Flushing per line lets
    # a reader (tail -f, a test, a pipe) see requests as they happen.
    line = json.dumps(record)
    with _log_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class LineTooLong(http.client.LineTooLong):
    """A request or header line over MAX_LINE bytes.

    Being an http.client.LineTooLong, it is answered with a 431 when it comes out
    of the stdlib's header parsing; the request line is our code's to handle (414).
    """

    def __init__(self):
        super().__init__("line")

    def __str__(self):
        return f"line longer than {MAX_LINE} bytes"


class LineLimitedReader:
    """Wraps a handler's rfile so that every line read from it is capped at MAX_LINE.

    The stdlib's header parser reads with its own 64 KiB limit; going through this
    wrapper is how our tighter limit reaches it without copying the parser.
    """

    def __init__(self, raw):
        self._raw = raw

    def readline(self, size=-1):
        line = self._raw.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong()
        return line

    def __getattr__(self, name):
        return getattr(self._raw, name)


class SlowHandler(BaseHTTPRequestHandler):
    """Answers each request after the delay; every answer is JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive, so clients that reuse connections can
    # Until a request line parses, the stdlib assumes HTTP/0.9, whose answers have no
    # status line or headers; a garbled request deserves a real 400 instead.
    default_request_version = "HTTP/1.0"
    server_version = "slow_server/1.0"
    timeout = KEEPALIVE_TIMEOUT
    # Each answer leaves in one write (a buffered wfile, flushed once per request) with
    # Nagle's algorithm off.  Written in two small pieces with Nagle on, the second piece
    # waits for the client's delayed ACK: about 40 ms on every reused connection.
    wbufsize = -1
    disable_nagle_algorithm = True

    def version_string(self):
        return self.server_version

    def setup(self):
        super().setup()
        self.rfile = LineLimitedReader(self.rfile)

    def handle_one_request(self):
        """Read and answer one request (the stdlib's version, with tighter limits and a log)."""
        self.status = None
        self.bytes_sent = 0
        # Reset what an error answer may look at before the request line is parsed;
        # an empty request_version still lets headers go out.
        self.command = self.path = self.requestline = self.request_version = ""
        try:
            try:
                self.raw_requestline = self.rfile.readline()
            except LineTooLong:
                self.raw_requestline = None
            self.started = time.monotonic()
            if self.raw_requestline is None:
                self.send_error(
                    HTTPStatus.REQUEST_URI_TOO_LONG, f"request line longer than {MAX_LINE} bytes"
                )
            elif not self.raw_requestline:
                self.close_connection = True  # the client is done with this connection
            elif self.parse_request():
                self.dispatch()
            self.wfile.flush()
        except TimeoutError:
            # An idle keep-alive connection, or a client that stopped half-way.
            self.close_connection = True
            return
        if self.status is not None:
            self.log_access()

    def dispatch(self):
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True  # any request body is still unread
            self.send_json(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": f"method {self.command} not allowed"},
                allow="GET, HEAD",
            )
            return
        if "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0") != "0":
            # We never read request bodies, so the connection cannot carry another request.
            self.close_connection = True
        url = urlsplit(self.path)
        if url.path == MOVIES_PATH:
            self.answer_movies(url.query)
        elif url.path == HEALTH_PATH:
            self.send_json(HTTPStatus.OK, {"status": "ok"})
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path}"})

    def answer_movies(self, query):
        delay = self.server.delay
        values = parse_qs(query, keep_blank_values=True).get("delay")
        if values:
            try:
                delay = parse_delay(values[-1])
            except ValueError as err:
                self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
                return
        # The lesson: a blocking wait is cheap when it has a thread to itself.
        time.sleep(delay)
        character, movie = random.choice(CHARACTERS)
        self.send_json(HTTPStatus.OK, {"character": character, "movie": movie})

    def send_json(self, status, payload, allow=None):
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.bytes_sent = len(body)

    def send_error(self, code, message=None, explain=None):
        # The stdlib answers its own errors (bad request line, 431, ...) with an HTML
        # page; here every answer is JSON.  The request may be half read: hang up after.
        self.close_connection = True
        payload = {"error": message or HTTPStatus(code).phrase}
        if explain:
            payload["detail"] = explain
        self.send_json(code, payload)

    def log_request(self, code="-", size="-"):
        # Called by send_response; the access line is written once the answer is out.
        self.status = int(code)

    def log_access(self):
        now = datetime.datetime.now(datetime.UTC)
        host, port = self.client_address[:2]
        log_access(
            {
                "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "client": f"{host}:{port}",
                "method": self.command or "",
                "path": self.path,
                "status": self.status,
                "bytes": self.bytes_sent,
                "duration_s": round(time.monotonic() - self.started, 4),
            }
        )

    def log_message(self, format, *args):
        # Only log_error still gets here (log_request no longer calls it): one stderr line.
        sys.stderr.write(f"{PROG}: {self.address_string()}: {format % args}\n")


class SlowHTTPServer(ThreadingHTTPServer):
    """A thread per connection, a deep accept queue, and no waiting for sleepers on close."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, delay):
        self.delay = delay
        super().__init__(address, SlowHandler)

    def server_bind(self):
        # HTTPServer.server_bind also does a reverse-DNS lookup of the host, which can
        # stall startup for seconds; nothing here needs the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return  # the client gave up (a timeout in a load test): normal, not news
        sys.stderr.write(f"{PROG}: error answering {client_address[0]}: {exc!r}\n")


def make_server(host=DEFAULT_HOST, port=DEFAULT_PORT, delay=DEFAULT_DELAY):
    """Bind and listen; call serve_forever() on the result (from any thread) to serve."""
    return SlowHTTPServer((host, port), parse_delay(delay))


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump: the same shape as our other errors.
        raise UsageError(message)


class StopServing(BaseException):
    # A BaseException, so the Exception handlers inside socketserver cannot swallow it.
    pass


def _stop(signum, frame):
    # A second Ctrl-C must not interrupt the clean-up of the first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise StopServing(signum)


def _error(message):
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    return 2


def main(argv=None):
    parser = ArgumentParser(
        prog=PROG,
        description="A deliberately slow HTTP service for the Async Workers Lab.",
    )
    parser.add_argument(
        "--bind",
        default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help="address to listen on: HOST:PORT, :PORT or PORT; port 0 picks a free one "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--delay",
        default=str(DEFAULT_DELAY),
        metavar="SECONDS",
        help="how long /api/v1/movies waits, 0 to 60 (default: %(default)s)",
    )
    try:
        args = parser.parse_args(argv)
        host, port = parse_bind(args.bind)
    except (UsageError, ValueError) as err:
        return _error(err)
    try:
        delay = parse_delay(args.delay)
    except ValueError as err:
        return _error(f"--delay {args.delay!r}: {err}")

    try:
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        try:
            server = make_server(host, port, delay)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return _error(f"port {port} on {host} is already in use")
            return _error(f"cannot listen on {host}:{port}: {err.strerror or err}")
        with server:
            bound_host, bound_port = server.server_address[:2]
            if not ipaddress.ip_address(bound_host).is_loopback:
                sys.stderr.write(
                    f"{PROG}: warning: listening on {bound_host}, "
                    "which other machines may be able to reach\n"
                )
            url = f"http://{bound_host}:{bound_port}"
            sys.stderr.write(f"{PROG}: serving on {url} (delay {delay} s)\n")
            sys.stderr.flush()
            server.serve_forever()
    except StopServing:
        pass
    sys.stderr.write(f"{PROG}: stopped\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
