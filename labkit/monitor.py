"""Naming what blocks an event loop: one line (and a JSON record) per stretch in which one
request kept gevent's hub or an asyncio loop from running for longer than a threshold.

This is how the lab shows *why* `almost_all` is serial: the line names `psycopg2 execute`,
the view that called it and the lab's frames on the way. gevent has a monitor of its own
(GEVENT_MONITOR_THREAD_ENABLE), which samples once per period and so sometimes names the
wrong call; this one samples four times per threshold and names a call only when it finds the
loop's thread at the same instruction twice in a row.

lab.build_application calls watch(lab) in each worker of a server with an event loop.
"""

import inspect
import json
import linecache
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lab as app
from labkit import procs


def watch(lab):
    """Start the monitor for the worker's loop, if its server has one and it is not off."""
    options, loop = lab.options, app.SERVERS[lab.setup.server].event_loop
    if loop and options.kit.monitor_threshold:
        monitor = {"gevent": GeventMonitor, "asyncio": AsyncioMonitor}[loop]
        monitor(options.kit.monitor_threshold, options.kit.events, options.setup).start()


class EventLoopMonitor:
    """Log each stretch in which one request kept the event loop from running for over
    `threshold` (gevent's hub, or the asgi worker's asyncio loop).

    A stretch runs from one switch of the loop to the next: GeventMonitor times every greenlet
    switch, AsyncioMonitor a heartbeat the loop runs several times per threshold. To name what
    blocked, a thread of ours samples the loop thread's Python frame four times per threshold
    (gevent's own monitor samples once, which is how it sometimes names the wrong call). A
    frame found at the same bytecode instruction in two samples in a row is stuck in a call
    (pg_sleep inside psycopg2, time.sleep, ...): that call is the culprit. One sample is not
    enough: the call may have returned just before it, and the frame then shows whatever ran
    next. Code that keeps moving (CPU work) is named by the first sample, with its view.
    The stretch is written when it ends, once: a human line on stderr and, with --events, a
    JSON object on a line of its own.
    """

    SAMPLES_PER_THRESHOLD = 4

    def __init__(self, threshold, events_path, setup):
        self.threshold, self.setup = threshold, setup
        self.period = threshold / self.SAMPLES_PER_THRESHOLD
        self.events_path = events_path
        self.last_switch = time.perf_counter()
        self.in_hub = False  # whether the current stretch is the loop waiting for I/O (idle)
        self.stretch = None  # the Stretch being sampled, if the current one is long enough
        self.view_codes = {}
        for name, route in app.ROUTES.items():
            self.view_codes[route.view.__code__] = name
            self.view_codes[route.async_view.__code__] = name

    def switched(self, now, idle=False):  # in the loop's thread, at every switch: keep it cheap
        stretch, started, self.stretch = self.stretch, self.last_switch, None
        self.last_switch = now
        self.in_hub = idle
        if stretch is not None and stretch.started == started and now - started >= self.threshold:
            self.report(started, now - started, stretch.stuck or stretch.moving)

    def run(self, sleep):
        while True:
            sleep(self.period)
            self.sample()

    def sample(self):  # in the monitor's thread, while the loop's thread may be stuck
        try:
            started = self.last_switch
            if self.in_hub or time.perf_counter() - started < self.period:
                return
            frame = sys._current_frames().get(self.loop_thread)
            if frame is None:
                return
            spot, now, cpu = (frame.f_code, frame.f_lasti), time.perf_counter(), self.cpu_time()
            stretch = self.stretch
            if stretch is None or stretch.started != started:
                self.stretch = Stretch(started, spot, now, cpu,
                                       moving=self.describe(frame, "Python code"))
            elif stretch.stuck is None and stretch.spot == spot:
                # Seen twice at one instruction: a call under way. The thread's CPU clock says
                # whether it waits (I/O, a lock, sleep: next to no CPU) or computes (CPU work,
                # even when two busy cores leave it only a share of one).
                busy = (cpu - stretch.cpu) > 0.1 * (now - stretch.seen)
                stretch.stuck = self.describe(frame, None if not busy else "CPU work in")
            else:
                stretch.spot, stretch.seen, stretch.cpu = spot, now, cpu
        except Exception as exc:  # noqa: BLE001 (a sample must not kill the monitor)
            procs.log_line(f"event loop monitor: {type(exc).__name__}: {exc}")

    def cpu_time(self):
        """The loop thread's own CPU time (Linux: any thread's clock can be read)."""
        return time.clock_gettime(self.cpu_clock)

    def describe(self, frame, kind):
        """{'call': 'psycopg2 execute', 'where': 'django/db/backends/utils.py:105 _execute',
        'view': 'only_database_call', 'route': 'db', 'frames': ['lab.py:120 ...', ...]}

        kind None: the call the frame is in; "CPU work in": that call, computing; "Python code":
        the frame was seen once, moving."""
        ours, view, route = [], None, None
        for outer in iter_frames(frame):
            if outer.f_code.co_filename == app.__file__:
                ours.append(f"{Path(app.__file__).name}:{outer.f_lineno} {outer.f_code.co_name}")
            if route is None and outer.f_code in self.view_codes:
                view, route = outer.f_code.co_name, self.view_codes[outer.f_code]
        where = f"{short_path(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"
        if kind == "Python code":
            call = kind
        else:
            call = called_function(frame) if kind is None else f"{kind} {called_function(frame)}"
        return {"call": call, "where": where, "view": view, "route": route, "frames": ours}

    def report(self, started, seconds, culprit):
        at = time.time() - (time.perf_counter() - started)
        view = f" from view {culprit['view']}" if culprit["view"] else ""
        procs.log_line(f"event loop blocked for {seconds:.3f} s in {culprit['call']} "
                 f"({culprit['where']}){view} [{' <- '.join(culprit['frames'])}]")
        if self.events_path:
            record = {"event": "blocked", "at": round(at, 6), "seconds": round(seconds, 6),
                      "pid": os.getpid(), "setup": self.setup, **culprit}
            procs.append_line(self.events_path, json.dumps(record))


