"""One error convention for the stand-alone tools, checked on the real scripts.

A bad flag, file or environment gets exactly one line on stderr, "TOOL: error: MESSAGE",
exit status 2 and no traceback, before anything starts (conftest.assert_one_error). BIND_CASES
is the HOST:PORT grammar shared by every --bind: lab.py has its own copy of parse_host_port(),
so it can be run against the same list.

The command-line errors of slow_server.py, lab.py, run_all.sh and load.py are all here, one
section a tool. Elsewhere: report.py's, beside the figures they need (tests/test_report.py);
lab.py copied alone without its packages (tests/test_lab.py); what the embedded PostgreSQL
refuses to start in (tests/test_embedded_postgres.py, which has the sandbox and cache for it).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import PY, assert_one_error, free_port, run

import slow_server

BIND_MESSAGE = "--bind must be HOST:PORT (for example 127.0.0.1:8000 or [::1]:8000), not {!r}"

# (value, accepted). "{port}" in a value stands for a free port, filled in by the test.
BIND_CASES = [
    ("127.0.0.1:{port}", True),
    ("localhost:{port}", True),
    ("[::1]:{port}", True),
    ("0.0.0.0:{port}", True),
    (":8000", False),  # no host: nothing is guessed
    ("8000", False),
    ("", False),
    ("127.0.0.1", False),
    ("127.0.0.1:", False),
    ("[::1]:", False),
    ("[::1]", False),
    ("::1:8000", False),  # IPv6 without brackets: is the last :8000 the port?
    ("[::1]8000", False),
    ("[::1:8000", False),
    ("::1]:8000", False),
    ("[zz]:8000", False),  # brackets, but no IPv6 address in them
    ("[1::2::3]:8000", False),
    ("[127.0.0.1]:8000", False),
    ("127.0.0.1:\uff18\uff10\uff10\uff10", False),  # fullwidth digits
    ("127.0.0.1:\u0668\u0660\u0660\u0660", False),  # Arabic-Indic digits
    ("127.0.0.1:0", False),
    ("127.0.0.1:70000", False),
    ("127.0.0.1:99999", False),
    ("127.0.0.1:123456", False),
    ("127.0.0.1:-1", False),
    ("127.0.0.1:+80", False),
    ("127.0.0.1: 8000", False),
    (" 127.0.0.1:8000", False),
    ("127.0.0.1:8000 ", False),
    ("127.0.0.1:8000:1", False),
    ("local host:8000", False),
    ("localhost:http", False),  # a service name is not a port
    ("http://127.0.0.1:8000", False),
]


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def run_tool(*args, timeout=30, python=sys.executable):
    return subprocess.run([python, *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, check=False)


def other_pythons():
    """The system's python3 when it is not the one running the tests: load.py is stdlib only,
    and a newcomer may well run it with that one."""
    found = []
    for path in ["/usr/bin/python3"]:
        if os.access(path, os.X_OK) and os.path.realpath(path) != os.path.realpath(sys.executable):
            version = subprocess.run([path, "-c", "import sys; print(sys.version_info >= (3, 9))"],
                                     capture_output=True, text=True, check=False).stdout
            if version.strip() == "True":
                found.append(path)
    return found


PYTHONS = [pytest.param(sys.executable, id="this-python")] + [
    pytest.param(path, id=path) for path in other_pythons()]


@pytest.mark.parametrize(("value", "accepted"), BIND_CASES)
def test_slow_server_bind_grammar(value, accepted):
    if not accepted:
        result = run_tool("slow_server.py", "--bind", value, "--delay", "0")
        assert_one_error(result, "slow_server.py", message=BIND_MESSAGE.format(value))
        return
    if value.startswith("[::1]") and not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback here")
    value = value.format(port=free_port())
    proc = subprocess.Popen([sys.executable, "slow_server.py", "--bind", value, "--delay", "0"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(1 + value.startswith("0.0.0.0"))]
        assert "serving on http://" in lines[-1], lines
        assert "error" not in "".join(lines)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(("value", "accepted"), BIND_CASES)
def test_parse_host_port_follows_the_same_grammar(value, accepted):
    value = value.format(port=8000)
    if accepted:
        host, port = slow_server.parse_host_port(value)
        assert port == 8000 and slow_server.host_port(host, port) == value
    else:
        with pytest.raises(ValueError) as error:
            slow_server.parse_host_port(value, flag="--slow")
        assert str(error.value) == BIND_MESSAGE.format(value).replace("--bind", "--slow")


# --- slow_server.py -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--delay", "-1"], "--delay '-1': delay must be a number of seconds from 0 to 60"),
        (["--delay", "61"], "--delay '61': delay must be a number of seconds from 0 to 60"),
        (["--delay", "soon"], "--delay 'soon': delay must be a number of seconds from 0 to 60"),
        (["--delay", "nan"], "--delay 'nan': delay must be a number of seconds from 0 to 60"),
        # float() would read the fullwidth and the Arabic-Indic digit one as 1.0:
        (["--delay", "\uff11"], "--delay '\uff11': delay must be a number of seconds from 0 to 60"),
        (["--delay", "\u0661"], "--delay '\u0661': delay must be a number of seconds from 0 to 60"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--bind"], "argument --bind: expected one argument"),
        (["stray"], "unrecognized arguments: stray"),
    ],
)
def test_slow_server_bad_arguments(args, message):
    assert_one_error(run_tool("slow_server.py", *args), "slow_server.py", message=message)


def test_slow_server_host_that_does_not_resolve():
    result = run_tool("slow_server.py", "--bind", "nonexistent.invalid:8000")
    assert_one_error(result, "slow_server.py",
                     "cannot listen on nonexistent.invalid:8000: nonexistent.invalid does not "
                     "resolve")


def test_slow_server_address_that_is_not_ours():
    # 192.0.2.1 is TEST-NET-1: documentation only, never an address of this machine.
    result = run_tool("slow_server.py", "--bind", "192.0.2.1:8000")
    assert_one_error(result, "slow_server.py", "cannot listen on 192.0.2.1:8000: ")


def test_slow_server_busy_port_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_tool("slow_server.py", "--bind", f"127.0.0.1:{port}")
    assert_one_error(result, "slow_server.py",
                     message=f"port {port} on 127.0.0.1 is already in use")


# --- lab.py ---------------------------------------------------------------------------


def run_lab(*args, env=None, timeout=60):
    """lab.py with no DATABASE_URL from the caller's environment, unless given in env."""
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "lab.py", *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, check=False,
                          env={**base, **(env or {})})


