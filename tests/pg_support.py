"""Real PostgreSQL servers for tests: ``initdb`` in a temporary directory and ``postgres`` as a child process.

PostgreSQL refuses to run as root, so when the tests run as root the cluster
belongs to an unprivileged user (``relayd-test``, created if missing, else
``nobody``) and the server is started through ``setpriv`` (which execs, so the
child's PID is the postmaster's). It listens on a free 127.0.0.1 port with its
Unix socket inside its own directory and is stopped by that PID. Tests skip,
saying why, only when the server binaries are missing (Debian package
``postgresql``).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from support import free_port, wait_until

INSTALL_HINT = ("PostgreSQL server binaries (initdb, postgres) not found: install them with "
                "`apt-get install postgresql` (Debian package)")
TEST_USER = "relayd-test"


def pg_bindir() -> str | None:
    """The directory holding ``initdb`` and ``postgres``, or None when PostgreSQL is not installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.insert(0, os.path.dirname(os.path.realpath(initdb)))
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "postgres", "pg_isready")):
            return folder
    return None


def server_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: None when not root; else ``relayd-test`` (created once), or nobody."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       capture_output=True)
        try:
            entry = pwd.getpwnam(TEST_USER)
        except KeyError:
            entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


class PgServer:
    """One PostgreSQL cluster; ``stop()``/``start()`` keep its port and data, ``kill()`` is a crash.

    ``fsync = False`` (the session's shared server) trades crash safety of the whole cluster for speed;
    commits still wait for the WAL write, as relayd's durability rules need.
    """

    def __init__(self, *, fsync: bool = True, max_connections: int = 200) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError(INSTALL_HINT)
        self.bindir = bindir
        self.user = server_user()
        # pytest's tmp_path is private to root: the server's user must reach its directory
        self.root = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.sockets.mkdir()
        if self.user is not None:
            for place in (self.root, self.sockets):
                os.chown(place, *self.user)
        self.port = free_port()
        self.fsync = fsync
        self._frozen: list[int] = []
        self.max_connections = max_connections
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "postgres.log"
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-locale", "--no-sync"])
        self.start()

    def _as_user(self, argv: list[str]) -> list[str]:
        argv = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self.user is None:
            return argv
        uid, gid = self.user
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(self._as_user(argv), capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout[-1000:]}{done.stderr[-2000:]}")

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 30) -> None:
        argv = ["postgres", "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
                "-k", str(self.sockets), "-c", f"max_connections={self.max_connections}",
                "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "full_page_writes=off" if not self.fsync
                else "full_page_writes=on", "-c", "logging_collector=off", "-c", "shared_buffers=32MB"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self._as_user(argv), stdout=log, stderr=log, cwd=self.root)
        finally:
            log.close()
        try:
            wait_until(self.ready, f"postgres on port {self.port}", timeout=timeout, interval=0.05)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log()[-2000:]}")
        done = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", "postgres", "-t", "2"], capture_output=True)
        return done.returncode == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql (when installed) as the superuser; returns its unaligned output."""
        psql = os.path.join(self.bindir, "psql")
        if not os.access(psql, os.X_OK):
            psql = shutil.which("psql") or "psql"
        done = subprocess.run([psql, "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout.strip()

    def new_database(self) -> str:
        """A fresh database of its own (its URL), so tests sharing one server never see each other's rows."""
        name = f"t{secrets.token_hex(6)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.database_url(name)

    def require_password(self, role: str, password: str, database: str) -> None:
        """Create a login ``role`` that must give ``password`` (scram-sha-256) for TCP connections; the rest of the
        server stays on trust. Reloads the server's configuration (SIGHUP to its PID)."""
        self.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        self.psql(f"GRANT ALL ON DATABASE {database} TO {role}; ALTER DATABASE {database} OWNER TO {role}")
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)
        wait_until(lambda: "scram" in self.psql(f"SELECT string_agg(auth_method, ',') FROM pg_hba_file_rules "
                                                f"WHERE '{role}' = ANY(user_name)"), "pg_hba.conf reloaded")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> None:
        """Stop by PID: SIGINT is ``pg_ctl stop -m fast`` (clients cut, a clean checkpoint), SIGKILL a crash."""
        self.thaw()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def crash(self) -> None:
        """kill -9 of the postmaster and every process it started, as a power cut would end them; ``start()``
        then runs crash recovery from the WAL."""
        assert self.proc is not None
        children = [pid for pid in _children(self.proc.pid)]
        self.stop(signal.SIGKILL)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in children),
                   "the server's processes gone", timeout=10)

    def freeze(self) -> None:
        """SIGSTOP the postmaster, then every process it started: a hung server (connections stay open, nothing
        answers, new connections wait in the listen queue); ``thaw()`` ends it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)  # first: it starts no backend while its children stop
        self._frozen = [self.proc.pid, *_children(self.proc.pid)]
        for pid in self._frozen[1:]:
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT every process ``freeze()`` stopped (safe to call when nothing is frozen)."""
        frozen, self._frozen = self._frozen, []
        for pid in reversed(frozen):
            _signal(pid, signal.SIGCONT)

    def hold_lock(self, table: str, database: str, seconds: float) -> subprocess.Popen[bytes]:
        """A separate session that holds ``LOCK TABLE table IN ACCESS EXCLUSIVE MODE`` for ``seconds`` (a blocked
        server: every statement on the table waits); returns once the lock is granted. Wait on the process."""
        psql = os.path.join(self.bindir, "psql")
        if not os.access(psql, os.X_OK):
            psql = shutil.which("psql") or "psql"
        proc = subprocess.Popen([psql, "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d",
                                 database, "-c", f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; "
                                 f"SELECT pg_sleep({seconds}); COMMIT;"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.psql(f"SELECT count(*) FROM pg_locks WHERE granted AND mode = 'AccessExclusiveLock' "
                                     f"AND relation = '{table}'::regclass", database) == "1",
                   f"LOCK TABLE {table} granted", timeout=10, interval=0.02)
        return proc

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _children(parent: int) -> list[int]:
    """PIDs whose parent is ``parent`` (a postmaster's backends and helpers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
