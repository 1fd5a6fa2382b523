"""A deliberately slow HTTP service: the dependency in the Async Workers Lab.

The lab asks how a Django app behaves under Gunicorn's sync and gevent workers
when its views wait on something slow.  This server is that something: every
request to /api/v1/movies waits a fixed delay, then answers with a small JSON
object.  For the numbers to mean anything, the slow service itself must never
be the bottleneck: 1,000 concurrent requests must each wait the delay once,
side by side.

It gets there the way the lab's gevent workers do, minus the monkey-patching:

* one thread runs one asyncio event loop;
* every connection is one coroutine, which reads a request, answers it, and
  reads the next one while the client keeps the connection alive;
* the wait is `await asyncio.sleep(delay)`, which holds no thread at all: the
  coroutine is parked on a timer and the loop serves everybody else meanwhile.

A sleeping request costs a few kilobytes and a timer, not a thread, so a burst
of 1,000 connections costs no thread start-ups and no thread switches.  (Contrast the lab's sync
workers, where a blocking wait holds its whole worker for the duration.)

The rest is what any server needs so as not to skew timings:

* a large listen backlog: a small one makes the kernel drop bursts of new
  connections, and the clients' retries add whole seconds to timings;
* HTTP/1.1 keep-alive, so clients that reuse connections can;
* each answer leaves in one write with Nagle's algorithm off, so no answer on
  a reused connection is held back 40 ms waiting for the client's delayed ACK.

Whatever is slow in a measurement is therefore the app, not this server.

Run it (stdlib only, Python 3.11+):

    python slow_server.py                       # http://127.0.0.1:8001, delay 1.0 s
    python slow_server.py --bind 127.0.0.1:9000 --delay 0.25
    python slow_server.py --bind [::1]:9000     # IPv6 addresses go in brackets

    curl 'http://127.0.0.1:8001/api/v1/movies?delay=0.2'

Endpoints (GET or HEAD; other methods get 405):

    /api/v1/movies[?delay=SECONDS]  {"character": ..., "movie": ...} after the delay
                                    (0 to 60 s; anything else is a 400)
    /healthz                        {"status": "ok"} at once

Every answer, errors included, is JSON with a Content-Length.  Oversized
requests are refused: a request line over 8 KiB with a 414, a header line over
8 KiB or more than 99 headers with a 431, and a garbled request with a 400.

Output: one startup line on stderr, "slow_server.py: serving on http://HOST:PORT
(delay D s)", then one JSON access-log line per request on stdout with the
fields time, client, method, path, status, bytes (body bytes) and duration_s.
If accept() keeps failing (out of file descriptors, say), one line a second
says how often.

Exit codes: 0 after SIGINT or SIGTERM (stopping on request is not a failure;
sleeping requests are abandoned, not waited for); 2, with one line
"slow_server.py: error: ..." on stderr, for bad arguments or an address that
cannot be resolved or bound.
"""

import argparse
import asyncio
import datetime
import errno
import ipaddress
import itertools
import json
import math
import random
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

PROG = "slow_server.py"
SERVER_NAME = "slow_server/1.0"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
DEFAULT_DELAY = 1.0
MAX_DELAY = 60.0
DELAY_ERROR = f"delay must be a number of seconds from 0 to {MAX_DELAY:g}"

MOVIES_PATH = "/api/v1/movies"
HEALTH_PATH = "/healthz"
ALLOWED_METHODS = "GET, HEAD"

# Nothing legitimate sent to this service comes close to 8 KiB a line (the stdlib
# accepts 64 KiB), and a small limit keeps a misbehaving client cheap.
MAX_LINE = 8192
# The stdlib's http.server limit: 100 lines, counting the blank one that ends them.
MAX_HEADERS = 99

# A burst of connections waits in the kernel's accept queue until the event loop
# gets to it.  A short queue overflows at once; the kernel then drops connection
# attempts and the client retries a second or more later.
LISTEN_BACKLOG = max(1024, socket.SOMAXCONN)

