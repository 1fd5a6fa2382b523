"""The embedded PostgreSQL of lab.py, on real processes: the checks made before anything starts.

Each test runs lab.py in a Sandbox (tests/test_faults.py): a TMPDIR of its own, and a record of
every process it started, so that "nothing left behind" can be checked.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest
from conftest import PY
from test_faults import Sandbox, one_line_error, send, wait_until

import lab


@pytest.fixture
def box():
    sandbox = Sandbox()
    yield sandbox
    sandbox.close()


# --- helpers ---------------------------------------------------------------------------------

def start_database(sandbox, *extra, script="lab.py"):
    return sandbox.popen([PY, script, "--database-only", *extra], new_session=True)


def output(proc):
    return "".join(proc.err) + "".join(proc.out)


def database_url(proc, timeout=90):
    """The DATABASE_URL line of `lab.py --database-only`."""
    def printed():
        assert proc.poll() is None, output(proc)
        return any(line.startswith("DATABASE_URL=") for line in proc.out)
    wait_until(printed, timeout, "the DATABASE_URL line")
    line = next(line for line in proc.out if line.startswith("DATABASE_URL="))
    return line.strip().split("=", 1)[1]


def socket_folder(url):
    return Path(url.split("host=", 1)[1])


def query(url, sql="SELECT 1"):
    with psycopg2.connect(url, connect_timeout=5) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        value = cursor.fetchone()[0]
    conn.close()
    return value


def stop(sandbox, proc, sig=signal.SIGTERM, status=0, tmpdir=None):
    """Stop lab.py and check that it left nothing: no process, nothing in its TMPDIR (the
    sandbox's, or `tmpdir` inside it, then removed)."""
    send(proc, sig, group=False)
    proc.wait(30)
    time.sleep(0.2)  # let the readers drain
    assert proc.returncode == status, (proc.returncode, output(proc))
    assert "Traceback" not in output(proc), output(proc)
    left = sandbox.wait_all_gone()
    assert not left, "left running:\n" + "\n".join(left)
    if tmpdir:
        tmpdir.rmdir()  # only if empty
    assert sandbox.files() == [], sandbox.files()


def completed(proc):
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(proc.out),
                                       "".join(proc.err))


# --- the environment, checked before anything starts ----------------------------------------

def tmpdir_of_length(box, length):
    """A real folder whose path is `length` bytes long."""
    folder = box.tmp / ("d" * (length - len(str(box.tmp)) - 1))
    folder.mkdir()
    folder.chmod(0o1777)
    assert len(str(folder)) == length
    return folder


@pytest.mark.parametrize("case", ["missing", "a file", "not writable", "too long"])
def test_a_bad_tmpdir_is_one_line(box, case):
    if case == "missing":
        tmpdir, words = box.tmp / "nope", ["does not exist"]
    elif case == "a file":
        tmpdir, words = box.tmp / "file", ["is not a folder"]
        tmpdir.write_text("")
    elif case == "not writable":
        if os.geteuid() == 0:
            tmpdir, words = Path("/proc"), ["/proc"]  # root may write anywhere but there
        else:
            tmpdir, words = box.tmp / "ro", ["is not writable"]
            tmpdir.mkdir(mode=0o555)
    else:
        # PostgreSQL's socket: TMPDIR + /awl-pg-XXXXXXXX/.s.PGSQL.5432, at most 107 bytes.
        tmpdir = tmpdir_of_length(box, lab.MAX_SOCKET_PATH - 30 + 1)
        words = ["too long", "108 bytes", "the limit is 107", "shorter TMPDIR"]
    box.env["TMPDIR"] = str(tmpdir)
    proc = start_database(box)
    proc.wait(30)
    time.sleep(0.2)
    one_line_error(completed(proc), "lab.py", *words)
    assert not box.wait_all_gone()
    if tmpdir.is_dir() and tmpdir != Path("/proc"):
        assert list(tmpdir.iterdir()) == []


def test_a_tmpdir_at_the_socket_limit_works(box):
    tmpdir = tmpdir_of_length(box, lab.MAX_SOCKET_PATH - 30)
    box.env["TMPDIR"] = str(tmpdir)
    proc = start_database(box)
    url = database_url(proc)
    assert len(str(socket_folder(url) / lab.SOCKET_NAME)) == lab.MAX_SOCKET_PATH
    assert query(url) == 1
    stop(box, proc, tmpdir=tmpdir)
