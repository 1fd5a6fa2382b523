"""Every mistake before anything starts: one line, exit 2, with its real cause.

lab.py checks its own flags' ranges. With this kit beside it, it also adds the kit's flags
(add_flags) and, before it starts a database or a server, checks what would otherwise fail
late, in a log, or in the middle of a measurement (before_start):

- the port is free (Gunicorn would retry for five seconds, then give up);
- --slow-url is an http:// URL with a port;
- --events and --connections files can be written;
- the machine's limits hold the requests at once: open files and threads;
- TMPDIR can hold the embedded PostgreSQL's folder and socket.

Once the database runs, fit_database() reads what it allows (max_connections, less the
reserved slots) and shrinks the idle connections each worker keeps so that all fit.
`lab.py --check` runs all of it, connecting to DATABASE_URL the way the lab will, and starts
nothing: ./run_all.sh asks it first, for every lab of a run.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

import lab
from labkit import sampler

DEFAULT_DB_POOL = 10  # idle PostgreSQL connections a worker keeps between requests
DEFAULT_MONITOR_THRESHOLD = 0.1  # seconds an event loop may be blocked before it is named
FILES_PER_REQUEST = 3  # the client's socket, one to the slow service, one to PostgreSQL
SPARE_FILES = 64  # Python, Django, Gunicorn's pipes and logs
POSTGRES_TASKS = 10  # PostgreSQL 18's postmaster, background processes, I/O workers
# What PostgreSQL allows: max_connections, less the slots only superusers (and, from version
# 16, roles granted pg_use_reserved_connections) may take.
CONNECTION_SETTINGS = ("max_connections", "superuser_reserved_connections",
                       "reserved_connections")


@dataclass(frozen=True)
class Kit:
    """The kit's part of lab.Options (Options.kit)."""
    db_pool: int  # idle PostgreSQL connections a worker keeps (labkit/warm.py)
    monitor_threshold: float  # labkit/monitor.py; 0: off, and off without an event loop
    events: str  # --events FILE, resolved
    connections: str  # --connections FILE, resolved (labkit/sampler.py)
    max_connections: int  # the embedded PostgreSQL's (labkit/postgres.py), None: its default


# --- The kit's flags -------------------------------------------------------------------------

def add_flags(parser):
    add = parser.add_argument
    add("--db-pool", type=int, help="idle PostgreSQL connections each worker keeps and opens at "
                                    "boot (default: as many requests as it runs at once, at "
                                    f"most {DEFAULT_DB_POOL}; 0: connect per request)")
    add("--http-pool", type=int,
        help="idle connections to the slow service each worker keeps and opens at boot "
             f"(default: {lab.FAN_OUT_CALLS} per request it runs at once up to "
             f"{lab.DEFAULT_HTTP_POOL}, one per request past that, at most {lab.MAX_HTTP_POOL}; "
             "0: connect per call)")
    add("--monitor-threshold", type=float, default=DEFAULT_MONITOR_THRESHOLD, metavar="SECONDS",
        help="gevent and asgi setups: log one line each time the event loop is blocked longer "
             f"than this (default {DEFAULT_MONITOR_THRESHOLD}; 0: off)")
    add("--events", metavar="FILE",
        help="also append each blocked stretch to FILE as one JSON object a line")
    add("--max-connections", type=int, metavar="N",
        help="the embedded PostgreSQL's max_connections (default "
             f"{lab.DEFAULT_MAX_CONNECTIONS}); past it, connects are refused: 503")
    add("--pool-size", type=int, metavar="N",
        help="setup `pooled`: the most PostgreSQL connections a worker holds "
             f"(its max_size; default {lab.SETUPS['pooled'].pool['max_size']})")
    add("--pool-timeout", type=float, metavar="SECONDS",
        help="setup `pooled`: how long a request waits for a free connection before a 503 "
             f"(default {lab.SETUPS['pooled'].pool['timeout']:g})")
    add("--conn-max-age", type=float, metavar="SECONDS",
        help="Django's CONN_MAX_AGE (default 0: close at the end of each request); turns the "
             "lab's own idle connections (--db-pool) off")
    add("--connections", metavar="FILE",
        help="sample pg_stat_activity while serving and append the lab's connection count "
             "(held, active, idle) to FILE as JSON lines when it changes")
    add("--database-only", action="store_true",
        help="start only the embedded PostgreSQL, print its URL, wait for Ctrl-C")
    add("--check", action="store_true",
        help="check the flags and the database URL (connecting to it), start nothing, and "
             "exit: 0 if the lab would start")
    add("--list", action="store_true",
        help="print the scenarios run_all.sh runs (SETUP ROUTE PATH MODEL) and exit")
    add("--all", action="store_true", help="with --list: every setup x route")
    add("--scale", action="store_true", help="with --list: the scenarios of run_all.sh --scale "
                                             "(N C and the labs' flags on each line)")
    add("--json", action="store_true",
        help="with --list: setups, servers, routes and scenarios as one JSON object")


