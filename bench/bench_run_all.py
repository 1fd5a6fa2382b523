"""Benchmark, not a test: does ./run_all.sh wait only for the waits?

    python bench/bench_run_all.py              # full run (1 s delays) and quick run (0.2 s)
    python bench/bench_run_all.py --rounds 3   # each run three times; the median is quoted
    python bench/bench_run_all.py --idle-check # also: do idle labs move a measured one?

For each run it prints the wall time of the whole ./run_all.sh (after the first run's install),
the sum of its scenarios' model times (from lab.py), their ratio against the goal (1.1 for the
full run, 1.5 for the quick one), and each scenario's measured/model at the 1 s delay (goal:
within 3 %). --idle-check times the `all / db` scenario on a lab running alone and on the same lab
with two other labs idle beside it, alternately, and prints both medians.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lab
from labkit import plan

PY = str(ROOT / ".venv" / "bin" / "python")
GOALS = {1.0: 1.10, 0.2: 1.50}  # delay -> wall time / sum of model times
GOAL_OVER_MODEL = 0.03  # each scenario at the 1 s delay


def model_sum(delay, n=10, c=10):
    return sum(plan.model_seconds(s, r, n, c, delay, delay) for s, r, _ in plan.scenarios())


def time_run_all(delay):
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "run_all.sh"), "--json", "--delay", str(delay)],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    took = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"run_all.sh failed:\n{result.stderr[-2000:]}")
    return took, [json.loads(line) for line in result.stdout.splitlines()]


def bench_run_all(delay, rounds):
    walls, worst = [], 0.0
    for _ in range(rounds):
        wall, scenarios = time_run_all(delay)
        walls.append(wall)
        if delay == 1.0:
            for s in scenarios:
                worst = max(worst, s["total_s"] / s["model_s"] - 1)
    wall, models = statistics.median(walls), model_sum(delay)
    goal = GOALS.get(delay)
    verdict = "" if goal is None else f" (goal <= {goal:.2f}: {'ok' if wall / models <= goal else 'over'})"
    print(f"./run_all.sh --delay {delay:g}: {wall:.2f} s for {models:.2f} s of model time "
          f"= {wall / models:.3f} x{verdict}; runs: {' '.join(f'{w:.2f}' for w in walls)}")
    if delay == 1.0:
        print(f"  worst scenario: {worst * 100:+.1f} % over its model "
              f"(goal: within {GOAL_OVER_MODEL * 100:.0f} %)")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args, log):
    return subprocess.Popen([PY, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url):
    for _ in range(600):
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{url} did not answer")


def idle_check(rounds, delay=1.0):
    """The same lab measured alone, then with two idle labs beside it, in turn."""
    slow_port, ports = free_port(), {s: free_port() for s in ("all", "almost_all", "nothing")}
    slow_url = f"http://127.0.0.1:{slow_port}"
    procs, log = [], open(os.devnull, "w")  # noqa: SIM115 (closed below)
    db = subprocess.Popen([PY, "lab.py", "--database-only"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    procs.append(db)
    env_url = db.stdout.readline().strip().split("=", 1)[1]
    os.environ["DATABASE_URL"] = env_url
    procs.append(start(["slow_server.py", "--bind", f"127.0.0.1:{slow_port}", "--delay",
                        str(delay)], log))
    procs.append(start(["lab.py", "--setup", "all", "--bind", f"127.0.0.1:{ports['all']}",
                        "--slow-url", slow_url, "--delay", str(delay)], log))
    wait_healthy(f"http://127.0.0.1:{ports['all']}/healthcheck/liveness")
    url = f"http://127.0.0.1:{ports['all']}{lab.ROUTES['db'].path}"

    def measure():
        out = subprocess.run([PY, "load.py", "-n", "10", "-c", "10", "--json", url], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["total_s"]

    try:
        alone = [measure() for _ in range(rounds)]
        for setup in ("almost_all", "nothing"):
            procs.append(start(["lab.py", "--setup", setup, "--bind",
                                f"127.0.0.1:{ports[setup]}", "--slow-url", slow_url], log))
            wait_healthy(f"http://127.0.0.1:{ports[setup]}/healthcheck/liveness")
        beside = [measure() for _ in range(rounds)]
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        log.close()
    a, b = statistics.median(alone), statistics.median(beside)
    print(f"all / db, {rounds} runs each: alone {a:.4f} s, with two idle labs beside it "
          f"{b:.4f} s ({(b / a - 1) * 100:+.2f} %)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--delays", type=float, nargs="+", default=[1.0, 0.2])
    parser.add_argument("--idle-check", action="store_true")
    args = parser.parse_args(argv)
    subprocess.run([str(ROOT / "run_all.sh"), "--delay", "0.05", "--json"], cwd=ROOT,
                   capture_output=True, check=False)  # the first run's install, not timed
    for delay in args.delays:
        bench_run_all(delay, args.rounds)
    if args.idle_check:
        idle_check(max(args.rounds, 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