@pytest.mark.parametrize(("value", "accepted"), BIND_CASES)
def test_lab_bind_grammar(value, accepted):
    """lab.py's copy of parse_host_port(), through its command line (--check starts nothing)."""
    value = value.format(port=free_port())
    result = run_lab("--check", "--bind", value)
    if accepted:
        assert (result.returncode, result.stderr, result.stdout) == (0, "", "")
    else:
        assert_one_error(result, "lab.py", message=BIND_MESSAGE.format(value))


REFUSED = ('cannot reach PostgreSQL: connection to server at "127.0.0.1", port 1 failed: '
           "Connection refused")


def test_lab_good_bind_fails_later_for_another_reason():
    """The whole start-up path, not only --check: a good --bind lets lab.py go on to the
    database, whose error is then the one line."""
    result = run_lab("--bind", f"127.0.0.1:{free_port()}",
                     "--database-url", "postgresql://u@127.0.0.1:1/x")
    assert_one_error(result, "lab.py", message=REFUSED)


SLOW_URL_MESSAGE = "--slow-url must be an http:// URL with a port from 1 to 65535, not {!r}"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:99999", "http://127.0.0.1:0", "http://127.0.0.1:-1", "http://[::1/",
    "http://[::1]x:80", "http://[zz]:80", "http://::1:80", "http://127.0.0.1:\uff18\uff10",
    "http://127.0.0.1:", "http://user@127.0.0.1:80", "http://ex ample.com", "http://",
    "ftp://127.0.0.1:21", "127.0.0.1:8001",
])
def test_lab_bad_slow_url(url):
    assert_one_error(run_lab("--check", "--slow-url", url), "lab.py",
                     message=SLOW_URL_MESSAGE.format(url))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8001", "http://localhost", "https://[::1]",
                                 "http://[::1]:8001/base/", "http://slow.example:80"])