def check_flags(parser, args):
    for flag, value, low, high in (("--db-pool", args.db_pool, 0, 100),
                                   ("--http-pool", args.http_pool, 0, lab.MAX_HTTP_POOL),
                                   ("--max-connections", args.max_connections, 2, 10000),
                                   ("--pool-size", args.pool_size, 1, 1000),
                                   ("--monitor-threshold", args.monitor_threshold, 0, 60),
                                   ("--conn-max-age", args.conn_max_age, 0, 3600)):
        if value is not None and not low <= value <= high:
            what = " (off)" if flag == "--monitor-threshold" else ""
            unit = " seconds" if flag in ("--monitor-threshold", "--conn-max-age") else ""
            parser.error(f"{flag} must be from {low:g}{what} to {high:g}{unit}")
    if args.pool_timeout is not None and not 0 < args.pool_timeout <= 300:
        parser.error("--pool-timeout must be above 0 and at most 300 seconds")
    if args.max_connections is not None and args.database_url and not args.database_only:
        parser.error("--max-connections sets the embedded PostgreSQL's limit; for your own "
                     "server set max_connections in postgresql.conf")
    pooled = lab.SETUPS[args.setup].pool is not None
    for flag, value in (("--pool-size", args.pool_size), ("--pool-timeout", args.pool_timeout)):
        if value is not None and not pooled:
            parser.error(f"{flag} is for a setup with a pool (pooled), not {args.setup}")
    if pooled and args.conn_max_age:
        parser.error("--conn-max-age must be 0 with a pool: Django's pool keeps the connections")


def kit_options(options, args):
    """lab.Options with the kit's flags: its own part (Kit), and what they change in the lab's
    (the slow-service pool, Django's pool, CONN_MAX_AGE)."""
    slots = lab.worker_slots(options.setup, options.settings)
    pool = options.pool and {**options.pool}
    if pool and args.pool_size is not None:
        pool.update(max_size=args.pool_size, min_size=min(pool["min_size"], args.pool_size))
    if pool and args.pool_timeout is not None:
        pool["timeout"] = args.pool_timeout
    has_loop = lab.SERVERS[lab.SETUPS[options.setup].server].event_loop is not None
    kit = Kit(db_pool=first_given(args.db_pool, min(DEFAULT_DB_POOL, slots)),
              monitor_threshold=args.monitor_threshold if has_loop else 0,
              events=args.events and str(Path(args.events).resolve()),
              connections=args.connections and str(Path(args.connections).resolve()),
              max_connections=args.max_connections)
    return replace(options, kit=kit, pool=pool, conn_max_age=args.conn_max_age or 0,
                   http_pool=first_given(args.http_pool, options.http_pool))


def command(args):
    """The function for a flag that runs instead of the server, or None."""
    from labkit import plan, postgres

    if args.list:
        return lambda args, stop: plan.print_list(args.all, args.json, args.scale)
    if args.check:  # also with --database-only: check it, do not start it
        return lambda args, stop: check_only(args)
    if args.database_only:
        return postgres.hold
    return None


# --- Before anything starts ------------------------------------------------------------------

def check_only(args):
    """--check: what the lab checks before it starts anything, the database included; with
    --database-only, what the embedded PostgreSQL needs (labkit.postgres.checked_environment)."""
    if args.database_only:
        from labkit import postgres

        lab.check_installed(None, embedded=True)
        postgres.checked_environment()
        return 0
    lab.check_installed(args.setup, embedded=not args.database_url)
    options = lab.options_from(args, sys.modules[__name__])
    before_start(options)
    if args.database_url:
        check_database_reachable(args.database_url, options)
    return 0


def before_start(options):
    host, port = lab.parse_host_port(options.bind)
    check_port_free(host, port)
    check_slow_url(options.slow_url)
    check_machine_limits(options)
    for flag, path in (("--events", options.kit.events),
                       ("--connections", options.kit.connections)):
        check_output_file(path, flag)
    if not options.database_url:
        from labkit import postgres

        postgres.temp_parent()  # TMPDIR: there, writable, short enough for the socket


def check_port_free(host, port):
    """Fail fast, in one line, where Gunicorn would retry for five seconds and then give up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise lab.LabError(f"cannot bind to {host}:{port}: {getattr(exc, 'strerror', exc)}") \
            from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gunicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise lab.LabError(f"port {port} on {host} is already in use") from None
            raise lab.LabError(f"cannot bind to {host}:{port}: {exc.strerror}") from None


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
        lab.parse_host_port(address)
    except (ValueError, lab.LabError):
        raise lab.LabError(f"--slow-url must be an http:// URL with a port from 1 to 65535, "
                           f"not {url!r}") from None


def check_output_file(path, flag):
    """Create the file now: an empty one says "nothing happened", a missing one "not recorded"."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise lab.LabError(f"{flag}: no such directory: {folder}")
    try:
        Path(path).touch()
    except OSError as exc:
        raise lab.LabError(f"{flag}: cannot write {path}: {exc.strerror}") from None