# An idle keep-alive connection costs little, but not nothing: hang up after this long.
KEEPALIVE_TIMEOUT = 75.0

# When accept() fails (out of file descriptors, say), it fails again at once: wait this
# long before the next try, and report the failures at most this often.
ACCEPT_BACKOFF = 0.05
ACCEPT_REPORT_EVERY = 1.0

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
    if isinstance(text, str) and not text.isascii():
        raise ValueError(DELAY_ERROR)  # float() would take "\uff11" (a fullwidth 1) for 1.0
    try:
        delay = float(text)
    except (TypeError, ValueError):
        raise ValueError(DELAY_ERROR) from None
    # float() happily accepts "nan" and "inf"; neither is a way to wait.
    if not math.isfinite(delay) or not 0 <= delay <= MAX_DELAY:
        raise ValueError(DELAY_ERROR)
    return delay


def parse_host_port(text, flag="--bind"):
    """Split HOST:PORT into (host, port), or raise ValueError saying what is expected.

    Nothing is guessed: an empty host, a missing port, or a bare IPv6 address (whose
    last colon could belong to the address or start the port) is refused, not filled in.
    Ports are 1-65535 in ASCII digits (int() alone would take "\uff18\uff10" for 80).
    lab.py has a copy of this function: each tool runs on its own.
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


def host_port(host, port):
    """HOST:PORT as one would type it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- reading a request ----------------------------------------------------------------


@dataclass
class Request:
    """What is known of one request; read_request() fills it in as the lines arrive."""

    method: str = ""
    path: str = ""
    headers: dict = field(default_factory=dict)  # lower-case name -> first value
    keep_alive: bool = False
    started: float = 0.0  # time.monotonic() when the request line arrived


class HTTPError(Exception):
    """A request answered with an error status, after which the connection is closed
    (the request may be half read, so the next one cannot be found)."""

    def __init__(self, status, message, detail=None):
        super().__init__(message)
        self.status = status
        self.payload = {"error": message}
        if detail:
            self.payload["detail"] = detail


class LineTooLong(Exception):
    pass


async def read_line(reader):
    """Return one line of at most MAX_LINE bytes (CRLF included); b"" at end of input."""
    try:
        # The reader's own limit is MAX_LINE too (see SlowServer), so an endless line is
        # refused once about 8 KiB of it are buffered.
        line = await reader.readline()
    except ValueError:  # how readline() reports that its limit ran out
        raise LineTooLong() from None
    if len(line) > MAX_LINE:
        raise LineTooLong()
    if line and not line.endswith(b"\n"):
        raise EOFError("the client hung up in the middle of a line")
    return line


HTTP_VERSION = re.compile(r"HTTP/(\d{1,10})\.(\d{1,10})", re.ASCII)


def parse_version(text):
    """(major, minor) from "HTTP/1.1"; a 400 if it is no version, a 505 from 2.0 on."""
    match = HTTP_VERSION.fullmatch(text)
    if not match:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"Bad request version ({text!r})")
    version = int(match.group(1)), int(match.group(2))
    if version >= (2, 0):
        raise HTTPError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({text[5:]})")
    return version


