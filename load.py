"""A small HTTP load generator, in the spirit of rakyll/hey, using only the stdlib.

What it teaches: what "N requests at concurrency C" means for a server. C threads,
released together, each keep one connection open and send their share of the N
requests back to back. Every request's phases are timed on one monotonic clock
(DNS lookup, connect, request write, wait for the response head, body read), so
you can see whether the server answered requests side by side (overlapping bars
in --timeline) or one after another (a staircase).

Run it:

    python load.py -n 10 -c 10 http://127.0.0.1:8000/slow
    python load.py -z 10s -c 50 --json http://127.0.0.1:8000/
    python load.py -n 10 -c 10 --timeline http://127.0.0.1:8000/slow

The report copies hey's layout. Differences from hey, on purpose: Requests/sec
counts responses only (a dead server scores 0, not thousands of "requests"
per second); the Details line shows each phase's own fastest and slowest; -n is
shared out exactly (hey drops the remainder of n/c); only http:// URLs; -t limits
the connect, each wait for data, and the whole body read.

--json (and --save FILE) give the figures as one JSON object. Its started_at and
ended_at are Unix times: when the requests were released, and when the last one
ended (started_at + total_s); other tools use them to tell which server-side
events belong to which run.

Exit codes: 0 when at least one response arrived (any status), 1 when none did,
130 when interrupted with Ctrl-C (the report still prints), and 2, with one line
"load.py: error: ..." on stderr, for a bad flag or URL, a --save file that cannot
be written, or too few threads, memory or open files for -c; these are found before
the first request is sent.
"""

import _thread
import argparse
import contextlib
import heapq
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from array import array
from bisect import bisect_left
from collections import Counter, namedtuple
from urllib.parse import quote, urlsplit

try:
    import resource  # Unix only
except ImportError:
    resource = None

# --- Configuration ---------------------------------------------------------