def test_lab_good_slow_url(url):
    result = run_lab("--check", "--slow-url", url)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(("url", "message"), [
    ("garbage", "the database URL must look like postgresql://user:password@host:5432/dbname"),
    ("mysql://u:s3cret@h/db",
     "the database URL must look like postgresql://user:password@host:5432/dbname"),
    ("postgresql://u:s3cret@[::1/x", "the database URL has a bad host or port: '[::1'"),
    ("postgresql://u:s3cret@[zz]:5432/x", "the database URL has a bad host or port: '[zz]:5432'"),
    ("postgresql://u:s3/cret@[::1:5432/x", "the database URL has a bad host or port: '[::1:5432'"),
    ("postgresql://u:s3cret@h:0/x", "the database URL has a bad host or port: 'h:0'"),
    ("postgresql://u:s3cret@h:99999/x", "the database URL has a bad host or port: 'h:99999'"),
    ("postgresql://u:s3cret@h:\uff15\uff14\uff13\uff12/x",
     "the database URL has a bad host or port: 'h:\uff15\uff14\uff13\uff12'"),
])
def test_lab_bad_database_url(url, message):
    for result in (run_lab("--check", env={"DATABASE_URL": url}),
                   run_lab("--check", "--database-url", url)):
        assert_one_error(result, "lab.py", message=message)  # and so no password echoed


def test_lab_check_connects_as_the_lab_will(database_url):
    """The URL's own connection parameters reach the check as they reach Django: a
    connect_timeout PostgreSQL cannot read fails --check, rather than passing it and then
    failing every database request of the run with a 503."""
    joiner = "&" if "?" in database_url else "?"
    result = run_lab("--check", env={"DATABASE_URL": f"{database_url}{joiner}connect_timeout=abc"})
    line = assert_one_error(result, "lab.py",
                            'invalid integer value "abc" for connection option "connect_timeout"')
    assert line.startswith("lab.py: error: cannot reach PostgreSQL: ")
    assert run_lab("--check", env={"DATABASE_URL": database_url}).returncode == 0


