"""Benchmark, not a test: the scenarios at the article's settings, and load.py against hey.

    python bench/bench_scenarios.py                 # run_all.sh at 1 s delays, then load.py vs hey
    python bench/bench_scenarios.py --skip-scenarios --requests 20000

Part 1 runs ./run_all.sh --json (10 requests at concurrency 10, 1 s delays) and prints each
scenario's measured/model ratio: the goal is within 3 % of the model everywhere.
Part 2 starts `lab.py --patch all` and sends the liveness route the same load from Debian's
`hey` and from load.py, alternately, and prints both req/s: the goal is load.py at least as fast.
"""

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
GOAL_OVER_MODEL = 0.03


def run_scenarios(delay):
    result = subprocess.run([str(ROOT / "run_all.sh"), "--json", "--delay", str(delay)],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"run_all.sh failed:\n{result.stderr[-2000:]}")
    print(f"{'scenario':<22} {'measured':>9} {'model':>7} {'measured/model':>15}  goal")
    worst = 0.0
    for line in result.stdout.splitlines():
        s = json.loads(line)
        ratio = s["total_s"] / s["model_s"]
        worst = max(worst, ratio - 1)
        verdict = "ok" if ratio - 1 <= GOAL_OVER_MODEL else "over"
        print(f"{s['mode'] + ' / ' + s['route']:<22} {s['total_s']:>8.3f}s {s['model_s']:>6.2f}s "
              f"{ratio:>15.4f}  {verdict}")
    print(f"worst: {worst * 100:+.1f} % over the model (goal: {GOAL_OVER_MODEL * 100:.0f} %)\n")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_lab():
    port = free_port()
    lab = subprocess.Popen([PY, "lab.py", "--patch", "all", "--bind", f"127.0.0.1:{port}"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/healthcheck/liveness"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            return lab, url
        except OSError:
            time.sleep(0.1)
    lab.terminate()
    sys.exit("lab.py did not start")


def hey_rps(url, n, c):
    out = subprocess.run(["hey", "-n", str(n), "-c", str(c), url], capture_output=True,
                         text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def load_rps(url, n, c):
    out = subprocess.run([PY, str(ROOT / "load.py"), "-n", str(n), "-c", str(c), "--json", url],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["rps"]


def compare_with_hey(requests, concurrency, rounds):
    if not shutil.which("hey"):
        print("hey is not installed (apt-get install hey): skipping the comparison")
        return
    lab, url = start_lab()
    try:
        hey, ours = [], []
        for _ in range(rounds):
            hey.append(hey_rps(url, requests, concurrency))
            ours.append(load_rps(url, requests, concurrency))
    finally:
        lab.terminate()
        lab.wait(30)
    print(f"liveness route, -n {requests} -c {concurrency}, {rounds} rounds each (req/s):")
    print(f"  hey:     {' '.join(f'{x:8.0f}' for x in hey)}   best {max(hey):8.0f}")
    print(f"  load.py: {' '.join(f'{x:8.0f}' for x in ours)}   best {max(ours):8.0f}")
    verdict = "at least as fast" if max(ours) >= max(hey) else "slower"
    print(f"  load.py/hey (best of each): {max(ours) / max(hey):.2f} -> {verdict}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-scenarios", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_scenarios:
        run_scenarios(args.delay)
    compare_with_hey(args.requests, args.concurrency, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