DEFAULT_REQUESTS = 200
DEFAULT_CONCURRENCY = 50
DEFAULT_TIMEOUT_S = 20
USER_AGENT = "load.py/1.0 (async-workers-lab)"
READ_CHUNK = 64 * 1024  # bodies are read into one reused buffer and thrown away
MAX_KEPT_ROWS = 1_000_000  # like hey: past this only totals are counted
PERCENTS = (10, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BUCKETS = 10
BAR_CHAR = "\u25a0"  # hey's "■"
BAR_WIDTH = 40
TIMELINE_MAX_ROWS = 50
PROGRESS_AFTER_S = 1.0
PROGRESS_EVERY_S = 0.2
MAX_SECONDS = 24 * 3600.0  # longest -t and -z: beyond this, timers overflow
MAX_CONCURRENCY = 10_000  # threads; far more than a laptop can start anyway
# A worker needs little stack; the default (often 8 MiB) would have 1,000 workers reserve
# 8 GiB of address space, which a `ulimit -v` or a strict overcommit policy refuses.
WORKER_STACK = 256 * 1024
# How long a thread the system created may take to begin running before it counts as one that
# could not start (see Spawned); only a failing start waits this long.
START_TIMEOUT_S = 5.0
# Open files besides the workers' sockets: stdin/out/err, --save's file, and some spare.
SPARE_FILES = 16

# One finished request, as offsets and durations in seconds from the run start.
# status is None and error holds a message when no response arrived.
Row = namedtuple(
    "Row",
    "start_s end_s dns_dialup_s dns_s req_write_s resp_wait_s resp_read_s status bytes error",
)


class UsageError(Exception):
    """A bad command line: reported as one line on stderr, exit code 2."""


# --- Command line ------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_duration(text):
    """Parse a Go-style duration ("10s", "1m30s", "500ms", "1.5h") into seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|ms|s|m|h)", text, re.ASCII)
    if not parts or "".join(num + unit for num, unit in parts) != text:
        raise ValueError(f"invalid duration {text!r} (use e.g. 10s, 1m, 500ms)")
    return sum(float(num) * units[unit] for num, unit in parts)


def _ascii(convert):
    """An argparse type: convert(text), for ASCII text only (int() reads "\u0663" as 3)."""
    def parse(text):
        if not text.isascii():
            raise ValueError(text)
        return convert(text)
    parse.__name__ = convert.__name__  # argparse's message says "invalid int value"
    return parse


def _parse_header(text):
    name, sep, value = text.partition(":")
    if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name.strip()):
        raise ValueError(f"-H: invalid header {text!r} (expected 'Name: value')")
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):  # a CR or LF would inject headers
        raise ValueError(f"-H: control character in header value {text!r}")
    return name.strip(), value.strip()


def parse_args(argv):
    """Parse and check the command line; raises UsageError with a one-line message."""
    parser = _Parser(
        prog="load.py",
        allow_abbrev=False,
        description="Send HTTP requests concurrently and report timings (like hey).",
    )
    add = parser.add_argument
    add("-n", type=_ascii(int), default=DEFAULT_REQUESTS, help="number of requests (default 200)")
    add("-c", type=_ascii(int), default=DEFAULT_CONCURRENCY, help="concurrent workers (default 50)")
    add("-q", type=_ascii(float), default=0, help="rate limit per worker, requests/s (0: none)")
    add("-z", default=None, help="run for this long (e.g. 10s, 1m); -n is then ignored")
    add("-t", type=_ascii(float), default=DEFAULT_TIMEOUT_S,
        help="timeout per request, s (0: none)")
    add("-m", default="GET", help="HTTP method (default GET)")
    add("-H", action="append", default=[], help="header 'Name: value' (repeatable)")
    add("-d", default=None, help="request body")
    add("-T", default=None, help="Content-Type of the body (default text/html with -d)")
    add("-disable-keepalive", "--disable-keepalive", dest="disable_keepalive",
        action="store_true", help="open a new connection for every request")
    add("-o", default=None, help="output type: 'csv' prints one row per response")
    add("--json", action="store_true", help="print the figures as one JSON object")
    add("--timeline", action="store_true", help="draw one row per request after the report")
    add("--save", metavar="FILE", default=None,
        help="also write the --json figures to FILE (run_all.sh keeps them for its table)")
    add("url", metavar="URL", help="http://host[:port]/path")
    opts = parser.parse_args(argv)

    try:
        opts.duration = parse_duration(opts.z) if opts.z is not None else None
        opts.headers = [_parse_header(h) for h in opts.H]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if opts.duration is not None and not 0 < opts.duration <= MAX_SECONDS:
        raise UsageError(f"-z must be greater than 0 and at most {MAX_SECONDS // 3600:g}h")
    if opts.c < 1:
        raise UsageError("-c cannot be smaller than 1")
    if opts.duration is None:
        if opts.n < 1:
            raise UsageError("-n cannot be smaller than 1")
        if opts.n < opts.c:
            raise UsageError("-n cannot be less than -c")
    if opts.c > MAX_CONCURRENCY:
        raise UsageError(f"-c cannot be more than {MAX_CONCURRENCY} (one thread each)")
    if not 0 <= opts.t <= MAX_SECONDS:  # also refuses nan and inf
        raise UsageError(f"-t must be from 0 to {MAX_SECONDS:g} seconds")
    if not (opts.q == 0 or 1 / MAX_SECONDS <= opts.q < math.inf):
        raise UsageError("-q must be 0 (no limit) or a rate from one request a day up")
    if opts.o not in (None, "csv"):
        raise UsageError(f"-o: unknown output type {opts.o!r} (only 'csv' is supported)")
    opts.m = opts.m.upper()
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Z-]+", opts.m):
        raise UsageError(f"-m: invalid method {opts.m!r}")
    opts.target = Target.from_options(opts)
    return opts


def check_open_files(concurrency):
    """Make sure each worker can open its socket; refuse the run up front if not.

    Past the open-file limit, connect() fails with "too many open files" and the run
    measures that instead of the server. A soft limit below the hard one is raised to
    it first (any process may do that), as Go programs do on start; so the limit that
    can stop the run is the hard one.
    """
    if resource is None:
        return
    needed = concurrency + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= needed:
        return
    if hard == unlimited or hard >= needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == unlimited else hard, hard))
            return
        except (ValueError, OSError):
            pass  # the system would not let us after all: say so below
    limit = soft if hard == unlimited else hard
    raise UsageError(f"-c {concurrency} needs about {needed} open files but the limit is "
                     f"{limit} (raise it with ulimit -n)")


def check_save_file(path):
    """Make sure --save's file can be written, before the run: a typo in its name must
    not cost a whole run's figures.

    The file is opened for writing as a test, but not emptied (the old figures stay
    until new ones replace them); one that did not exist is removed again.
    """
    if os.path.isdir(path):
        raise UsageError(f"--save {path}: is a folder, not a file")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"--save {path}: no such folder {folder}")
    existed = os.path.exists(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
    except OSError as exc:
        raise UsageError(f"--save {path}: cannot write there ({exc.strerror})") from None
    if not existed:
        os.unlink(path)


# --- What to send --------------------------------------------------------------


class Target:
    """Where to connect and the exact request bytes, built once before the run."""

    def __init__(self, url, method, host, port, request, keepalive, timeout):
        self.url, self.method, self.host, self.port = url, method, host, port
        self.request, self.keepalive, self.timeout = request, keepalive, timeout
        self.addresses = _literal_address(host, port)  # None: a name to look up each dial

    @classmethod
    def from_options(cls, opts):
        # The scheme and the host[:port] are read here, not by urlsplit(), whose checks
        # and messages change between Python versions (3.11.2 refuses "[::1]x" as an
        # "Invalid IPv6 URL", 3.11.7 lets it through): each URL gets the same answer
        # from load.py on every Python.
        scheme, slashes, rest = opts.url.partition("://")
        if not slashes or scheme.lower() != "http":
            raise UsageError(f"URL must start with http:// (https is not supported): {opts.url}")
        netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]  # as urlsplit() splits it
        authority = netloc.rpartition("@")[2]  # host[:port], as typed
        host, port = url_host_port(authority, opts.url)
        try:
            parts = urlsplit(opts.url)  # for the path and query only
        except ValueError as exc:
            raise UsageError(f"invalid URL {opts.url!r}: {exc}") from None
        path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     safe="/?=&;:@!$'()*+,~%-._")  # as a browser would send it
        host_header = authority.removesuffix(":")  # "host:" (an empty port) means "host"

        body = opts.d.encode() if opts.d is not None else b""
        headers = {"host": ("Host", host_header), "user-agent": ("User-Agent", USER_AGENT)}
        if opts.d is not None or opts.T:
            headers["content-type"] = ("Content-Type", opts.T or "text/html")
        if body or opts.m in ("POST", "PUT", "PATCH"):
            headers["content-length"] = ("Content-Length", str(len(body)))
        for name, value in opts.headers:
            headers[name.lower()] = (name, value)
        if opts.disable_keepalive:
            headers["connection"] = ("Connection", "close")
        head = f"{opts.m} {path} HTTP/1.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.values()) + "\r\n"
        try:
            request = head.encode("latin-1") + body
        except UnicodeEncodeError:
            raise UsageError("headers and URL must be ASCII/latin-1 text") from None
        return cls(opts.url, opts.m, host, port, request, not opts.disable_keepalive,
                   opts.t or None)


# host[:port] of a URL: an IPv6 address in brackets, or a name (or IPv4 address) made of
# the characters RFC 3986 allows in one; the port is checked on its own.
URL_AUTHORITY = re.compile(
    r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<name>[A-Za-z0-9._~%!$&'()*+,;=-]*))(?::(?P<port>.*))?")


def url_host_port(authority, url):
    """(host, port) of a URL's host[:port], the port 80 if none is given.

    Stricter than urlsplit(), which (depending on the Python version) lets through
    "[zz]" or "[::1]x" as hosts, "\uff18\uff10" (fullwidth digits) as port 80, and
    port 0: each would fail only at connect time, once per request.
    """
    match = URL_AUTHORITY.fullmatch(authority)
    if not match:
        raise UsageError(f"invalid host in URL: {url}")
    host, port = match["ipv6"] or match["name"], match["port"]
    if not host:
        raise UsageError(f"URL has no host: {url}")
    if match["ipv6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"invalid IPv6 address in URL: {url}") from None
    if not port:  # no port, or an empty one ("host:"), means the default
        return host, 80
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise UsageError(f"invalid port in URL (use 1 to 65535): {url}")
    return host, int(port)


def _literal_address(host, port):
    """getaddrinfo()'s answer for an IP address, so dialing it needs no lookup (as Go)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None
    return [(family, socket.SOCK_STREAM, 0, "", (host, port))]


# --- Sending requests: one thread per -c, one connection per thread ----------------

# Each request is stored as FIELDS doubles in a per-worker array, 72 bytes a request:
# start, dns-done, dial-done, written, headers-in and end (perf_counter stamps),
# then status (0: no response), body bytes and error id (-1: none).
FIELDS = 9
DIAL, WRITE, WAIT, READ = "dial", "write", "wait", "read"
MAX_HEAD = 64 * 1024  # longest response head (or chunk-size line) accepted
CHUNKED, UNTIL_CLOSE = -1, -2  # body lengths that are not a byte count


class ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.x response; the message is Go-like."""


class StaleConnection(Exception):
    """A kept-alive connection the server had already closed: retry on a fresh one."""


class RequestFailed(Exception):
    """A request that got no (complete) response; the message goes in the report."""


class ErrorBook:
    """Error messages, stored once; rows keep only the message's number."""

    def __init__(self):
        self.messages = []
        self._ids = {}
        self._lock = threading.Lock()  # taken on errors only, never on the fast path

    def id_for(self, message):
        with self._lock:
            if message not in self._ids:
                self._ids[message] = len(self.messages)
                self.messages.append(message)
            return self._ids[message]


def describe_error(exc, phase, target):
    """A hey-like (Go net/http-like) message; no local port in it, so equal errors group."""
    where = f"{target.host}:{target.port}"
    # BlockingIOError is how a blocking socket reports SO_RCVTIMEO/SO_SNDTIMEO expiring.
    if isinstance(exc, (TimeoutError, BlockingIOError)):
        reason = ("context deadline exceeded (Client.Timeout or context cancellation "
                  "while reading body)" if phase == READ else
                  "context deadline exceeded (Client.Timeout exceeded while awaiting headers)")
    elif isinstance(exc, socket.gaierror):
        reason = f"dial tcp: lookup {target.host}: {exc.strerror or exc}"
    elif isinstance(exc, ProtocolError):
        reason = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        op = {DIAL: "dial tcp", WRITE: "write tcp"}.get(phase, "read tcp")
        verb = {DIAL: "connect", WRITE: "write"}.get(phase, "read")
        reason = f"{op} {where}: {verb}: {exc.strerror.lower()}"
    else:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f'{target.method[:1]}{target.method[1:].lower()} "{target.url}": {reason}'


def dial(target, buffer):
    """Resolve and connect; returns (Connection, time DNS finished)."""
    infos = target.addresses or socket.getaddrinfo(target.host, target.port,
                                                   type=socket.SOCK_STREAM)
    t_dns = time.perf_counter()
    error = None
    for family, kind, proto, _, address in infos:  # try each address, as Go's dialer does
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(target.timeout)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _use_kernel_timeouts(sock, target.timeout)
            return Connection(sock, buffer), t_dns
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _use_kernel_timeouts(sock, timeout):
    """Make the socket blocking, with the timeout enforced by the kernel.

    A Python socket timeout costs a poll() before every send and recv, and a
    second release of the GIL; with 50 threads that halves the request rate.
    SO_RCVTIMEO/SO_SNDTIMEO give the same limit at no cost per call.
    """
    if not timeout:
        return
    seconds = int(timeout)
    timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:
        return  # not supported here: keep Python's own (slower) timeout
    sock.settimeout(None)


# Why not http.client: its response class parses headers with the email package,
# about 20 us a response, more than a fast local server needs to answer. What
# follows reads HTTP/1.1 (RFC 9112) just far enough to know where a body ends.


class Connection:
    """A connected socket and the bytes received on it but not parsed yet.

    Everything is received into `buffer`, the worker's scratch memory (recv_into
    costs less than recv, which allocates); only the response head is copied out.
    """

    def __init__(self, sock, buffer):
        self.sock, self.buffer = sock, buffer
        self.pending = b""

    def close(self):
        self.sock.close()

    def read_until(self, marker, limit):
        """Return the bytes before `marker` and consume both (e.g. a head and CRLF CRLF)."""
        while (end := self.pending.find(marker)) < 0:
            if len(self.pending) > limit:
                raise ProtocolError("response header too long")
            self._receive()
        found = self.pending[:end]
        self.pending = self.pending[end + len(marker):]
        return found

    def _receive(self):
        got = self.sock.recv_into(self.buffer)
        if not got:
            # Closed before sending anything: Go says "EOF" (and a kept-alive
            # connection that did this is simply retried, see Worker.exchange).
            raise ProtocolError("unexpected EOF" if self.pending else "EOF")
        self.pending += self.buffer[:got]

    def discard(self, count, deadline):
        """Read exactly `count` bytes, keeping none."""
        buffer = self.buffer
        used = min(count, len(self.pending))
        self.pending = self.pending[used:]
        left = count - used
        while left:
            got = self.sock.recv_into(buffer, min(left, len(buffer)))
            if not got:
                raise ProtocolError("unexpected EOF")
            left -= got
            if left and time.perf_counter() > deadline:
                raise TimeoutError
        return count

    def discard_until_closed(self, deadline):
        buffer = self.buffer
        size, self.pending = len(self.pending), b""
        got = self.sock.recv_into(buffer)
        while got:
            size += got
            if time.perf_counter() > deadline:
                raise TimeoutError
            got = self.sock.recv_into(buffer)
        return size


def read_head(conn, method):
    """Read the status line and headers; return (status, body_length, close_after).

    body_length is a byte count, CHUNKED or UNTIL_CLOSE.
    """
    status = 100
    while 100 <= status < 200 and status != 101:  # 1xx are interim: the real one follows
        lines = conn.read_until(b"\r\n\r\n", MAX_HEAD).split(b"\r\n")
        parts = lines[0].split(None, 2)
        if (len(parts) < 2 or not parts[0].startswith(b"HTTP/1.")
                or len(parts[1]) != 3 or not parts[1].isdigit()):
            shown = json.dumps(lines[0][:40].decode("latin-1"))
            raise ProtocolError(f"malformed HTTP response {shown}")
        status, http10 = int(parts[1]), parts[0] == b"HTTP/1.0"
        length, chunked, connection = None, False, b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                if not value.strip().isdigit():
                    raise ProtocolError("bad Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                connection = value.lower()
    close = b"close" in connection or (http10 and b"keep-alive" not in connection)
    if method == "HEAD" or status < 200 or status in (204, 304):
        return status, 0, close
    if chunked:
        return status, CHUNKED, close
    if length is None:
        return status, UNTIL_CLOSE, True
    return status, length, close


def read_body(conn, length, deadline):
    """Read and discard the body; return its size in bytes."""
    if length >= 0:
        return conn.discard(length, deadline)
    if length == UNTIL_CLOSE:
        return conn.discard_until_closed(deadline)
    size = 0
    while True:  # chunked: a hex size line, that many bytes, CRLF; size 0 ends it
        try:
            chunk = int(conn.read_until(b"\r\n", MAX_HEAD).split(b";", 1)[0], 16)
        except ValueError:
            raise ProtocolError("malformed chunked encoding") from None
        if chunk == 0:
            break
        size += conn.discard(chunk, deadline)
        if conn.read_until(b"\r\n", MAX_HEAD):
            raise ProtocolError("malformed chunked encoding")
    while conn.read_until(b"\r\n", MAX_HEAD):  # trailer fields, up to an empty line
        pass
    return size


class Worker:
    """Sends `count` requests one after another on its own (kept-alive) connection."""

    def __init__(self, target, count, qps, gate, stop, errors, keep):
        self.target, self.count, self.qps = target, count, qps
        self.gate, self.stop, self.errors, self.keep = gate, stop, errors, keep
        self.stamps = array("d")  # FIELDS doubles per kept request
        self.overflow = Counter()  # (status, error id) -> count, past `keep` rows
        self.overflow_bytes = 0
        self.done = 0  # read by the progress thread; only this thread writes it
        self.buffer = memoryview(bytearray(READ_CHUNK))

    def run(self):
        try:
            self.gate.wait()
        except threading.BrokenBarrierError:
            return
        except MemoryError:  # no room left even to wait: the run is refused (start_threads)
            self.gate.abort()
            return
        self._loop()

    def _loop(self):
        clock, stop, exchange = time.perf_counter, self.stop, self.exchange
        record = self.stamps.extend
        interval = 1.0 / self.qps if self.qps else 0.0
        next_due = clock()  # with -q, request k is due at release + k * interval
        conn = None
        for _ in range(self.count):
            if stop.is_set():
                break
            if interval:
                if stop.wait(max(0.0, next_due - clock())):
                    break
                next_due += interval
            t0 = clock()
            try:
                try:
                    conn, t_dns, t_dial, t_sent, t_head, status, size = exchange(conn, t0)
                except StaleConnection:
                    conn, t_dns, t_dial, t_sent, t_head, status, size = exchange(None, t0)
                err = -1
            except RequestFailed as failed:
                conn = None
                t_dns = t_dial = t_sent = t_head = t0
                status, size, err = 0, 0, self.errors.id_for(str(failed))
            t_end = clock()
            if self.done < self.keep:
                record((t0, t_dns, t_dial, t_sent, t_head, t_end, status, size, err))
            else:
                self.overflow[status, err] += 1
                self.overflow_bytes += size
            self.done += 1
        if conn is not None:
            conn.close()

    def exchange(self, conn, t0):
        """One request/response on `conn`, or on a new connection when it is None.

        Returns the connection to reuse (None once closed), the phase timestamps,
        the status and the body size. The body is counted, never kept.
        """
        target, clock = self.target, time.perf_counter
        phase, reused = DIAL, conn is not None
        try:
            if reused:
                t_dns = t_dial = t0
            else:
                conn, t_dns = dial(target, self.buffer)
                t_dial = clock()
            phase = WRITE
            conn.sock.sendall(target.request)
            t_sent = clock()
            phase = WAIT
            status, length, close = read_head(conn, target.method)
            t_head = clock()
            phase = READ
            deadline = t0 + target.timeout if target.timeout else math.inf
            size = read_body(conn, length, deadline)
            if close or not target.keepalive:
                conn.close()
                conn = None
            return conn, t_dns, t_dial, t_sent, t_head, status, size
        except (OSError, ProtocolError) as exc:
            if conn is not None:
                conn.close()
            if reused and phase in (WRITE, WAIT) and (
                    isinstance(exc, (ConnectionResetError, BrokenPipeError))
                    or str(exc) == "EOF"):
                raise StaleConnection from None
            raise RequestFailed(describe_error(exc, phase, target)) from None


def share(total, parts):
    """Split `total` requests over `parts` workers, remainder to the first ones."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


class Spawned:
    """A daemon thread that is seen to run, or seen not to, within START_TIMEOUT_S.

    threading.Thread.start() waits with no time limit for the new thread to say that it
    runs. A thread the system did create but that cannot make its first Python call (a
    MemoryError: its frame stack is allocated then, and an address-space limit such as
    `ulimit -v` may leave no room for it) dies without saying so, and start() waits
    forever: CPython issue gh-140746, in every version. Which limits land in that window
    depends on the interpreter's build and memory layout (Debian's 3.11.2 hung at
    `ulimit -v 976562` where pyenv's 3.11.7 refused cleanly, and 3.11.7 hangs at other
    limits), so load.py starts its threads with _thread and waits for them itself.
    """

    def __init__(self, target):
        self._target = target
        self._running = _thread.allocate_lock()
        self._done = _thread.allocate_lock()

    def start(self):
        """True once the thread runs; False when it did not begin within START_TIMEOUT_S.

        RuntimeError or MemoryError when the system refuses the thread outright. (Call it
        under quiet_thread_deaths().)
        """
        self._running.acquire()
        self._done.acquire()
        try:
            _thread.start_new_thread(self._run, ())
        except BaseException:
            self._running.release()
            self._done.release()
            raise
        return self._running.acquire(timeout=START_TIMEOUT_S)

    def _run(self):
        self._running.release()
        try:
            self._target()
        finally:
            self._done.release()

    def join(self, timeout=-1):
        """Wait for the thread to end (at most `timeout` seconds); True if it did."""
        if not self._done.acquire(timeout=timeout):
            return False
        self._done.release()
        return True


@contextlib.contextmanager
def quiet_thread_deaths():
    """Drop unraisable exceptions while threads start.

    A thread that dies before it runs (or as it starts waiting, out of memory) has CPython
    print "Exception ignored in thread started by ..." from that thread; load.py says what
    happened in its own one line instead. bool is a hook that needs no memory to run.
    """
    hook, sys.unraisablehook = sys.unraisablehook, bool
    try:
        yield
    finally:
        sys.unraisablehook = hook


class Progress:
    """Rewrites one status line on stderr while a long run is going."""

    def __init__(self, workers, planned, duration, release_time):
        self.workers, self.planned, self.duration = workers, planned, duration
        self.release_time = release_time
        self.finished = threading.Event()
        self.shown = False
        self.thread = Spawned(self.run)

    def start(self):
        """Start the status line's thread; False (and no status line) if none could start."""
        try:
            with quiet_thread_deaths():
                if self.thread.start():
                    return True
        except (RuntimeError, MemoryError):
            pass
        self.finished.set()  # if it does begin after all, it stops at once
        return False

    def run(self):
        if self.finished.wait(PROGRESS_AFTER_S):
            return
        while not self.finished.is_set():
            done = sum(w.done for w in self.workers)
            elapsed = time.perf_counter() - self.release_time
            if self.duration:
                line = f"  {done} requests done, {elapsed:.1f} of {self.duration:g} s"
            else:
                line = f"  {done}/{self.planned} requests done, {elapsed:.1f} s elapsed"
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
            self.shown = True
            self.finished.wait(PROGRESS_EVERY_S)

    def close(self):
        self.finished.set()
        self.thread.join()
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


class Run:
    """The outcome of a run: per-worker stamps plus what the clock said."""

    def __init__(self, workers, errors, start, total, interrupted, kept_counts, started_at):
        self.workers, self.errors, self.start = workers, errors, start
        self.total, self.interrupted, self.kept_counts = total, interrupted, kept_counts
        self.started_at = started_at  # Unix time of offset 0

    def rows(self):
        """All kept requests as Rows, in start order (each worker's are already)."""
        streams = [self._worker_rows(w, n) for w, n in zip(self.workers, self.kept_counts)]
        return heapq.merge(*streams, key=lambda row: (row.start_s, row.end_s))

    def _worker_rows(self, worker, count):
        stamps, messages, origin = worker.stamps, self.errors.messages, self.start
        for i in range(0, count * FIELDS, FIELDS):
            t0, t_dns, t_dial, t_sent, t_head, t_end, status, size, err = stamps[i:i + FIELDS]
            if err < 0:
                yield Row(t0 - origin, t_end - origin, t_dial - t0, t_dns - t0, t_sent - t_dial,
                          t_head - t_sent, t_end - t_head, int(status), int(size), None)
            else:
                yield Row(t0 - origin, t_end - origin, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0,
                          messages[int(err)])

    def overflow(self):
        """Totals of requests past MAX_KEPT_ROWS: (status codes, errors, bytes)."""
        statuses, errors, size = Counter(), Counter(), 0
        for worker in self.workers:
            for (status, err), count in worker.overflow.items():
                if err < 0:
                    statuses[status] += count
                else:
                    errors[self.errors.messages[err]] += count
            size += worker.overflow_bytes
        return statuses, errors, size


def start_threads(threads, gate):
    """Start the workers (Spawned), each on a WORKER_STACK stack, and meet them at `gate`.

    At the system's thread limit, or when a thread was created but never ran or could not
    wait at the gate (too little memory), the gate is broken (the started ones return at
    once) and the run refused: no request has been sent yet.
    """
    with quiet_thread_deaths():
        try:
            _start_and_meet(threads, gate)
        except MemoryError:  # here, in this thread
            refuse_start(threads, len(threads), gate, "out of memory")


def _start_and_meet(threads, gate):
    previous = threading.stack_size(WORKER_STACK)
    try:
        for started, thread in enumerate(threads):
            try:
                running = thread.start()
            except (RuntimeError, MemoryError):
                running = False
            if not running:
                refuse_start(threads, started, gate, f"only {started}")
    finally:
        threading.stack_size(previous)
    try:
        # Each worker said it runs just before it waits here: only one that died on its
        # way (out of memory) keeps the others waiting, and then the gate breaks.
        gate.wait(START_TIMEOUT_S)
    except threading.BrokenBarrierError:
        refuse_start(threads, len(threads), gate, "not all of them could run")


def refuse_start(threads, started, gate, why):
    """Break the gate, let the started workers return, and refuse the run."""
    gate.abort()
    deadline = time.monotonic() + START_TIMEOUT_S
    for index in range(started):  # no slice: memory may be short
        threads[index].join(max(0.0, deadline - time.monotonic()))
    raise UsageError(f"cannot start {len(threads)} threads ({why}): lower -c")


def run_load(opts, show_progress=False):
    """Start the workers together, wait for them (or -z, or Ctrl-C) and return a Run."""
    counts = share(opts.n, opts.c) if opts.duration is None else [sys.maxsize] * opts.c
    keep = -(-MAX_KEPT_ROWS // opts.c)
    stop, errors, clock, wall = threading.Event(), ErrorBook(), [], []

    def release():
        # The barrier's action runs once every thread is waiting, just before all are
        # released: that instant is offset 0 of the run, and its Unix time is started_at.
        clock.append(time.perf_counter())
        wall.append(time.time())

    gate = threading.Barrier(opts.c + 1, action=release)
    workers = [Worker(opts.target, n, opts.q, gate, stop, errors, keep) for n in counts]
    threads = [Spawned(w.run) for w in workers]
    progress = None
    interrupted = False
    if threading.current_thread() is threading.main_thread():
        # Even if our parent ignored SIGINT (e.g. started us in the background).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        start_threads(threads, gate)
        if show_progress:
            progress = Progress(workers, opts.n, opts.duration, clock[0])
            if not progress.start():
                progress = None
        if opts.duration is not None:
            stop.wait(opts.duration - (time.perf_counter() - clock[0]))
            stop.set()  # workers finish the request they are in, then stop (as hey)
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the report
        interrupted = True
        stop.set()
        gate.abort()
    end = time.perf_counter()
    if progress is not None:
        progress.close()
    # Snapshot how many rows each worker has now: abandoned in-flight requests that
    # finish while we report are left out.
    kept_counts = [len(w.stamps) // FIELDS for w in workers]
    start = clock[0] if clock else end
    last_end = max((w.stamps[n * FIELDS - 4] for w, n in zip(workers, kept_counts) if n),
                   default=start)
    overflowed = any(w.overflow for w in workers)
    total = end - start if interrupted or overflowed else max(last_end - start, 0.0)
    started_at = wall[0] if wall else time.time()
    return Run(workers, errors, start, total, interrupted, kept_counts, started_at)


# --- Statistics: pure functions over Rows --------------------------------------------


def percentiles(sorted_latencies):
    """{p: latency} for p in PERCENTS.

    Definition (hey's): p% is the value at index ceil(n * p / 100) of the sorted
    list, clamped to the last one. Where hey runs out of samples and prints 0
    (e.g. 95% and 99% of 10 requests) this gives the slowest instead.
    """
    n = len(sorted_latencies)
    if not n:
        return {p: None for p in PERCENTS}
    return {p: sorted_latencies[min(-(-n * p // 100), n - 1)] for p in PERCENTS}


def histogram(latencies, buckets=HISTOGRAM_BUCKETS):
    """[(mark, count)] with buckets + 1 marks, hey's definition.

    Marks are fastest + i * (slowest - fastest) / buckets for i in 0..buckets-1,
    then slowest itself. Each latency is counted at the first mark >= it, so the
    first mark holds only the fastest value(s); if all latencies are equal they
    all land on the first mark.
    """
    if not latencies:
        return []
    fastest, slowest = min(latencies), max(latencies)
    step = (slowest - fastest) / buckets
    marks = [fastest + step * i for i in range(buckets)] + [slowest]
    counts = [0] * len(marks)
    for latency in latencies:
        counts[bisect_left(marks, latency)] += 1
    return list(zip(marks, counts))


def bar_length(count, max_count, width=BAR_WIDTH):
    """Bar length for a histogram row: count scaled to width, rounded (as hey)."""
    return (count * width + max_count // 2) // max_count if max_count else 0


_PHASES = ("dns_dialup", "dns_lookup", "req_write", "resp_wait", "resp_read")


def summarize(rows, total, url="", method="GET", concurrency=0, interrupted=False,
              overflow=None, started_at=None):
    """All report figures (the JSON schema minus the timeline) from Rows.

    Latency figures cover requests that got a response; errors are only counted.
    `overflow` is (status Counter, error Counter, bytes) for requests not kept as rows.
    `started_at` is the Unix time the requests were released; with it, ended_at is
    started_at + total_s, so that server logs can be matched to the run.
    """
    latencies, statuses, errors = [], Counter(), Counter()
    phase_sums = [0.0] * 5
    phase_min = [math.inf] * 5
    phase_max = [-math.inf] * 5
    size_total = kept = 0
    for row in rows:
        kept += 1
        if row.status is None:
            errors[row.error] += 1
            continue
        latencies.append(row.end_s - row.start_s)
        statuses[row.status] += 1
        size_total += row.bytes
        for i, value in enumerate(row[2:7]):
            phase_sums[i] += value
            phase_min[i] = min(phase_min[i], value)
            phase_max[i] = max(phase_max[i], value)
    responses_kept = len(latencies)
    if overflow:
        more_statuses, more_errors, more_bytes = overflow
        statuses.update(more_statuses)
        errors.update(more_errors)
        size_total += more_bytes
    responses = sum(statuses.values())
    latencies.sort()

    def phase(i):
        if not responses_kept:
            return {"average": None, "fastest": None, "slowest": None}
        return {"average": phase_sums[i] / responses_kept,
                "fastest": phase_min[i], "slowest": phase_max[i]}

    return {
        "url": url,
        "method": method,
        "requests": responses + sum(errors.values()),
        "concurrency": concurrency,
        "started_at": started_at,
        "ended_at": None if started_at is None else started_at + total,
        "total_s": total,
        "slowest_s": latencies[-1] if latencies else None,
        "fastest_s": latencies[0] if latencies else None,
        "average_s": sum(latencies) / len(latencies) if latencies else None,
        "rps": responses / total if total > 0 else 0.0,
        "total_data_bytes": size_total,
        "size_per_request": size_total / responses if responses else None,
        "histogram": [{"mark_s": m, "count": c} for m, c in histogram(latencies)],
        "latency_distribution": {str(p): v for p, v in percentiles(latencies).items()},
        "details": {name: phase(i) for i, name in enumerate(_PHASES)},
        "status_codes": {str(code): statuses[code] for code in sorted(statuses)},
        "errors": dict(errors.most_common()),
        "interrupted": interrupted,
        "kept_rows": kept,
    }


# --- Output ----------------------------------------------------------------------


def _secs(value):
    return "n/a" if value is None else f"{value:4.4f}"


def format_report(summary):
    """The text report, in hey's layout (tabs, blank lines and all)."""
    s = summary
    out = ["", "Summary:",
           f"  Total:\t{_secs(s['total_s'])} secs",
           f"  Slowest:\t{_secs(s['slowest_s'])} secs",
           f"  Fastest:\t{_secs(s['fastest_s'])} secs",
           f"  Average:\t{_secs(s['average_s'])} secs",
           f"  Requests/sec:\t{s['rps']:4.4f}",
           "  "]
    if s["total_data_bytes"] > 0:
        out += [f"  Total data:\t{s['total_data_bytes']} bytes",
                f"  Size/request:\t{int(s['size_per_request'])} bytes"]
    out += ["", "Response time histogram:"]
    max_count = max((b["count"] for b in s["histogram"]), default=0)
    for bucket in s["histogram"]:
        bar = BAR_CHAR * bar_length(bucket["count"], max_count)
        out.append(f"  {bucket['mark_s']:4.3f} [{bucket['count']}]\t|{bar}")
    out += ["", "", "Latency distribution:"]
    if s["slowest_s"] is not None:
        out += [f"  {p}% in {_secs(v)} secs" for p, v in s["latency_distribution"].items()]
    out += ["", "Details (average, fastest, slowest):"]
    labels = ("DNS+dialup", "DNS-lookup", "req write", "resp wait", "resp read")
    for label, name in zip(labels, _PHASES):
        d = s["details"][name]
        out.append(f"  {label}:\t{_secs(d['average'])} secs, {_secs(d['fastest'])} secs, "
                   f"{_secs(d['slowest'])} secs")
    out += ["", "Status code distribution:"]
    out += [f"  [{code}]\t{count} responses" for code, count in s["status_codes"].items()]
    if s["errors"]:
        out += ["", "Error distribution:"]
        out += [f"  [{count}]\t{message}" for message, count in s["errors"].items()]
        out.append("")
    else:
        out += ["", "", ""]  # hey's trailing blank lines
    if s["kept_rows"] < s["requests"]:
        out.append(f"Note: latency figures cover the first {s['kept_rows']} requests; "
                   f"all {s['requests']} are in the counts.")
    if s["interrupted"]:
        out.append(f"Interrupted after {s['total_s']:.2f} s: {s['requests']} requests finished.")
    return "\n".join(out) + "\n"


def render_timeline(rows, total, width=80):
    """One text row per request on a shared 0..total axis; returns the string.

    `rows` are (start_s, end_s, status_or_None) tuples; errors are drawn with 'x'.
    Rows are sorted by the column their bar starts in, then by end: requests sent
    together (microseconds apart) line up by when they finished, so a server that
    answers one at a time draws a staircase. Past TIMELINE_MAX_ROWS, evenly spaced
    rows are shown (numbered by their place among all rows), and the header says so.
    """
    total = max(total, max((r[1] for r in rows), default=0.0), 1e-9)
    bar_width = max(10, width - 24)
    rows = sorted(rows, key=lambda r: (int(r[0] / total * bar_width), r[1]))
    n = len(rows)
    picked = range(n)
    header = f"Timeline (one row per request, 0 to {total:.2f} s):"
    if n > TIMELINE_MAX_ROWS:
        step = (n - 1) / (TIMELINE_MAX_ROWS - 1)
        picked = sorted({round(i * step) for i in range(TIMELINE_MAX_ROWS)})
        header = (f"Timeline ({len(picked)} of {n} requests, evenly spaced, "
                  f"0 to {total:.2f} s):")
    lines = [header]
    for index in picked:
        start, end, status = rows[index][:3]
        first = min(int(start / total * bar_width), bar_width - 1)
        last = max(first + 1, min(math.ceil(end / total * bar_width), bar_width))
        mark = "\u2588" if status is not None else "x"
        bar = " " * first + mark * (last - first) + " " * (bar_width - last)
        label = status if status is not None else "error"
        lines.append(f"{index + 1:4d} |{bar}| {end - start:5.2f} s {label}")
    return "\n".join(lines) + "\n"


def _rounded(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _timeline_entry(row):
    return {"start_s": row.start_s, "end_s": row.end_s, "status": row.status,
            "error": row.error, "dns_dialup_s": row.dns_dialup_s, "dns_s": row.dns_s,
            "req_write_s": row.req_write_s, "resp_wait_s": row.resp_wait_s,
            "resp_read_s": row.resp_read_s, "bytes": row.bytes}


def write_json(summary, rows, out):
    """One JSON object; the timeline is streamed so a long run needs no huge list."""
    fields = {k: v for k, v in summary.items() if k != "kept_rows"}
    out.write(json.dumps(_rounded(fields))[:-1] + ', "timeline": [')
    for i, row in enumerate(rows):
        out.write((", " if i else "") + json.dumps(_rounded(_timeline_entry(row))))
    out.write("]}\n")


def write_csv(rows, out):
    """hey's -o csv: one line per response, in start order."""
    out.write("response-time,DNS+dialup,DNS,Request-write,Response-delay,"
              "Response-read,status-code,offset\n")
    for r in rows:
        if r.status is not None:
            out.write(f"{r.end_s - r.start_s:4.4f},{r.dns_dialup_s:4.4f},{r.dns_s:4.4f},"
                      f"{r.req_write_s:4.4f},{r.resp_wait_s:4.4f},{r.resp_read_s:4.4f},"
                      f"{r.status},{r.start_s:4.4f}\n")


# --- Main --------------------------------------------------------------------------


def _usage_error(message):
    print(f"load.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    # Everything that can be wrong with the command line or the environment is found
    # here, before the first request.
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        check_open_files(opts.c)
        if opts.save:
            check_save_file(opts.save)
    except UsageError as exc:
        return _usage_error(exc)

    try:
        run = run_load(opts, show_progress=sys.stderr.isatty())
    except UsageError as exc:
        return _usage_error(exc)
    except MemoryError:  # under an address-space limit (ulimit -v) too low for -c threads
        return _usage_error(f"out of memory with -c {opts.c}: lower -c")
    if threading.current_thread() is threading.main_thread():
        # The run is over: a Ctrl-C now would only cut the report (and --save) short with a
        # KeyboardInterrupt traceback, even during the interpreter's exit. It is ignored, as
        # after an interrupted run; the report takes a moment.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    summary = summarize(run.rows(), run.total, url=opts.url, method=opts.m,
                        concurrency=opts.c, interrupted=run.interrupted,
                        overflow=run.overflow(), started_at=run.started_at)
    out = sys.stdout
    if opts.json:
        write_json(summary, run.rows(), out)
    elif opts.o == "csv":
        write_csv(run.rows(), out)
    else:
        out.write(format_report(summary))
        if opts.timeline:
            bars = [(r.start_s, r.end_s, r.status) for r in run.rows()]
            out.write(render_timeline(bars, run.total, shutil.get_terminal_size().columns))
    out.flush()
    if opts.save:
        try:
            with open(opts.save, "w") as saved:
                write_json(summary, run.rows(), saved)
        except OSError as exc:  # a full disk, say: the report above is all there is
            return _usage_error(f"--save {opts.save}: {exc.strerror or exc}")

    if run.interrupted:
        return 130
    return 0 if summary["status_codes"] else 1


if __name__ == "__main__":
    sys.exit(main())