def test_lab_says_why_a_worker_could_not_boot(tmp_path, database_url):
    """A worker that dies as it boots (here psycogreen's hook cannot start a thread, as under
    a low ulimit -u) ends the lab with one line naming the cause, not Gunicorn's "Worker
    failed to boot" after a traceback."""
    shim = tmp_path / "psycogreen"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    (shim / "gevent.py").write_text("def patch_psycopg():\n"
                                    "    raise RuntimeError(\"can't start new thread\")\n")
    result = run_lab("--patch", "all", "--bind", f"127.0.0.1:{free_port()}",
                     env={"DATABASE_URL": database_url, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "lab.py: error: a worker could not boot (RuntimeError: can't start new thread): too few "
        "processes and threads left for this user (raise ulimit -u)"), result.stderr
    assert "Traceback" not in result.stderr


def test_lab_checks_the_process_limit_before_it_starts(tmp_path):
    """ulimit -u too low for the embedded PostgreSQL and the worker: one line before anything
    starts (root is not held to ulimit -u)."""
    if os.geteuid() == 0:
        pytest.skip("root is not held to ulimit -u")
    command = (f'ulimit -u 20 && exec "{sys.executable}" lab.py --patch all '
               f'--bind 127.0.0.1:{free_port()}')
    result = subprocess.run(["/bin/bash", "-c", command], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False,
                            env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"})
    line = assert_one_error(result, "lab.py", "processes and threads (the workers, their "
                            "threads, the embedded PostgreSQL) exceed",
                            "(ulimit -u, kernel.threads-max)", stdout=None)
    assert line.startswith("lab.py: error: about ")


def test_lab_unknown_patch_mode():
    assert_one_error(run(["lab.py", "--patch", "everything"]), "lab.py", "--patch")


@pytest.mark.parametrize("bind", ["8000", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"])
def test_lab_malformed_bind_when_starting(bind):
    assert_one_error(run(["lab.py", "--bind", bind, "--database-url",
                          "postgresql://u@127.0.0.1:1/x"]), "lab.py", "--bind")


def test_lab_busy_port_is_named(database_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(["lab.py", "--bind", f"127.0.0.1:{port}", "--database-url", database_url])
    assert_one_error(result, "lab.py", str(port), "in use")


@pytest.mark.parametrize("url", ["mysql://u@localhost/db", "postgresql://u@localhost:99999/db"])
def test_lab_bad_database_url_when_starting(url):
    assert_one_error(run(["lab.py", "--bind", f"127.0.0.1:{free_port()}",
                          "--database-url", url]), "lab.py", "database URL")


def test_lab_unreachable_database():
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = run(["lab.py", "--bind", f"127.0.0.1:{free_port()}", "--database-url", url])
    assert_one_error(result, "lab.py", "cannot reach PostgreSQL")


@pytest.mark.parametrize("flags", [["--delay", "-1"], ["--delay", "61"], ["--workers", "0"],
                                   ["--http-timeout", "0"], ["--slow-url", "ftp://x"]])
def test_lab_out_of_range_flags(flags):
    assert_one_error(run(["lab.py", "--database-url", "postgresql://u@127.0.0.1/x",
                          "--bind", f"127.0.0.1:{free_port()}", *flags]), "lab.py")


@pytest.mark.parametrize("url, words", [
    ("mysql://u@localhost/db", ["database URL"]),
    ("not a url", ["database URL"]),
    ("postgresql://u@localhost:99999/db", ["database URL", "port"]),
    ("postgresql://u@127.0.0.1:1/x", ["cannot reach PostgreSQL", "port 1"]),
])
def test_lab_bad_database_url_from_the_environment(url, words):
    result = run_lab("--bind", f"127.0.0.1:{free_port()}", env={"DATABASE_URL": url})
    assert_one_error(result, "lab.py", *words)


def test_lab_unreachable_database_with_the_default_bind():
    """The issue's own example; only a busy port 8000 (checked first) may be named instead."""
    started = time.monotonic()
    result = run_lab("--database-url", "postgresql://u@127.0.0.1:1/x")
    line = assert_one_error(result, "lab.py")
    assert "cannot reach PostgreSQL" in line or "port 8000" in line, line
    assert time.monotonic() - started < 15


def test_lab_database_password_is_not_echoed_in_errors():
    for url in ("postgresql://u:s3cret-pw@localhost:99999/db",
                "postgresql://u:s3cret-pw@127.0.0.1:1/x",
                "mysql://u:s3cret-pw@localhost/db"):
        result = run_lab("--bind", f"127.0.0.1:{free_port()}", env={"DATABASE_URL": url})
        assert_one_error(result, "lab.py")
        assert "s3cret-pw" not in result.stderr, result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--db-pool", "-1"], ["--db-pool"]),
    (["--db-pool", "101"], ["--db-pool"]),
    (["--http-timeout", "nan"], ["--http-timeout"]),
    (["--http-timeout", "301"], ["--http-timeout"]),
    (["--delay", "nan"], ["--delay"]),
    (["--delay", "inf"], ["--delay"]),
    (["--workers", "many"], ["--workers"]),
    (["--bind", ":8000"], ["--bind"]),
    (["--bind", "[::1]:"], ["--bind"]),
    (["--bind", "192.0.2.1:8000"], ["192.0.2.1:8000"]),  # TEST-NET-1: not ours to bind
    (["--bind", "nonexistent.invalid:8000"], ["nonexistent.invalid"]),
    (["--slow-url", "localhost:8001"], ["--slow-url"]),
])
def test_lab_more_bad_flags(flags, words):
    result = run_lab("--database-url", "postgresql://u@127.0.0.1:1/x", *flags)
    assert_one_error(result, "lab.py", *words)


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-connections", "50", "--database-url", "postgresql://u@127.0.0.1:5/db"],
     "--max-connections sets the embedded PostgreSQL's limit"),
    (["--max-connections", "1"], "--max-connections must be from 2 to 10000"),
    (["--setup", "all", "--pool-size", "5"], "--pool-size is for a setup with a pool"),
    (["--setup", "pooled", "--conn-max-age", "5"], "--conn-max-age must be 0 with a pool"),
    (["--worker-connections", "0"], "--worker-connections must be from 1 to 10000"),
])
def test_lab_scale_flag_errors(flags, message):
    assert_one_error(run(["lab.py", *flags]), "lab.py", message)