def check_machine_limits(options):
    """Each request a worker runs holds about three open files, and in the thread setups a
    thread: past the limits, accept() or connect() fail in the middle of a run and the lab
    measures that. A soft open-file limit below the hard one is raised to it (any process may,
    and the workers inherit it); what is still too low is one line, before anything starts."""
    slots = lab.worker_slots(options.setup, options.settings)
    needed = slots * FILES_PER_REQUEST + SPARE_FILES  # per process: each worker has its own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard == resource.RLIM_INFINITY or hard >= needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        else:
            raise lab.LabError(f"{slots} requests at once per worker need about {needed} open "
                               f"files, but the limit is {hard} (raise it with ulimit -n, or "
                               "lower --worker-connections)")
    workers, kit = options.settings["workers"], options.kit
    threaded = lab.SERVERS[lab.SETUPS[options.setup].server].threads_per_request
    # Each process and each thread counts against ulimit -u: per worker, itself, a thread per
    # request (thread servers), the monitor's and gevent's resolver's; the master, its
    # PostgreSQL watcher and the sampler; the embedded PostgreSQL's own processes and a
    # backend for each idle connection the workers keep.
    threads = (slots if threaded else 0) * workers
    tasks = workers * 3 + threads + 3
    if not options.database_url:
        tasks += POSTGRES_TASKS + workers * kit.db_pool
    limit = task_limit()
    if limit is not None and tasks > limit:
        raise lab.LabError(f"about {tasks} processes and threads (the workers, their threads"
                           f"{', the embedded PostgreSQL' * (not options.database_url)}) exceed "
                           f"the {max(limit, 0)} more this user may start (ulimit -u, "
                           "kernel.threads-max)")


def task_limit():
    """How many more processes and threads this user may start, or None when nothing says.
    ulimit -u counts every task the user already runs, so what is left is the limit less
    those (root is not held to it)."""
    limits = []
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
        limits.append(soft - user_tasks())
    try:
        limits.append(int(Path("/proc/sys/kernel/threads-max").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def user_tasks():
    """The tasks (threads of every process) this user runs now."""
    uid, count = os.getuid(), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines()
                          if line.startswith(("Uid:", "Threads:")))
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, ValueError, KeyError):
            continue  # gone meanwhile
    return count


# --- Once the database runs ------------------------------------------------------------------

def fit_database(options, url):
    """Connect as the lab will, read what the server allows, and fit the idle connections."""
    limits = check_database_reachable(url, options)
    return replace(options, kit=replace(options.kit, db_pool=fit_db_pool(
        options.kit.db_pool, options.settings["workers"], limits)))


def sampling(options, url):
    return sampler.sampling(options, url)


def check_database_reachable(url, options):
    """Connect once in a child process (the master must not import psycopg2: see lab.py's
    docstring) with the parameters Django will use, from the URL, and read how many
    connections the server allows: {setting: value}.

    The settings go to the child in its environment, never on its command line (ps shows it).
    """
    settings = lab.database_settings(url)
    probe = ("import json, os, psycopg2\n"
             "s = json.loads(os.environ['AWL_DATABASE'])\n"
             "params = {'dbname': s['NAME'], 'user': s['USER'] or None,\n"
             "          'password': s['PASSWORD'] or None, 'host': s['HOST'] or None,\n"
             "          'port': s['PORT'] or None, **s['OPTIONS']}\n"
             "params.setdefault('connect_timeout', 5)\n"
             "try:\n"
             "    conn = psycopg2.connect(**{k: v for k, v in params.items() if v is not None})\n"
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
                                env={**os.environ, "AWL_DATABASE": json.dumps(settings)},
                                check=False, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise lab.LabError("cannot reach PostgreSQL: no answer within 30 s") from None
    except OSError as exc:  # no process left to start (ulimit -u)
        raise lab.LabError(f"cannot start the database probe: {exc.strerror}") from None
    lines = (result.stdout or result.stderr).strip().splitlines()
    if result.returncode != 0:
        raise lab.LabError(f"cannot reach PostgreSQL: {lines[-1] if lines else 'unknown error'}")
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {}


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
    lab.say(f"--db-pool {db_pool} x {workers} workers exceeds the {allowed} connections "
            f"PostgreSQL allows (max_connections {limits['max_connections']}, {reserved} "
            f"reserved); keeping {fitted} idle connection{'s' * (fitted != 1)} per worker")
    return fitted


def first_given(*values):
    return next(value for value in values if value is not None)
