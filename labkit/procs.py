"""Processes: nothing the lab or a run starts outlives it.

Three tools from Linux, used by lab.py's kit and by run_all alike:

- the parent-death signal (prctl PR_SET_PDEATHSIG): the kernel signals a child when its parent
  dies, even by SIGKILL, which no handler sees;
- /proc/PID/stat: whether a process still runs (not a zombie), its parent, its process group
  (what a child started and left behind), its CPU time and its start time (a PID is reused, a
  PID with its start time is not);
- owner notes: a JSON file in each folder we create naming the process that made it, so that
  the next start can remove what a kill -9 left behind (the embedded PostgreSQL's awl-pg-*
  folders and a run's awl-run-* folder alike).
"""

import json
import os
import signal
import time
from pathlib import Path

from lab import die_with_parent

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
OWNER_NOTE = "owner.json"  # the owner note's name in each folder (see owner_note)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def child_setup(death_signal):
    """What a child runs between fork and exec, after any switch of user (which would clear
    the death signal): take the stop signals its parent held back, and die with its parent,
    also if the parent died between the fork and this (call it in the parent)."""
    parent = os.getpid()

    def setup():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        die_with_parent(death_signal, parent)

    return setup


def proc_stat(pid):
    """/proc/PID/stat as {"state", "ppid", "pgrp", "cpu_s", "start_time"}, None if the process
    is gone.

    The command name (field 2) may hold spaces and parentheses: the fields after it are read
    from the last ")". pgrp is the process group (field 5), start_time is in clock ticks after
    boot (field 22)."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return {"state": fields[0], "ppid": int(fields[1]), "pgrp": int(fields[2]),
            "cpu_s": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
            "start_time": int(fields[19])}


def alive(pid):
    """The process runs (a zombie has ended: only its exit status is left)."""
    stat = proc_stat(pid)
    return stat is not None and stat["state"] not in "ZX"


def group_members(groups):
    """The running processes (not zombies) of the process groups `groups`: {pgrp: [pid, ...]}.

    A child started in its own session leads a group of that number; what it started and did
    not stop (a Gunicorn worker, a sampler) stays in the group after the leader is gone, and the
    kernel does not give the number to another process while the group has members."""
    wanted, found = set(groups), {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = proc_stat(entry.name)
        if stat is not None and stat["pgrp"] in wanted and stat["state"] not in "ZX":
            found.setdefault(stat["pgrp"], []).append(int(entry.name))
    return found


def process_start_time(pid):
    """When `pid` started, None if it is gone or a zombie: with the PID, one process."""
    stat = proc_stat(pid)
    return None if stat is None or stat["state"] in "ZX" else stat["start_time"]


def owner_note():
    """This process: PID and start time, and the boot and PID namespace they are valid in."""
    def read(reader):
        try:
            return reader()
        except OSError:
            return None

    return {"pid": os.getpid(), "start_time": process_start_time(os.getpid()),
            "boot_id": read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
            "pid_namespace": read(lambda: os.readlink("/proc/self/ns/pid"))}


def owner_gone(note, me=None):
    """True only when the owner a note names has surely ended (`me`: our owner_note()). A note
    from another PID namespace (a container sharing the folder) is never called gone."""
    me = me or owner_note()
    try:
        if note["boot_id"] != me["boot_id"]:
            return note["boot_id"] is not None and me["boot_id"] is not None  # rebooted since
        if note["pid_namespace"] != me["pid_namespace"]:
            return False
        return process_start_time(note["pid"]) != note["start_time"]
    except (KeyError, TypeError):
        return False


def folder_owner_gone(folder, name, me=None):
    """owner_gone() for the note `name` in `folder`; False when it cannot be read (an older
    lab's folder, or one whose owner is writing it right now)."""
    try:
        return owner_gone(json.loads((Path(folder) / name).read_text()), me)
    except (OSError, ValueError, AttributeError):
        return False


def owned_folder(parent, prefix, note=OWNER_NOTE):
    """A new folder mkdtemp(prefix, parent) with our owner note in it (the file `note`)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        (folder / note).write_text(json.dumps(owner_note()))
    except OSError:  # a full disk: no folder without its note
        folder.rmdir()
        raise
    return folder


def abandoned_folders(parent, prefix, note=OWNER_NOTE, owners=None):
    """The folders `prefix*` in `parent` (owned by a uid in `owners`, default ours) whose owner
    note names a process that has surely ended: what a kill -9 left behind."""
    owners = {os.geteuid()} if owners is None else set(owners)
    me = owner_note()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            if (entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid in owners
                    and folder_owner_gone(entry.path, note, me)):
                found.append(Path(entry.path))
        except OSError:
            continue
    return found


def drop_unwritable_output(streams=None):
    """After a hang-up, writes to the terminal fail (EIO) and what they held stays buffered:
    Python would fail again flushing it at exit and exit with status 120. Send it nowhere."""
    import sys

    for stream in streams or (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
                stream.flush()
            except (OSError, ValueError):
                pass


def log_line(text):
    """One line on stderr, Gunicorn-style, in one write: safe from any thread or greenlet."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    try:
        os.write(2, f"[{stamp}] [{os.getpid()}] [WARNING] {text}\n".encode())
    except OSError:
        pass


def append_line(path, line):
    """One write with O_APPEND: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def stop(process, sig=signal.SIGTERM, within=2.0):
    """Signal a child and reap it; SIGKILL if it is still there after `within` seconds. Never
    an unbounded wait: a child that lost its signal must not hold up the stop of everything."""
    import subprocess

    if process.poll() is None:
        try:
            process.send_signal(sig)
            process.wait(within)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
