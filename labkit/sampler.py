"""The connections a lab holds, as PostgreSQL counts them: sampled from pg_stat_activity.

Every request in flight on the database route holds a PostgreSQL backend; an idle pool holds
more. `lab.py --connections FILE` starts this sampler beside the server: a light child process
(it imports psycopg2, which the server's master must not) that holds one connection of its own
from the start, so that it still sees when the server refuses everybody else, and appends one
JSON line to FILE each time the lab's count changes:

    {"event": "connections", "at": 1764650000.123, "setup": "all", "held": 10, "active": 10,
     "idle": 0}

report.py reads the most held during each scenario, and what a burst left open after it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import lab
from labkit import procs

SAMPLE_PERIOD = 0.1  # seconds between two looks: each is a query, so not often (every lab of a
# run samples, idle or not), yet several times per held connection
# The lab's backends: held = all, active = running a query, idle = kept between requests.
CONNECTIONS_QUERY = ("SELECT count(*), count(*) FILTER (WHERE state = 'active'), "
                     "count(*) FILTER (WHERE state LIKE 'idle%%') FROM pg_stat_activity "
                     "WHERE application_name = %s")
STOP_WITHIN = 2.0  # seconds the sampler has to go after SIGTERM before it is killed


@contextmanager
def sampling(options, url):
    """The sampler, running while the block runs (nothing without --connections)."""
    if not options.kit.connections:
        yield
        return
    env = {**os.environ, "DATABASE_URL": url, "AWL_APPLICATION_NAME": options.application_name,
           "AWL_CONNECTIONS": options.kit.connections, "AWL_SETUP": options.setup,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # Stop signals are held back until the child is ours to stop: an interrupt landing while
    # Popen starts it would otherwise leave it with nobody to stop it.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, procs.STOP_SIGNALS)
    try:
        sampler = subprocess.Popen([sys.executable, "-m", "labkit.sampler"], env=env,
                                   stdin=subprocess.DEVNULL,
                                   preexec_fn=procs.child_setup(signal.SIGTERM))  # noqa: PLW1509
    except OSError as exc:  # no process left to start (ulimit -u)
        raise lab.LabError(f"cannot start the connection sampler: {exc.strerror}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        yield
    finally:
        procs.stop(sampler, signal.SIGTERM, STOP_WITHIN)


def sample_forever(url, name, path, setup):
    """The sampler's loop: one JSON line each time (held, active, idle) changes."""
    import psycopg2

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
            procs.append_line(path, json.dumps({"event": "connections",
                                                "at": round(time.time(), 6), "setup": setup,
                                                "held": held, "active": active, "idle": idle}))
        time.sleep(SAMPLE_PERIOD)


def main():
    # Its parent stops it with SIGTERM (and it dies with its parent): the terminal's Ctrl-C
    # and hang-up are the parent's to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    env = os.environ
    try:
        sample_forever(env["DATABASE_URL"], env["AWL_APPLICATION_NAME"], env["AWL_CONNECTIONS"],
                       env["AWL_SETUP"])
    except KeyError as exc:
        print(f"labkit.sampler: error: {exc} is not set (lab.py --connections starts this)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
