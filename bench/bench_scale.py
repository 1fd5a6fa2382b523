"""Benchmark, not a test: the lab at scale, with figures to put in the README.

    python bench/bench_scale.py                # h = d = 1 s, everything (about 5 minutes)
    python bench/bench_scale.py --quick        # without the 60-second hey run at 50 a worker

1. A thousand at once on the HTTP route (-n 1000 -c 1000), load.py and the real hey side by
   side: the slow service alone (the floor), the article's 50 a worker (ceil(1000/50) = 20
   rounds), then --worker-connections 1000 in one worker and 500 in each of two. The CPU the
   workers and the slow service spent is read from /proc: where the time above h goes.
2. The most PostgreSQL connections each setup held during a burst on the database route
   (sampled from pg_stat_activity by lab.py --connections), against max_connections = 100.
3. The pooled setup's totals against ceil(n / max_size) x d, for several pool sizes.
4. Idle connections left open after a burst, with CONN_MAX_AGE 0 and 60.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lab
import report
from labkit import plan

PY = sys.executable
MAX_CONNECTIONS = plan.SCALE_MAX_CONNECTIONS


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url, process, seconds=90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"bench_scale.py: {url} did not start")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"bench_scale.py: {url} did not answer within {seconds} s")


class Services:
    """slow_server.py and an embedded PostgreSQL with max_connections = 100, for every lab."""

    def __init__(self, delay, work):
        self.delay, self.work = delay, work
        port = free_port()
        self.slow_url = f"http://127.0.0.1:{port}"
        self.slow = subprocess.Popen([PY, "slow_server.py", "--bind", f"127.0.0.1:{port}",
                                      "--delay", str(delay)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.db = subprocess.Popen([PY, "lab.py", "--database-only", "--max-connections",
                                    str(MAX_CONNECTIONS)], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        line = self.db.stdout.readline()
        if not line.startswith("DATABASE_URL="):
            self.stop()
            sys.exit("bench_scale.py: the embedded PostgreSQL did not start")
        self.database_url = line.strip().split("=", 1)[1]
        wait_for(self.slow_url + "/healthz", self.slow)

    def stop(self):
        for process in (self.slow, self.db):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)


class Lab:
    def __init__(self, services, setup, flags=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = services.work / f"{setup}-{self.port}.connections"
        self.process = subprocess.Popen(
            [PY, "lab.py", "--setup", setup, "--bind", f"127.0.0.1:{self.port}", "--slow-url",
             services.slow_url, "--delay", str(services.delay), "--connections",
             str(self.connections), *flags],
            cwd=ROOT, env={**os.environ, "DATABASE_URL": services.database_url},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.url + "/healthcheck/readiness", self.process)

    def workers(self):
        return [pid for pid in children(self.process.pid)
                if b"labkit.sampler" not in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def cpu_seconds(pids):
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def with_load_py(url, n, c):
    out = subprocess.run([PY, "load.py", "-n", str(n), "-c", str(c), "-t", "120", "--json", url],
                         cwd=ROOT, capture_output=True, text=True, check=False).stdout
    figures = json.loads(out)
    return figures["total_s"], sum(figures["errors"].values()) + sum(
        count for status, count in figures["status_codes"].items() if status != "200"), figures


def with_hey(url, n, c, *flags):
    out = subprocess.run(["hey", "-n", str(n), "-c", str(c), "-t", "120", *flags, url],
                         capture_output=True, text=True, check=False).stdout
    total = float(re.search(r"Total:\s+([\d.]+) secs", out).group(1))
    ok = sum(int(x) for x in re.findall(r"\[200\]\s+(\d+) responses", out))
    return total, n - ok, None


def timed_runs(url, tool, repeat, pids, slow_pid):
    """Run the tool `repeat` times; the median total, the errors, and the median CPU seconds
    the lab's workers and the slow service spent per run."""
    measure, extra = TOOLS[tool]
    runs = []
    for _ in range(repeat):
        before, slow_before = cpu_seconds(pids), cpu_seconds([slow_pid])
        total, errors, _ = measure(url, 1000, 1000, *extra)
        runs.append((total, errors, cpu_seconds(pids) - before,
                     cpu_seconds([slow_pid]) - slow_before))
        time.sleep(1)  # the closed connections leave TIME_WAIT before the next run
    totals = sorted(run[0] for run in runs)
    return {"total_s": statistics.median(totals), "min_s": totals[0], "max_s": totals[-1],
            "errors": sum(run[1] for run in runs),
            "worker_cpu_s": round(statistics.median(run[2] for run in runs), 3),
            "slow_server_cpu_s": round(statistics.median(run[3] for run in runs), 3)}