async def read_request(reader, request):
    """Read a request line and its headers into `request`; False if the client is done.

    Raises HTTPError for requests that get no normal answer (414, 431, 400, 505), on
    the same rules as the stdlib's http.server.  Request bodies are never read.
    """
    try:
        raw = await read_line(reader)
    except LineTooLong:
        raw = None
    request.started = time.monotonic()
    if raw is None:
        raise HTTPError(
            HTTPStatus.REQUEST_URI_TOO_LONG, f"request line longer than {MAX_LINE} bytes"
        )
    request_line = raw.decode("latin-1").rstrip("\r\n")
    words = request_line.split()
    if not words:
        return False  # end of input, or a blank line where a request belongs: hang up

    version = (1, 0)  # what a two-word request line ("GET /path") is taken for
    if len(words) >= 3:
        version = parse_version(words[-1])
    if len(words) not in (2, 3):
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({request_line!r})")
    method, path = words[:2]
    if len(words) == 2 and method != "GET":
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({method!r})")
    if path.startswith("//"):
        path = "/" + path.lstrip("/")  # as http.server does: not a URL with a host in it
    request.method, request.path = method, path

    for count in itertools.count():
        try:
            line = await read_line(reader)
        except LineTooLong:
            raise HTTPError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Line too long",
                f"line longer than {MAX_LINE} bytes",
            ) from None
        if line in (b"\r\n", b"\n", b""):
            break
        if count == MAX_HEADERS:
            raise HTTPError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Too many headers",
                f"more than {MAX_HEADERS} headers",
            )
        name, colon, value = line.decode("latin-1").partition(":")
        # No colon, or space before it (which includes obsolete folded lines): garbled.
        if not colon or not name or name != name.strip():
            raise HTTPError(HTTPStatus.BAD_REQUEST, "Bad header line")
        request.headers.setdefault(name.lower(), value.strip())

    # HTTP/1.1 keeps the connection open unless told otherwise; HTTP/1.0 closes it
    # unless told otherwise.
    tokens = {t.strip() for t in request.headers.get("connection", "").lower().split(",")}
    request.keep_alive = "close" not in tokens and (version >= (1, 1) or "keep-alive" in tokens)
    return True


# --- answering it -----------------------------------------------------------------------


async def answer(request, delay):
    """Route the request; return (status, JSON payload) once it is time to answer."""
    if request.method not in ("GET", "HEAD"):
        request.keep_alive = False  # any request body is still unread
        return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {request.method} not allowed"}
    if "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0":
        # We never read request bodies, so the connection cannot carry another request.
        request.keep_alive = False
    url = urlsplit(request.path)
    if url.path == HEALTH_PATH:
        return HTTPStatus.OK, {"status": "ok"}
    if url.path != MOVIES_PATH:
        return HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path}"}
    values = parse_qs(url.query, keep_blank_values=True).get("delay")
    if values:
        try:
            delay = parse_delay(values[-1])
        except ValueError as err:
            return HTTPStatus.BAD_REQUEST, {"error": str(err)}
    # The lesson: this coroutine waits on a timer, and no thread waits with it.
    await asyncio.sleep(delay)
    character, movie = random.choice(CHARACTERS)
    return HTTPStatus.OK, {"character": character, "movie": movie}


def render(status, payload, request):
    """The whole answer as one bytes object, and how many body bytes it carries."""
    body = (json.dumps(payload) + "\n").encode()
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Server: {SERVER_NAME}",
        f"Date: {formatdate(usegmt=True)}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        head.append(f"Allow: {ALLOWED_METHODS}")
    if not request.keep_alive:
        head.append("Connection: close")
    if request.method == "HEAD":
        body = b""
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body, len(body)


def log_access(request, client, status, body_bytes):
    # One JSON line per answer, flushed at once so that a reader (tail -f, a test, a
    # pipe) sees requests as they happen.  Only the event loop's thread writes here.
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "client": client,
        "method": request.method,
        "path": request.path,
        "status": int(status),
        "bytes": body_bytes,
        "duration_s": round(time.monotonic() - request.started, 4),
    }
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# --- one coroutine per connection -------------------------------------------------------