class GeventMonitor(EventLoopMonitor):
    def start(self):
        import gevent
        import greenlet
        from gevent import monkey

        self.hub = gevent.get_hub()
        self.loop_thread = self.hub.thread_ident
        self.cpu_clock = time.pthread_getcpuclockid(self.loop_thread)
        greenlet.settrace(self.on_switch)
        # A real thread, not a greenlet: it must run while the hub's thread is stuck.
        real_sleep = monkey.get_original("time", "sleep")
        monkey.get_original("_thread", "start_new_thread")(self.run, (real_sleep,))

    def on_switch(self, event, args):
        # Time in the hub itself is the loop waiting for I/O: idle, not blocked.
        self.switched(time.perf_counter(),
                      idle=event in ("switch", "throw") and args[1] is self.hub)


class AsyncioMonitor(EventLoopMonitor):
    def start(self):
        import asyncio
        import threading

        self.loop = asyncio.get_event_loop()  # the asgi worker's, set before it loads the app
        self.loop_thread = threading.get_ident()
        self.cpu_clock = time.pthread_getcpuclockid(self.loop_thread)
        self.loop.call_soon(self.heartbeat)
        threading.Thread(target=self.run, args=(time.sleep,), daemon=True).start()

    def heartbeat(self):
        self.switched(time.perf_counter())
        self.loop.call_later(self.period, self.heartbeat)


@dataclass
class Stretch:
    """A stretch without a switch of the loop, as the monitor thread saw it."""
    started: float  # perf_counter() of the switch that began it
    spot: tuple  # (code, instruction) of the last sample
    seen: float  # perf_counter() of the last sample
    cpu: float  # the loop thread's CPU time at the last sample
    moving: dict  # the first sample's description
    stuck: dict = None  # a call seen at the same instruction twice in a row


def iter_frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


def short_path(filename):
    """site-packages/django/db/x.py -> django/db/x.py"""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return Path(filename).name


def called_function(frame):
    """Name the call on the frame's current line by its package: 'psycopg2 execute'."""
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    match = re.search(r"([A-Za-z_][\w.]*)\(", line)
    if not match:
        return f"{frame.f_globals.get('__name__', '?')} {frame.f_code.co_name}"
    names = match.group(1).split(".")
    target = frame.f_locals.get(names[0], frame.f_globals.get(names[0]))
    for name in names[1:-1]:  # plain attribute reads: the hub thread is stuck, nothing moves
        target = getattr(target, name, None)
    owner = target.__name__ if inspect.ismodule(target) else type(target).__module__
    return f"{owner.split('.')[0]} {names[-1]}"