TOOLS = {"load.py": (with_load_py, ()), "hey": (with_hey, ()),
         "hey -disable-keepalive": (with_hey, ("-disable-keepalive",))}


def thousand_at_once(services, quick, repeat, rows):
    print("\n1. A thousand at once on the HTTP route: -n 1000 -c 1000, h =",
          f"{services.delay:g} s; median of {repeat} runs [min-max]; CPU seconds per run")
    print(f"{'what':<40} {'tool':<22} {'total':>20} {'model':>6} {'errors':>6} "
          f"{'workers':>8} {'slow':>6}")
    tools = ["load.py"]
    if shutil.which("hey"):
        tools.append("hey")
    else:
        print("  (hey is not installed: apt-get install hey)")

    def show(name, tool, model, figures):
        spread = f"{figures['total_s']:.2f} [{figures['min_s']:.2f}-{figures['max_s']:.2f}] s"
        workers = f"{figures['worker_cpu_s']:.2f}" if figures["worker_cpu_s"] else "-"
        print(f"{name:<40} {tool:<22} {spread:>20} {model:>4.1f} s {figures['errors']:>6} "
              f"{workers:>8} {figures['slow_server_cpu_s']:>6.2f}", flush=True)

    # The floor: the slow service alone, 1,000 at once from the same tools.
    alone = services.slow_url + "/api/v1/movies"
    for tool in tools:
        figures = timed_runs(alone, tool, repeat, [], services.slow.pid)
        show("slow_server.py alone", tool, services.delay, figures)
        rows.append({"part": "thousand", "setup": "slow_server.py alone", "flags": [],
                     "tool": tool, "model_s": services.delay, **figures})
    configs = [("almost_all", ()),
               ("all", ("--worker-connections", "1000")),
               ("all", ("--worker-connections", "500", "--workers", "2"))]
    for setup, flags in configs:
        settings = {"worker_connections": int(flags[1]) if flags else 50,
                    "workers": int(flags[flags.index("--workers") + 1])
                    if "--workers" in flags else 1}
        model = plan.model_seconds(setup, "http", 1000, 1000, services.delay, services.delay,
                                  settings=settings)
        # At 50 a worker (20 rounds) one run is enough, and hey's keep-alive holds each slot
        # for Gunicorn's keepalive after its response: 3 times as long, shown unless --quick.
        runs = 1 if not flags else repeat
        setup_tools = ["load.py", "hey -disable-keepalive"] if not flags else tools
        if not flags and not quick and "hey" in tools:
            setup_tools.append("hey")
        with Lab(services, setup, flags) as running:
            url = running.url + lab.ROUTES["http"].path
            for tool in setup_tools:
                if tool.startswith("hey") and "hey" not in tools:
                    continue
                figures = timed_runs(url, tool, runs, running.workers(), services.slow.pid)
                show(f"{setup} {' '.join(flags) or '(50 a worker)'}", tool, model, figures)
                rows.append({"part": "thousand", "setup": setup, "flags": list(flags),
                             "tool": tool, "model_s": model, **figures})


def burst(running, n, c, path=lab.ROUTES["db"].path):
    total, errors, figures = with_load_py(running.url + path, n, c)
    time.sleep(report.CONNECTIONS_AFTER_S + 0.3)
    summary = report.connection_summary(
        report.read_events(running.connections, "connections"),
        (figures["started_at"], figures["ended_at"]))
    return total, errors, summary