# --- run_all.sh -----------------------------------------------------------------------


def run_all(*args, env=None, timeout=60):
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(["./run_all.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, check=False,
                          env={**base, **(env or {})})


@pytest.mark.parametrize(("url", "message"), [
    ("garbage", "the database URL must look like postgresql://user:password@host:5432/dbname"),
    ("postgresql://u:s3cret@[::1/x", "the database URL has a bad host or port: '[::1'"),
    ("postgresql://u:s3cret@127.0.0.1:1/x", REFUSED),
])
def test_run_all_checks_database_url_before_starting_anything(url, message, tmp_path):
    tmp_path.chmod(0o1777)
    result = run_all("--delay", "0.05", env={"DATABASE_URL": url, "TMPDIR": str(tmp_path)})
    assert_one_error(result, "run_all.sh", message=f"DATABASE_URL: {message}")
    assert list(tmp_path.iterdir()) == []  # its work folder gone, no awl-pg-* made


@pytest.mark.parametrize("path", ["/nonexistent", ""])
def test_run_all_with_a_broken_path_names_what_is_missing(path):
    result = run_all("--delay", "0.05", env={"PATH": path})
    assert_one_error(result, "run_all.sh", message=f"not found on PATH: python3 (PATH={path})")
    help_text = run_all("--help", env={"PATH": path})
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: ./run_all.sh")


@pytest.mark.parametrize("flags, words", [
    (["--bogus"], "unknown flag '--bogus'"),
    (["--delay", "abc"], "--delay"),
    (["--delay", "0"], "--delay"),
    (["--delay", "61"], "--delay"),
    (["-n", "5", "-c", "10"], "-n cannot be less than -c"),
    (["-c", "0"], "-c"),
    (["-n"], "-n needs a value"),
    (["--delay", "-1"], "--delay"),
    (["--delay", "60.5"], "--delay"),
    (["--delay", ""], "--delay"),
    (["-n", "abc"], "-n"),
    (["-n", "-5"], "-n"),
    (["-c", "1.5"], "-c"),
    (["stray"], "stray"),
])
def test_run_all_bad_flags(flags, words):
    assert_one_error(run_all(*flags), "run_all.sh", words)


def test_run_all_report_into_a_missing_folder_is_refused_before_running():
    started = time.monotonic()
    result = run_all("--delay", "0.2", "--report", "no/such/dir/r.html", timeout=30)
    assert time.monotonic() - started < 10
    line = assert_one_error(result, "run_all.sh")
    assert line.startswith("run_all.sh: error: --report: no such directory"), line


# Mistakes found before anything starts: one line, exit 2, in seconds, nothing left in TMPDIR.

@pytest.fixture
def private_tmp():
    """A TMPDIR of the test's own, as /tmp is (the embedded server's user must enter it, so
    not under pytest's 0700 folders)."""
    folder = Path(tempfile.mkdtemp(prefix="awle-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_all_refused(*args, tmp, env=None):
    result = run_all("--delay", "0.2", *args, env={"TMPDIR": str(tmp), **(env or {})})
    assert list(tmp.iterdir()) == []  # its work folder gone, no awl-pg-* made
    return result


@pytest.fixture
def immutable():
    """chattr +i: a file or folder even root may not write (undone after the test)."""
    if not Path("/usr/bin/chattr").exists():
        pytest.skip("no chattr here")
    made = []

    def make(path):
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"chattr +i does not work on {path}'s file system")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_lab_check_database_only_checks_and_starts_nothing(private_tmp):
    """What ./run_all.sh asks before it starts the embedded PostgreSQL: 0, and nothing made."""
    result = run_lab("--check", "--database-only", env={"TMPDIR": str(private_tmp)})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert list(private_tmp.iterdir()) == []


def test_run_all_refuses_an_empty_report_name(private_tmp):
    assert_one_error(run_all_refused("--report", "", tmp=private_tmp), "run_all.sh",
                     "--report needs a file name")


def test_run_all_refuses_a_report_it_could_not_write(private_tmp, tmp_path, immutable):
    """Not after the whole run (report.py: error: Permission denied, and a false "some
    scenarios had responses other than 200"): before anything starts."""
    folder = tmp_path / "pages"
    folder.mkdir()
    (folder / "old.html").write_text("an old page\n")
    immutable(folder / "old.html")
    immutable(folder)
    assert_one_error(run_all_refused("--report", str(folder / "new.html"), tmp=private_tmp),
                     "run_all.sh", f"--report: cannot write into {folder}: permission denied")
    assert_one_error(run_all_refused("--report", str(folder / "old.html"), tmp=private_tmp),
                     "run_all.sh", f"--report: cannot write {folder / 'old.html'}: permission "
                                   "denied")


def test_run_all_refuses_a_report_in_a_folder_of_another_user(private_tmp):
    if os.geteuid() == 0:
        pytest.skip("root may write into any folder")
    assert_one_error(run_all_refused("--report", "/root/x.html", tmp=private_tmp), "run_all.sh",
                     "--report: cannot write into /root: permission denied")


def test_run_all_checks_the_open_file_limit_before_starting_anything(private_tmp):
    result = subprocess.run(["bash", "-c", 'ulimit -n 64 && exec ./run_all.sh "$@"', "-",
                             "--delay", "0.2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False,
                            env={**os.environ, "TMPDIR": str(private_tmp)})
    assert_one_error(result, "run_all.sh", "lab.py --setup nothing: 1 requests at once per "
                     "worker need about 67 open files, but the limit is 64 (raise it with "
                     "ulimit -n, or lower --worker-connections)")
    assert list(private_tmp.iterdir()) == []


def test_run_all_checks_that_postgresql_may_enter_tmpdir(private_tmp):
    if os.geteuid() != 0:
        pytest.skip("as root only: the embedded server then runs as another user")
    private_tmp.chmod(0o700)
    result = run_all_refused(tmp=private_tmp)
    assert_one_error(result, "run_all.sh", "the embedded PostgreSQL cannot start: the "
                     f"PostgreSQL user awl-postgres cannot enter {private_tmp} (mode 0700), "
                     "where its data folder goes (TMPDIR): use a TMPDIR others may enter, such "
                     "as /tmp")


def test_a_lab_that_dies_at_start_is_named_by_its_own_error_line(tmp_path):
    """Gunicorn's last words ("Worker failed to boot.") come after the cause."""
    from labkit import run

    log = tmp_path / "all.log"
    log.write_text("lab.py: --setup all: gevent worker ...\n"
                   "[2026-12-02 10:00:00 +0000] [7] [INFO] Booting worker with pid: 8\n"
                   "lab.py: error: cannot start the database probe: Resource temporarily "
                   "unavailable\n"
                   "[2026-12-02 10:00:01 +0000] [7] [ERROR] Worker (pid:8) exited with code 3\n"
                   "[2026-12-02 10:00:01 +0000] [7] [ERROR] Reason: Worker failed to boot.\n\n")
    assert run.cause(log) == "cannot start the database probe: Resource temporarily unavailable"
    log.write_text("[2026-12-02 10:00:01 +0000] [7] [ERROR] Reason: Worker failed to boot.\n")
    assert run.cause(log) == "[2026-12-02 10:00:01 +0000] [7] [ERROR] Reason: Worker failed to boot."
    assert run.cause(tmp_path / "missing.log") == "no output"


# --- load.py --------------------------------------------------------------------------


class Listener:
    """A port whose connections complete in the kernel and wait there to be counted:
    after a refused run, none must have been made."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def connections(self):
        count = 0
        self.sock.settimeout(0.3)
        try:
            while True:
                self.sock.accept()[0].close()
                count += 1
        except TimeoutError:
            return count


@pytest.fixture
def listener():
    listening = Listener()
    yield listening
    listening.sock.close()


# load.py reads the scheme and host[:port] itself, so these are its own messages on every
# Python (urlsplit()'s own checks changed within 3.11: 3.11.2 refuses "[::1]x", 3.11.7 not).
URL_CASES = [
    ("http://[::1/", "invalid host in URL: http://[::1/"),
    ("http://[::1]x:80/", "invalid host in URL: http://[::1]x:80/"),
    ("http://[zz]:80/", "invalid IPv6 address in URL: http://[zz]:80/"),
    ("http://[v1.fe]:80/", "invalid IPv6 address in URL: http://[v1.fe]:80/"),
    ("http://ex ample.com/", "invalid host in URL: http://ex ample.com/"),
    ("http://:80/", "URL has no host: http://:80/"),
    (" http://127.0.0.1:80/",
     "URL must start with http:// (https is not supported):  http://127.0.0.1:80/"),
]
for _port in ("\uff18\uff10\uff10\uff10", "\u0668\u0660\u0660\u0660", "0", "70000", "99999",
              "-1", "+80", "80:90"):
    URL_CASES.append((f"http://127.0.0.1:{_port}/",
                      f"invalid port in URL (use 1 to 65535): http://127.0.0.1:{_port}/"))


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize(("url", "message"), URL_CASES)
def test_load_bad_url(url, message, python):
    assert_one_error(run_tool("load.py", "-n", "1", "-c", "1", url, python=python), "load.py",
                     message=message)


def test_load_url_with_brackets_but_no_ipv6_address():
    # Python 3.11.4 on refuses this in urlsplit() itself; before, load.py's own check does.
    result = run_tool("load.py", "-n", "1", "-c", "1", "http://[zz]:80/")
    line = assert_one_error(result, "load.py", "http://[zz]:80/")
    assert line.startswith("load.py: error: invalid ")


@pytest.mark.parametrize(("args", "message"), [
    (["-n", "\u0663"], "argument -n: invalid int value: '\u0663'"),
    (["-c", "\uff12"], "argument -c: invalid int value: '\uff12'"),
    (["-t", "\u0661.5"], "argument -t: invalid float value: '\u0661.5'"),
    (["-z", "\u0661s"], "invalid duration '\u0661s' (use e.g. 10s, 1m, 500ms)"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_load_numbers_are_ascii_and_flags_known(args, message):
    result = run_tool("load.py", *args, "http://127.0.0.1:9/")
    assert_one_error(result, "load.py", message=message)


def test_load_save_into_a_missing_folder_is_refused_before_sending(listener):
    result = run_tool("load.py", "-n", "5", "-c", "5", "--save", "/missing/dir/x.json",
                      listener.url)
    assert_one_error(result, "load.py",
                     message="--save /missing/dir/x.json: no such folder /missing/dir")
    assert listener.connections() == 0


def test_load_save_onto_a_folder_is_refused_before_sending(listener, tmp_path):
    result = run_tool("load.py", "-n", "5", "-c", "5", "--save", str(tmp_path), listener.url)
    assert_one_error(result, "load.py", message=f"--save {tmp_path}: is a folder, not a file")
    assert listener.connections() == 0


def with_limit(name, soft, hard):
    """python -c code that runs the script named next on its command line under a limit."""
    return (f"import resource, runpy, sys; resource.setrlimit(resource.{name}, ({soft}, {hard})); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_load_save_check_leaves_no_file_behind_and_keeps_old_figures(tmp_path, listener):
    """A run refused after --save was checked (here: too little address space for 2,000
    threads) leaves no new file behind and an old one as it was."""
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("old figures\n")
    for path in (new, old):
        result = run_tool("-c", with_limit("RLIMIT_AS", 10**9, 10**9), "load.py", "-n", "2000",
                          "-c", "2000", "--save", str(path), listener.url)
        assert result.returncode == 2 and "cannot start 2000 threads" in result.stderr, result
    assert not new.exists()
    assert old.read_text() == "old figures\n"
    assert listener.connections() == 0


# Address-space limits (MB) at which, on some build, a thread the system created died
# before it ran (MemoryError) and threading.Thread.start() used to wait for it forever
# (Debian's 3.11.2 at 1000, 461, 538; pyenv's 3.11.7 at 507, 598, 731): every one of them
# must be one line and exit 2, on every Python, within seconds. They run side by side.
LIMITS_MB = [461, 507, 538, 598, 731, 1000]


@pytest.mark.parametrize("python", PYTHONS)
def test_load_never_waits_for_a_thread_that_cannot_start(python, listener):
    started = time.monotonic()
    runs = {mb: subprocess.Popen(
        [python, "-c", with_limit("RLIMIT_AS", mb * 10**6, mb * 10**6), "load.py",
         "-n", "2000", "-c", "2000", listener.url], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for mb in LIMITS_MB}
    outcomes = {}
    for mb, proc in runs.items():
        try:
            out, err = proc.communicate(timeout=max(1, 60 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "(hung)"
        outcomes[mb] = (proc.returncode, out, err)
    for mb, (code, out, err) in outcomes.items():
        assert code == 2 and out == "" and err.count("\n") == 1, (mb, code, err)
        assert err.startswith("load.py: error: ") and err.endswith(": lower -c\n"), (mb, err)
    assert listener.connections() == 0


def test_load_refuses_a_concurrency_over_the_open_file_limit(listener):
    result = run_tool("-c", with_limit("RLIMIT_NOFILE", 100, 100), "load.py", "-n", "1000",
                      "-c", "1000", listener.url)
    assert_one_error(result, "load.py", message="-c 1000 needs about 1016 open files but the "
                     "limit is 100 (raise it with ulimit -n)")
    assert listener.connections() == 0


NOWHERE = "http://127.0.0.1:9/"  # nothing is sent: the flags are refused first


@pytest.mark.parametrize("args, message", [
    (["-n", "5", "-c", "10", NOWHERE], "-n cannot be less than -c"),
    (["-n", "0", "-c", "1", NOWHERE], "-n"),
    (["-n", "-3", NOWHERE], "-n"),
    (["-c", "0", NOWHERE], "-c"),
    (["-n", "abc", NOWHERE], "-n"),
    (["-t", "-1", NOWHERE], "-t"),
    (["-q", "-1", NOWHERE], "-q"),
    (["-H", "NoColon", NOWHERE], "-H"),
    (["-z", "10", NOWHERE], "duration"),
    (["-z", "abc", NOWHERE], "duration"),
    (["-o", "xml", NOWHERE], "-o"),
    (["ftp://example.com/"], "http://"),
    (["https://example.com/"], "http://"),
    (["http://"], "no host"),
    (["127.0.0.1:8000"], "http://"),
    (["--bogus", NOWHERE], "unrecognized"),
    ([], "URL"),
])
def test_load_bad_command_lines(args, message):
    assert_one_error(run_tool("load.py", *args), "load.py", message)


@pytest.mark.parametrize("args, words", [
    (["-t", "nan"], "-t"),
    (["-t", "inf"], "-t"),
    (["-t", "1e300"], "-t"),
    (["-q", "nan"], "-q"),
    (["-q", "inf"], "-q"),
    (["-q", "1e-300"], "-q"),
    (["-z", "99999999h"], "-z"),
    (["-c", "1000000", "-n", "1000000"], "-c"),
    (["-H", "X: a\r\nInjected: b"], "-H"),
    (["-H", "Bad Name: x"], "-H"),
    (["-H", ": x"], "-H"),
    (["http://[::1"], "URL"),
])
def test_load_more_bad_flags(args, words):
    if not args[-1].startswith("http"):
        args = [*args, NOWHERE]
    result = run(["load.py", "-n", "1", "-c", "1", *args], timeout=30)
    assert_one_error(result, "load.py", words)


def test_load_too_many_threads_for_the_system_is_one_line():
    """-c within bounds but over what the system allows (here an address-space limit)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1_000_000_000, 1_000_000_000))

    result = subprocess.run([PY, "load.py", "-n", "2000", "-c", "2000", "-t", "2",
                             "http://127.0.0.1:9/"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False, preexec_fn=limit)
    assert_one_error(result, "load.py", "threads", "-c")