async def serve_connection(reader, writer, delay):
    """Read a request, answer it, and go on while the client keeps the connection alive."""
    # A client that hung up at once may have no address left to report.
    host, port = (writer.get_extra_info("peername") or ("unknown", 0))[:2]
    try:
        # asyncio turns Nagle's algorithm off for TCP already; it matters enough to say so.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_alive = True
        while keep_alive:
            request = Request()
            try:
                async with asyncio.timeout(KEEPALIVE_TIMEOUT):
                    if not await read_request(reader, request):
                        return
                status, payload = await answer(request, delay)
            except HTTPError as err:
                request.keep_alive = False
                status, payload = err.status, err.payload
            data, body_bytes = render(status, payload, request)
            writer.write(data)  # one write per answer: headers and body leave together
            await writer.drain()
            log_access(request, f"{host}:{port}", status, body_bytes)
            keep_alive = request.keep_alive
    except (ConnectionError, EOFError, TimeoutError):
        # The client hung up (a timeout in a load test), went quiet on a keep-alive
        # connection, or stopped half-way through a request: normal, not news.
        pass
    except Exception as exc:  # noqa: BLE001 (a bug: one line on stderr, not a traceback)
        sys.stderr.write(f"{PROG}: error answering {host}: {exc!r}\n")
    finally:
        writer.close()


# --- the server: a listening socket and the event loop that serves it -------------------