def peak_connections(services, rows):
    print(f"\n2. PostgreSQL connections held during a burst on the database route "
          f"(max_connections {MAX_CONNECTIONS}; d = {services.delay:g} s)")
    print(f"{'setup':<34} {'n':>4} {'c':>4} {'total':>8} {'model':>7} {'errors':>6} "
          f"{'peak':>5} {'left':>5}")
    configs = [("nothing", (), 10, 10), ("threads", ("--threads", "50"), 50, 50),
               ("asgi", ("--worker-connections", "1000"), 50, 50),
               ("all", ("--worker-connections", "1000"), 50, 50),
               ("all", ("--worker-connections", "1000"), 300, 300),
               ("all", ("--worker-connections", "1000", "--workers", "2"), 50, 50),
               ("pooled", ("--worker-connections", "1000"), 300, 300)]
    for setup, flags, n, c in configs:
        settings = {}
        for flag, key in (("--threads", "threads"), ("--worker-connections",
                                                     "worker_connections"),
                          ("--workers", "workers")):
            if flag in flags:
                settings[key] = int(flags[flags.index(flag) + 1])
        model = plan.model_seconds(setup, "db", n, c, services.delay, services.delay,
                                  settings=settings)
        with Lab(services, setup, ("--db-pool", "0", *flags)) as running:
            total, errors, summary = burst(running, n, c)
        name = f"{setup} {' '.join(flags)}"
        print(f"{name:<34} {n:>4} {c:>4} {total:>6.2f} s {model:>5.1f} s {errors:>6} "
              f"{summary['peak']:>5} {summary['left']:>5}", flush=True)
        rows.append({"part": "connections", "setup": setup, "flags": list(flags), "n": n,
                     "c": c, "total_s": total, "model_s": model, "errors": errors,
                     **summary})


def pooled_totals(services, rows):
    print(f"\n3. pooled: totals against ceil(n / max_size) x d (n = c = 300, d = "
          f"{services.delay:g} s, pool timeout 60 s)")
    print(f"{'max_size':>8} {'total':>8} {'model':>7} {'vs model':>9} {'errors':>6} {'peak':>5}")
    for size in (25, 50, 90):
        model = math.ceil(300 / size) * services.delay
        with Lab(services, "pooled", ("--worker-connections", "1000", "--pool-size", str(size),
                                      "--pool-timeout", "60")) as running:
            total, errors, summary = burst(running, 300, 300)
        print(f"{size:>8} {total:>6.2f} s {model:>5.1f} s {(total / model - 1) * 100:>+8.1f}% "
              f"{errors:>6} {summary['peak']:>5}", flush=True)
        rows.append({"part": "pooled", "max_size": size, "total_s": total, "model_s": model,
                     "errors": errors, **summary})


def idle_left(services, rows):
    print("\n4. Connections left open 0.5 s after a burst of 20 (the lab's own idle "
          "connections off: --db-pool 0)")
    print(f"{'setup':<10} {'CONN_MAX_AGE':>12} {'peak':>5} {'left':>5} {'left after 2nd':>15}")
    for setup in ("nothing", "threads", "all", "asgi"):
        for age in ("0", "60"):
            flags = ("--db-pool", "0", "--conn-max-age", age)
            if setup == "threads":
                flags += ("--threads", "20")
            if setup in ("all", "asgi"):
                flags += ("--worker-connections", "1000")
            with Lab(services, setup, flags) as running:
                n = 2 if setup == "nothing" else 20
                _, _, first = burst(running, n, n, lab.ROUTES["db"].path + "?seconds_to_sleep=0.2")
                _, _, second = burst(running, n, n, lab.ROUTES["db"].path + "?seconds_to_sleep=0.2")
            print(f"{setup:<10} {age:>12} {first['peak']:>5} {first['left']:>5} "
                  f"{second['left']:>15}", flush=True)
            rows.append({"part": "idle", "setup": setup, "conn_max_age": int(age), "n": n,
                         "peak": first["peak"], "left": first["left"],
                         "left_after_second": second["left"]})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=1.0, help="h and d, seconds")
    parser.add_argument("--quick", action="store_true",
                        help="skip hey with keep-alive at 50 a worker (about 60 s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each 1,000-at-once measurement (the median is shown)")
    parser.add_argument("--only", choices=("thousand", "connections", "pooled", "idle"),
                        action="append", help="run only these parts")
    parser.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    args = parser.parse_args(argv)
    parts = args.only or ["thousand", "connections", "pooled", "idle"]
    work = Path(tempfile.mkdtemp(prefix="awl-bench-scale-"))
    services = Services(args.delay, work)
    rows = []
    try:
        if "thousand" in parts:
            thousand_at_once(services, args.quick, args.repeat, rows)
        if "connections" in parts:
            peak_connections(services, rows)
        if "pooled" in parts:
            pooled_totals(services, rows)
        if "idle" in parts:
            idle_left(services, rows)
    finally:
        services.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
