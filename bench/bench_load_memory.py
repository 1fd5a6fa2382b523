"""Peak memory of load.py: is it bounded by the rows it keeps, not by what it reads?

Run by hand (takes about --seconds plus a few more):

    python bench/bench_load_memory.py [--seconds 20] [--big-mb 200]

It serves two routes from this process (a big body streamed in 1 MiB writes, and
a tiny fast one) and runs load.py against them as a child, reading each child's
peak resident size (VmHWM on Linux, else ru_maxrss):

  baseline  one tiny request: the interpreter plus load.py itself
  big body  --big-mb MB in one response: should stay near the baseline, since
            bodies are read into one 64 KiB buffer and thrown away
  -z run    --seconds at -c 50: grows only with the per-request rows (72 bytes each)
  -c 1000   a thousand connections at once, each held open for --hold seconds: one thread
            per connection, each with a 256 KiB stack (load.py's WORKER_STACK)
"""

import argparse
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

LOAD = Path(__file__).resolve().parents[1] / "load.py"
MIB = 1 << 20
ZEROS = b"\0" * MIB


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        size = int(url.query) if url.path == "/big" else 3
        if url.path == "/hold":
            time.sleep(float(url.query))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if url.path != "/big":
            self.wfile.write(b"ok\n")
            return
        while size > 0:
            self.wfile.write(ZEROS[:min(size, MIB)])
            size -= MIB


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        pass  # load.py may drop connections at the end of a -z run


# Runs load.py in this child and, at exit, reports the child's own peak RSS. On Linux
# ru_maxrss (from getrusage or wait4) starts at the size of the process that spawned
# it, since exec keeps the old high-water mark, so VmHWM of the new image is used.
PEAK = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
try:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except OSError:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
print(f"peak_kib={kib}", file=sys.stderr)
sys.exit(code)
"""


def run_load(*args):
    """Run load.py; return (its peak RSS in MiB, its stdout)."""
    proc = subprocess.run([sys.executable, "-c", PEAK, str(LOAD), *args], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0 or "Error distribution:" in proc.stdout:
        sys.exit(f"load.py {' '.join(args)} exited with {proc.returncode}\n{proc.stdout}")
    return float(re.search(r"peak_kib=([\d.]+)", proc.stderr).group(1)) / 1024, proc.stdout


def figure(pattern, text):
    match = re.search(pattern, text)
    return int(match.group(1)) if match else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="length of the -z run")
    parser.add_argument("--big-mb", type=int, default=200, help="size of the big body")
    parser.add_argument("--hold", type=float, default=1.0,
                        help="seconds each of the 1,000 connections is held open")
    opts = parser.parse_args()

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    baseline, _ = run_load("-n", "1", "-c", "1", f"{base}/")
    print(f"baseline   (1 tiny request):        {baseline:7.1f} MiB peak")

    big, out = run_load("-n", "1", "-c", "1", f"{base}/big?{opts.big_mb * MIB}")
    read_mb = figure(r"Total data:\t(\d+)", out) / MIB
    print(f"big body   ({read_mb:.0f} MiB read):         {big:7.1f} MiB peak "
          f"(+{big - baseline:.1f} over baseline)")

    seconds = f"{opts.seconds:g}s"
    timed, out = run_load("-z", seconds, "-c", "50", f"{base}/")
    requests = figure(r"\[200\]\t(\d+) responses", out)
    extra = (timed - baseline) * MIB
    per_request = extra / requests if requests else 0
    print(f"-z {seconds:<6} ({requests} requests at -c 50): {timed:7.1f} MiB peak "
          f"(+{extra / MIB:.1f} over baseline, {per_request:.0f} bytes a request)")

    started = time.perf_counter()
    thousand, out = run_load("-n", "1000", "-c", "1000", "-t", "60", f"{base}/hold?{opts.hold:g}")
    seconds = time.perf_counter() - started
    ok = figure(r"\[200\]\t(\d+) responses", out)
    print(f"-c 1000    ({ok} held {opts.hold:g} s at once):  {thousand:7.1f} MiB peak "
          f"(+{thousand - baseline:.1f} over baseline, 1,000 threads; run {seconds:.2f} s)")
    server.shutdown()


if __name__ == "__main__":
    main()