class SlowServer:
    """Shaped like the stdlib's socketserver, so that it can be driven the same way.

    make_server() binds and listens at once: a busy port is an error before anything is
    printed, and connections made before serving starts wait in the backlog.
    serve_forever() runs the event loop (in whichever thread calls it) until
    request_stop() or shutdown() is called.
    """

    def __init__(self, sock, delay):
        self.socket = sock
        self.server_address = sock.getsockname()
        self.delay = delay
        self._connections = set()  # a task per open connection
        self._accept_errors = AcceptErrors()
        self._loop = None
        self._stop = None  # an asyncio.Event, once the loop runs
        self._stop_requested = False
        self._stopped = threading.Event()

    def serve_forever(self):
        try:
            asyncio.run(self._serve())
        finally:
            self._stopped.set()

    async def _serve(self):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(report_loop_error)
        self._stop = asyncio.Event()
        self._loop = loop
        if self._stop_requested:  # asked before the loop was there to be told
            return
        accepting = asyncio.create_task(self._accept_forever())
        await self._stop.wait()
        # Stopping abandons the sleepers: they have nothing worth finishing.
        accepting.cancel()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(accepting, *self._connections, return_exceptions=True)
        self._accept_errors.report()

    async def _accept_forever(self):
        """Accept connections and give each a task of its own, which is ours to cancel.

        asyncio.start_server() would do this, but when accept() fails for want of file
        descriptors, Python 3.11's loop logs the failure and schedules a retry up to
        backlog times per wake-up: hundreds of thousands of lines, and a busy CPU. Here
        a failure is counted (see AcceptErrors) and the next try waits ACCEPT_BACKOFF:
        the connection stays in the backlog until connections being answered close.
        """
        loop = asyncio.get_running_loop()
        self.socket.setblocking(False)
        while True:
            try:
                conn, _ = await loop.sock_accept(self.socket)
            except ConnectionAbortedError:
                continue  # the client gave up while waiting in the backlog: nothing to do
            except OSError as exc:
                self._accept_errors.add(exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            task = asyncio.create_task(self._serve_socket(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve_socket(self, conn):
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_LINE)
        except OSError:
            conn.close()  # gone before it could be set up: nothing to answer
            return
        await serve_connection(reader, writer, self.delay)

    def request_stop(self):
        """Make serve_forever() return soon; safe from any thread and from a signal handler."""
        self._stop_requested = True
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop has already finished: nothing left to stop

    def shutdown(self):
        """Stop serve_forever(), running in another thread, and wait until it has returned."""
        self.request_stop()
        self._stopped.wait()

    def server_close(self):
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.server_close()


class AcceptErrors:
    """Counts failed accept() calls and reports them at most once a second, with a count.

    Out of file descriptors, every try fails the same way: one line per failure would
    bury the rest of the log (and cost more than the failures themselves).
    """

    def __init__(self):
        self.count = 0
        self.last = None  # the latest failure, as an OSError
        self.since = None  # time.monotonic() of the first failure not reported yet

    def add(self, exc):
        self.count += 1
        self.last = exc
        if self.since is None:
            self.since = time.monotonic()
            asyncio.get_running_loop().call_later(ACCEPT_REPORT_EVERY, self.report)

    def report(self):
        if self.count:
            times = "time" if self.count == 1 else "times"
            seconds = time.monotonic() - self.since
            sys.stderr.write(
                f"{PROG}: accept failed {self.count} {times} in the last {seconds:.1f} s: "
                f"{self.last}\n"
            )
            sys.stderr.flush()
        self.count, self.since = 0, None


def report_loop_error(loop, context):
    # asyncio's default handler logs a traceback; this service reports errors in one line.
    exc = context.get("exception")
    sys.stderr.write(f"{PROG}: {context['message']}" + (f": {exc!r}\n" if exc else "\n"))


def bind_address(host, port):
    """(family, address) to bind: resolves a name, and keeps an IPv6 address IPv6.

    A name with both kinds of address (localhost, often) binds its IPv4 one, where
    clients of 127.0.0.1 look for it; write [::1]:PORT for IPv6.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = min(infos, key=lambda info: info[0] != socket.AF_INET)
    return family, address


def make_server(host=DEFAULT_HOST, port=DEFAULT_PORT, delay=DEFAULT_DELAY):
    """Bind and listen; call serve_forever() on the result (from any thread) to serve.

    Raises socket.gaierror for a host that does not resolve, OSError for an address
    that cannot be bound.
    """
    delay = parse_delay(delay)
    family, address = bind_address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As http.server does: a restarted server need not wait out old connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return SlowServer(sock, delay)


# --- command line ---------------------------------------------------------------------


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump: the same shape as our other errors.
        raise UsageError(message)


def _error(message):
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    return 2


def raise_open_file_limit():
    """Each connection is an open file: take the hard limit, as Go programs such as hey do. The
    labs keep up to 1,000 idle connections each here, past a common soft limit of 1,024."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # accept() failures are then logged once a second (see serve_forever)


def main(argv=None):
    parser = ArgumentParser(
        prog=PROG,
        description="A deliberately slow HTTP service for the Async Workers Lab.",
    )
    parser.add_argument(
        "--bind",
        default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help="address to listen on: a name, an IPv4 address or a bracketed IPv6 address, "
        "then a port from 1 to 65535 (default: %(default)s)",
    )
    parser.add_argument(
        "--delay",
        default=str(DEFAULT_DELAY),
        metavar="SECONDS",
        help="how long /api/v1/movies waits, 0 to 60 (default: %(default)s)",
    )
    try:
        args = parser.parse_args(argv)
        host, port = parse_host_port(args.bind)
    except (UsageError, ValueError) as err:
        return _error(err)
    try:
        delay = parse_delay(args.delay)
    except ValueError as err:
        return _error(f"--delay {args.delay!r}: {err}")

    raise_open_file_limit()
    try:
        server = make_server(host, port, delay)
    except socket.gaierror as err:
        reason = err.strerror or err
        return _error(f"cannot listen on {host_port(host, port)}: {host} does not resolve ({reason})")
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return _error(f"port {port} on {host} is already in use")
        return _error(f"cannot listen on {host_port(host, port)}: {err.strerror or err}")

    def stop(signum, frame):
        # A second Ctrl-C must not interrupt the clean-up of the first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.request_stop()

    # A shell starts background jobs with SIGINT ignored, so that Ctrl-C reaches only the job
    # in the foreground; Python keeps it ignored, and so do we.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with server:
        bound_host, bound_port = server.server_address[:2]
        if not ipaddress.ip_address(bound_host).is_loopback:
            sys.stderr.write(
                f"{PROG}: warning: listening on {bound_host}, "
                "which other machines may be able to reach\n"
            )
        url = f"http://{host_port(bound_host, bound_port)}"
        sys.stderr.write(f"{PROG}: serving on {url} (delay {delay} s)\n")
        sys.stderr.flush()
        server.serve_forever()
    sys.stderr.write(f"{PROG}: stopped\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
