"""The orchestrator behind ./run_all.sh: every scenario of the lab, run, timed and reported.

./run_all.sh makes .venv on first use and hands over to `python -m labkit.run`, which

1. checks what it can before it starts anything: its flags, the --report file, TMPDIR, your
   DATABASE_URL (connecting once) and every lab's flags against the machine's limits
   (`lab.py --check`, one per lab, all at once), so that a mistake is one line and exit 2,
   not a failure half-way through the run;
2. starts the slow service, an embedded PostgreSQL (unless DATABASE_URL) and one lab per setup,
   all at once, each on its own port, and waits until every one answers;
3. runs the scenarios of labkit.plan one after another: load.py against the route on its
   setup's lab (the other labs sit idle), then report.py's one line on what blocked its event
   loop; each heading says how far the run is and how long the rest should take by the models;
4. stops the services and prints report.py's table (or JSON lines), and writes the HTML page.

Why a program and not a shell script: the hard part of a run is stopping it. A Ctrl-C, a
SIGTERM or a closed terminal may come at any moment, and everything the run started must be
gone within seconds, whatever each child was doing at the time. Here that is one place:

- every child starts in a known state: in a session of its own (a terminal's Ctrl-C and
  hang-up reach only us; we stop the children ourselves), with the stop signals unblocked and
  at their defaults, no terminal to read, and a parent-death signal, so that a kill -9 of this
  process leaves nothing running either (labkit.procs.child_setup);
- a stop signal only takes note; the flow looks at the note wherever it waits, and nothing
  waits without a deadline, so the note is read within a tenth of a second;
- every child stops the same way: its own stop signal (SIGINT for a lab, Gunicorn's quick
  stop), then SIGKILL to its whole process group once STOP_GRACE has passed;
- the clean-up runs once, whatever ended the run, and a second signal changes nothing in it.

    python -m labkit.run [--delay S] [-n N] [-c C] [--all] [--json] [--report F] [--scale]
                         [--workers N]            (./run_all.sh --help says what each does)
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from labkit import plan, procs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # report.py sits beside lab.py
    sys.path.insert(0, str(ROOT))

import lab
import report

PROG = "run_all.sh"  # the user's command: our lines bear its name
PY = sys.executable
REQUEST_TIMEOUT = 60  # load.py -t: seconds one request may take
TIMELINE_UP_TO = 50  # requests a scenario may have for load.py's timeline (a thousand rows say
# less than the histogram)
START_WITHIN = 60  # seconds the slow service and every lab have to answer
DATABASE_WITHIN = 180  # seconds the embedded PostgreSQL has to start (a cold cache runs initdb)
CHECK_WITHIN = 60  # seconds each `lab.py --check` may take (it may connect to DATABASE_URL)
STOP_GRACE = 3.5  # seconds a child has to stop on its own before SIGKILL (Gunicorn's quick
# stop kills its workers after its graceful_timeout, 3 s): all gone within 5 s of a signal
SCALE_SETTLE = 0.6  # --scale: what a burst leaves open is read 0.5 s after it (report.py)
POLL = 0.02  # seconds between two looks at a child or a stop signal
RESULTS_HEADING = ("\n=== Results (model: h = HTTP delay, d = pg_sleep, n requests c at a time, "
                   "rounds = ceil(n / min(c, requests a worker runs at once)); python lab.py "
                   "--list --json says why)")


class Mistake(Exception):
    """Something the user can fix, found before anything started: one line, exit 2."""


class Failure(Exception):
    """Something went wrong during the run (a service did not start): one line, exit 1."""


class Interrupted(BaseException):
    """A stop signal arrived (a BaseException: nothing on the way may swallow it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class Options:
    delay: str  # as given: it goes to the banner and the children's command lines
    requests: int
    concurrency: int
    every: bool
    json: bool
    report: Path  # None: no page
    scale: bool
    workers: int  # None: each setup's own
    tmp: Path
    database_url: str  # None: an embedded PostgreSQL of the run's own


@dataclass(frozen=True)
class Scenario:
    setup: str
    route: str
    path: str
    model: str
    n: int
    c: int


# --- The run, from the first check to the table ----------------------------------------------

def run_all(run, options):
    """Every step in order; returns the exit status. Any step may raise Mistake or Failure,
    and any wait Interrupted; main() cleans up after each alike."""
    scenarios = planned(options)
    setups = list(dict.fromkeys(s.setup for s in scenarios))
    for stale in procs.abandoned_folders(options.tmp, "awl-run-"):
        shutil.rmtree(stale, ignore_errors=True)  # the folder of a run killed with SIGKILL
    try:
        work = run.work = procs.owned_folder(options.tmp, "awl-run-")
    except OSError as exc:
        raise Mistake(f"cannot create a folder in TMPDIR={options.tmp}: {exc.strerror}") from None
    slow_port, *lab_ports = free_ports(len(setups) + 1)
    slow_url = f"http://127.0.0.1:{slow_port}"
    ports = dict(zip(setups, lab_ports))
    labs = {setup: lab_command(setup, ports[setup], slow_url, work, options) for setup in setups}

    check_before_starting(run, options, labs)

    run.phase = "set-up (starting the slow service and PostgreSQL)"
    slow = run.start("slow_server.py", ["slow_server.py", "--bind", f"127.0.0.1:{slow_port}",
                                        "--delay", options.delay], log=work / "slow_server.log")
    database = None
    if not options.database_url:
        database = run.start("the embedded PostgreSQL",
                             ["lab.py", "--database-only", *database_flags(options)],
                             log=work / "database.log", stdout=work / "database.out")
    write_settings(work, setups, options)
    url = options.database_url or wait_for_database_url(run, database, work / "database.out")

    run.phase = "set-up (starting the labs)"
    lab_pids, services = {}, [(slow, f"{slow_url}/healthz")]
    for setup, args in labs.items():
        lab = run.start(f"lab.py --setup {setup}", args, log=work / f"{setup}.log",
                        env={**os.environ, "DATABASE_URL": url},  # not on a command line: ps
                        stop_signal=signal.SIGINT, death_signal=signal.SIGINT)
        lab_pids[setup] = lab.popen.pid
        services.append((lab, f"http://127.0.0.1:{ports[setup]}/healthcheck/readiness"))
    wait_until_answering(run, services)

    run.write(banner(options))
    for number, scenario in enumerate(scenarios, 1):
        run.phase = f"scenario {scenario.setup} / {scenario.route}"
        run.write(heading(scenario, number, scenarios, options))
        run_scenario(run, scenario, number, f"http://127.0.0.1:{ports[scenario.setup]}",
                     lab_pids[scenario.setup], options)

    run.phase = "the report"
    return report_results(run, options)


def planned(options):
    """The scenarios of labkit.plan this run measures, with their n and c."""
    if options.scale:
        return [Scenario(row["setup"], row["route"], row["path"], compact(row["model"]),
                         row["requests"], row["concurrency"]) for row in plan.scale_rows()]
    return [Scenario(setup, route, lab.ROUTES[route].path,
                     compact(plan.model_formula(setup, route)), options.requests,
                     options.concurrency) for setup, route, _ in plan.scenarios(options.every)]


def compact(formula):
    return formula.replace(" ", "")


def lab_settings(setup, options):
    """The lab's settings where this run changes them (--scale, --workers)."""
    settings = plan.scale_settings(setup) if options.scale else {}
    if options.workers:
        settings["workers"] = options.workers
    return settings


def lab_command(setup, port, slow_url, work, options):
    """lab.py's arguments for SETUP's lab: its flags, its events and connections."""
    flags = [f"--{key.replace('_', '-')}={value}"
             for key, value in lab_settings(setup, options).items()]
    return ["lab.py", "--setup", setup, "--bind", f"127.0.0.1:{port}",
                  "--slow-url", slow_url, "--delay", options.delay,
                  "--events", str(work / f"{setup}.events"),
                  "--connections", str(work / f"{setup}.connections"), *flags]


def database_flags(options):
    return ["--max-connections", str(plan.SCALE_MAX_CONNECTIONS)] if options.scale else []


def write_settings(work, setups, options):
    """Each lab's settings as JSON beside its figures (SETUP.settings): report.py's model
    reads them."""
    for setup in setups:
        (work / f"{setup}.settings").write_text(json.dumps(lab_settings(setup, options)))


def check_before_starting(run, options, labs):
    """`lab.py --check` with every lab's flags, and for the database: with your DATABASE_URL
    (it connects once), else --database-only (what the embedded server needs: TMPDIR, its
    cache, as root its account); all at once, and the first that fails is the run's one line."""
    run.phase = "set-up (checking the labs' flags)"
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    if options.database_url:
        database = ("DATABASE_URL", ["lab.py", "--check"],
                    {**env, "DATABASE_URL": options.database_url})
    else:
        database = ("the embedded PostgreSQL cannot start",
                    ["lab.py", "--check", "--database-only", *database_flags(options)], env)
    what, args, database_env = database
    checks = [(what, run.start("lab.py --check", args, log=run.work / "check-database.log",
                               env=database_env))]
    for setup, args in labs.items():
        checks.append((f"lab.py --setup {setup}", run.start(
            "lab.py --check", [*args, "--check"], log=run.work / f"check-{setup}.log", env=env)))
    for what, child in checks:
        if run.wait(child, CHECK_WITHIN, f"lab.py --check ({what})") != 0:
            raise Mistake(f"{what}: {cause(child.log)}")


def wait_for_database_url(run, database, out):
    """The URL `lab.py --database-only` prints once its server runs."""
    deadline = time.monotonic() + DATABASE_WITHIN
    while True:
        for line in read_lines(out):
            if line.startswith("DATABASE_URL="):
                return line.split("=", 1)[1]
        if database.popen.poll() is not None:
            raise Failure(f"the embedded PostgreSQL did not start: {cause(database.log)}")
        if time.monotonic() > deadline:
            raise Failure(f"the embedded PostgreSQL did not start within {DATABASE_WITHIN} s")
        run.pause(POLL)


def wait_until_answering(run, services):
    """Poll until every URL answers 200; stop at the first service that died, with its cause."""
    pending = list(services)
    deadline = time.monotonic() + START_WITHIN
    while pending:
        for child, url in list(pending):
            run.checkpoint()  # each look may take up to a timeout: ten labs booting, 5 s
            if answers(url):
                pending.remove((child, url))
            elif child.popen.poll() is not None:
                raise Failure(f"{child.name} did not start: {cause(child.log)}")
        if pending and time.monotonic() > deadline:
            raise Failure(f"{pending[0][0].name} did not answer within {START_WITHIN} s")
        if pending:
            run.pause(0.05)


def banner(options):
    if options.scale:
        return (f"Async Workers Lab at scale: each scenario's own n and c, PostgreSQL "
                f"max_connections {plan.SCALE_MAX_CONNECTIONS}; slow HTTP call "
                f"{options.delay} s, pg_sleep {options.delay} s")
    return (f"Async Workers Lab: {options.requests} requests, {options.concurrency} at a time, "
            f"{options.workers or 'one'} worker(s); slow HTTP call {options.delay} s, "
            f"pg_sleep {options.delay} s")


def heading(scenario, number, scenarios, options):
    """=== SETUP / ROUTE: GET PATH, N requests, C at a time (model: M) [K/ALL, about S s left]"""
    left = sum(model_seconds(s, options) for s in scenarios[number - 1:])
    return (f"\n=== {scenario.setup} / {scenario.route}: GET {scenario.path}, {scenario.n} "
            f"requests, {scenario.c} at a time (model: {scenario.model}) "
            f"[{number}/{len(scenarios)}, about {duration(left)} left]")


def model_seconds(scenario, options):
    delay = float(options.delay)
    return plan.model_seconds(scenario.setup, scenario.route, scenario.n, scenario.c, delay,
                              delay, settings=lab_settings(scenario.setup, options)) or 0


def duration(seconds):
    if seconds < 99.5:
        return f"{max(1, round(seconds))} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 10 and seconds else f"{minutes} min"


def run_scenario(run, scenario, number, lab_url, lab_pid, options):
    """load.py against the route, then report.py's line on what blocked the event loop."""
    name = f"{number:02d}-{scenario.setup}-{scenario.route}"
    figures = run.work / f"{name}.json"
    timeline = ["--timeline"] if scenario.n <= TIMELINE_UP_TO else []
    load = run.start("load.py", ["load.py", "-n", str(scenario.n), "-c", str(scenario.c),
                                 "-t", str(REQUEST_TIMEOUT), *timeline, "--save", str(figures),
                                 lab_url + scenario.path], stdout=run.out)
    rounds = math.ceil(scenario.n / scenario.c)
    run.wait(load, REQUEST_TIMEOUT * rounds + 60, "load.py")
    if not figures.exists() or not figures.stat().st_size:
        raise Mistake(f"load.py saved no figures for {scenario.setup} / {scenario.route}")
    if options.scale:  # what the burst left open is the lesson: give it time to show
        run.pause(SCALE_SETTLE)
    blocking = run.start("report.py blocking", ["report.py", "blocking", str(figures),
                                                "--lab-pid", str(lab_pid)], stdout=run.out)
    run.wait(blocking, 60, "report.py blocking")


def report_results(run, options):
    """Stop the services (nothing is in flight any more), then the table, JSON and page."""
    # When the labs stopped: what a burst left open is not read past it (report.py quiet_until)
    (run.work / "stopped_at").write_text(f"{time.time():.6f}\n")
    run.signal_all()
    flags = ["--delay", options.delay, *(["--json"] if options.json else []),
             *(["--html", str(options.report)] if options.report else [])]
    if not options.json:
        run.write(RESULTS_HEADING)
    files = sorted(str(path) for path in run.work.glob("[0-9]*.json"))
    table = run.start("report.py", ["report.py", *flags, *files])
    status = run.wait(table, 300, "report.py")
    if options.report and status != 2 and options.report.exists():  # 2: not written
        say(f"wrote {options.report}")
    run.stop_all()
    if status == 1 and options.scale:
        say("past PostgreSQL's max_connections the 503s are the lesson (see the table)")
    elif status == 1:
        say("some scenarios had responses other than 200 (see the table)")
    return status


# --- Children: started in a known state, stopped the same way ---------------------------------

@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    stop_signal: int
    log: Path
    signalled: bool = False


class Run:
    """What the run started, where it stands, and the stop signal if one came."""

    def __init__(self, out):
        self.out = out  # where the human-readable part goes: stderr with --json
        self.phase = "set-up"
        self.children = []
        self.work = None
        self.signum = None  # the first stop signal
        self.interrupted_during = None
        self.announced = False
        self.ignored = set()  # signals we were started with ignored (nohup): they stay so

    # --- signals -----------------------------------------------------------------------

    def take_signals(self):
        """Our handlers for the stop signals, then let through those ./run_all.sh held back
        while Python started (one that came meanwhile is delivered now)."""
        for sig in procs.STOP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                self.ignored.add(sig)
            else:
                signal.signal(sig, self.note_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, procs.STOP_SIGNALS)

    def note_signal(self, signum, frame):
        """Only a note, read where the flow waits: no exception lands in the middle of a
        Popen, a mkdtemp or the clean-up."""
        if self.signum is None:
            self.signum, self.interrupted_during = signum, self.phase

    def checkpoint(self):
        if self.signum is not None:
            raise Interrupted(self.signum)

    def announce(self):
        """The one line, once, as soon as a signal is seen."""
        if self.signum is not None and not self.announced:
            self.announced = True
            say(f"interrupted during {self.interrupted_during}; stopping everything it started",
                blank_line=True)

    def pause(self, seconds):
        """Sleep, up to POLL at a time, and raise Interrupted as soon as a signal came."""
        deadline = time.monotonic() + seconds
        self.checkpoint()
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, POLL))
            self.checkpoint()

    # --- output ------------------------------------------------------------------------

    def write(self, text):
        """A line of the run's own output; a terminal that is gone (hang-up) is no error."""
        try:
            print(text, file=self.out, flush=True)
        except (OSError, ValueError):
            pass

    # --- children ----------------------------------------------------------------------

    def start(self, name, args, *, log=None, stdout=None, env=None, stop_signal=signal.SIGTERM,
              death_signal=signal.SIGTERM):
        """Start `python ARGS` in ROOT, in a session of its own, dying with us. Its output goes
        to `log` (stdout to `stdout` if given: a file path or a stream), else to ours."""
        self.checkpoint()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # our lines before the child's
            except (OSError, ValueError):
                pass
        files = []
        try:
            if log is not None:
                files.append(open(log, "wb"))  # noqa: SIM115 (closed below: the child has it)
            if isinstance(stdout, Path):
                files.append(open(stdout, "wb"))  # noqa: SIM115
            out = files[-1] if isinstance(stdout, Path) else stdout or (files[0] if files else None)
            err = files[0] if log is not None else None
            popen = subprocess.Popen(
                [PY, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, start_new_session=True,
                preexec_fn=procs.child_setup(death_signal))  # noqa: PLW1509 (no threads here)
        except OSError as exc:
            raise Failure(f"cannot start {name}: {exc.strerror}") from None
        finally:
            for file in files:
                file.close()
        child = Child(name, popen, stop_signal, log)
        self.children.append(child)
        return child

    def wait(self, child, within, what):
        """The child's exit status, once it ends; Failure if it takes longer than `within`."""
        deadline = time.monotonic() + within
        while child.popen.poll() is None:
            if time.monotonic() > deadline:
                raise Failure(f"{what} did not finish within {within:g} s")
            self.pause(POLL)
        return child.popen.returncode

    def signal_all(self):
        """Send each child still running its stop signal, once; wait for none."""
        for child in self.children:
            if not child.signalled and child.popen.poll() is None:
                child.signalled = True
                try:
                    os.kill(child.popen.pid, child.stop_signal)
                except ProcessLookupError:
                    pass

    def stop_all(self, grace=STOP_GRACE):
        """Stop every child: its stop signal, then SIGKILL to its process group (what it
        started and left behind included) after `grace`. Signals meanwhile change nothing.

        A child is reaped only once its group is empty: while it is a zombie, no other
        process can be given its number, so the group we kill is surely its own."""
        live = [child for child in self.children if child.popen.returncode is None]
        self.signal_all()
        groups = [child.popen.pid for child in live]  # each leads its own
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.announce()
            if all(exited(pid) for pid in groups) and not procs.group_members(groups):
                break
            time.sleep(POLL)
        else:
            for group in groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for child in live:
            try:
                child.popen.wait(1)
            except subprocess.TimeoutExpired:
                pass
        self.announce()
        self.children = []

    def remove_work(self):
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None


def exited(pid):
    """Whether our child `pid` has ended, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


def free_ports(count):
    """`count` loopback ports free right now, all different."""
    held = [socket.socket() for _ in range(count)]
    try:
        for sock in held:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def answers(url):
    """200 from url, straight (no proxy from the environment)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=0.5) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def read_lines(path):
    try:
        return Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []


ERROR_LINE = re.compile(r"^[\w.-]+: error: (.*)$")


def cause(log):
    """Why a child failed, in its own words: its last `TOOL: error: ...` line (without the
    prefix; a lab whose worker failed to boot says more before Gunicorn's last words), else
    its last line."""
    lines = [line.strip() for line in read_lines(log) if line.strip()]
    errors = [match.group(1) for line in lines if (match := ERROR_LINE.match(line))]
    return errors[-1] if errors else lines[-1] if lines else "no output"


def say(text, blank_line=False):
    """One line of ours on stderr, `run_all.sh: TEXT`; after a hang-up, nowhere."""
    try:
        print(f"{chr(10) if blank_line else ''}{PROG}: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# --- Flags ---------------------------------------------------------------------------------------
# As ./run_all.sh has always read them (its --help is the usage), in the same order, with the
# same messages.

VALUE_FLAGS = {"--delay": "needs a value", "-n": "needs a value", "-c": "needs a value",
               "--workers": "needs a value", "--report": "needs a file name"}
SWITCHES = {"--all": "every", "--scale": "scale", "--json": "json"}
DELAY = re.compile(r"^([0-9]*)(\.([0-9]*))?$")
COUNT = re.compile(r"^[1-9][0-9]*$")


def parse_args(argv, invoked_from, environ):
    given = {"--delay": "1", "-n": "10", "-c": "10", "--workers": None, "--report": None}
    switches = dict.fromkeys(SWITCHES.values(), False)
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag in VALUE_FLAGS:
            if not args:
                raise Mistake(f"{flag} {VALUE_FLAGS[flag]}")
            given[flag] = args.pop(0)
        elif flag in SWITCHES:
            switches[SWITCHES[flag]] = True
        else:
            raise Mistake(f"unknown flag '{flag}' (see --help)")
    delay, requests, concurrency = given["--delay"], given["-n"], given["-c"]
    if not is_delay(delay):
        raise Mistake(f"--delay must be a number of seconds above 0 and at most 60, not '{delay}'")
    if not COUNT.match(requests):
        raise Mistake(f"-n must be a whole number above 0, not '{requests}'")
    if not COUNT.match(concurrency):
        raise Mistake(f"-c must be a whole number above 0, not '{concurrency}'")
    if int(requests) < int(concurrency):
        raise Mistake("-n cannot be less than -c")
    workers = given["--workers"]
    if workers is not None and not (COUNT.match(workers) and int(workers) <= 64):
        raise Mistake(f"--workers must be a whole number from 1 to 64, not '{workers}'")
    page = given["--report"]
    if page is not None:
        try:  # relative to where the user ran ./run_all.sh, not to the lab's folder
            page = report.check_html_path(os.path.join(invoked_from, page) if page else page,
                                          "--report")
        except report.ReportError as exc:
            raise Mistake(str(exc)) from None
    tmp = environ.get("TMPDIR") or "/tmp"
    if not (os.path.isdir(tmp) and os.access(tmp, os.W_OK | os.X_OK)):
        raise Mistake(f"TMPDIR={tmp} is not a writable directory")
    return Options(delay=delay, requests=int(requests), concurrency=int(concurrency),
                   workers=workers and int(workers), report=page, tmp=Path(tmp),
                   database_url=environ.get("DATABASE_URL") or None, **switches)


def is_delay(text):
    """A decimal above 0 and at most 60, digits and one point only (no 1e1, nan or spaces)."""
    match = DELAY.match(text)
    if not match or not (match.group(1) or match.group(3)):
        return False
    value = float(f"{match.group(1) or 0}.{match.group(3) or 0}")
    return 0 < value <= 60


# --- main ----------------------------------------------------------------------------------------

def main(argv=None):
    """The run's exit status: 0, 1 when a scenario had other answers than 200 (or something
    failed during the run), 2 for a mistake found first, 128 + N after stop signal N."""
    invoked_from = os.environ.pop("AWL_RUN_FROM", None) or os.getcwd()
    run = Run(sys.stdout)
    run.take_signals()
    status = 1
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv, invoked_from, os.environ)
        run.out = sys.stderr if options.json else sys.stdout  # stdout: the JSON lines only
        status = run_all(run, options)
    except Interrupted:
        pass
    except (Mistake, Failure) as exc:
        if run.signum is None:  # after a signal, what failed is its doing
            say(f"error: {exc}")
            status = 2 if isinstance(exc, Mistake) else 1
    finally:
        run.announce()
        run.stop_all()
        run.remove_work()
        procs.drop_unwritable_output()
        # Python's tear-down puts back the default action of the signals it handled: a second
        # Ctrl-C then would kill us (exit -2) instead of changing nothing. Ignored, it does not.
        for sig in procs.STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    return 128 + run.signum if run.signum is not None else status


if __name__ == "__main__":
    sys.exit(main())
