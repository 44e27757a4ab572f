"""A private MariaDB server for tests: a temporary datadir (mariadb-install-db), mariadbd on
127.0.0.1 on a free port, a user and a database for the test, shut down afterwards.

Skips (with the reason) only when the server binaries are absent; any other failure to start is an
error, with the server's log in the message."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest


def _find(*names):
    for n in names:
        p = shutil.which(n) or next((d + "/" + n for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin")
                                     if os.path.exists(d + "/" + n)), None)
        if p:
            return p
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class MariaDB:
    port: int
    socket: str
    user: str
    password: str
    database: str
    process: subprocess.Popen
    command: list = dataclasses.field(default_factory=list)  # how to start the server again (restart_mariadb)
    log: str = ""

    @property
    def url(self) -> str:
        return f"mysql+pymysql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def admin(self):
        """A root connection over the Unix socket (pymysql), for checks and KILL."""
        import pymysql

        return pymysql.connect(unix_socket=self.socket, user="root", database=self.database, autocommit=True)


def start_mariadb(tmpdir: str) -> MariaDB:
    server = _find("mariadbd", "mysqld")
    install = _find("mariadb-install-db", "mysql_install_db")
    if not server or not install:
        pytest.skip("MariaDB server binaries (mariadbd, mariadb-install-db) are not installed: "
                    "apt-get install mariadb-server (see requirements/debian.txt)")
    pytest.importorskip("pymysql", reason="pymysql is not installed (requirements/dev.txt)")
    datadir = os.path.join(tmpdir, "data")
    sock = os.path.join(tmpdir, "mysqld.sock")
    log = os.path.join(tmpdir, "mysqld.log")
    user_args = ["--user=root"] if os.geteuid() == 0 else []
    r = subprocess.run([install, "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
                        "--skip-test-db", *user_args], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    port = _free_port()
    command = [server, "--no-defaults", f"--datadir={datadir}", f"--socket={sock}", f"--port={port}",
               "--bind-address=127.0.0.1", "--skip-name-resolve", f"--log-error={log}",
               f"--pid-file={os.path.join(tmpdir, 'mysqld.pid')}", "--innodb-buffer-pool-size=32M",
               "--skip-log-bin", *user_args]
    proc, conn = _launch(command, sock, log)
    with conn.cursor() as c:
        c.execute("CREATE DATABASE gftest")
        c.execute("CREATE USER 'gf'@'%' IDENTIFIED BY 'gfpass'")
        c.execute("GRANT ALL ON gftest.* TO 'gf'@'%'")
    conn.close()
    return MariaDB(port, sock, "gf", "gfpass", "gftest", proc, command, log)


def _launch(command: list, sock: str, log: str):
    """Starts mariadbd and waits until root can connect over the socket; returns (process, connection)."""
    import pymysql

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        # Probe the socket ourselves (closing it): a refused pymysql connect would leak its socket.
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(sock)
            return proc, pymysql.connect(unix_socket=sock, user="root", autocommit=True)
        except (OSError, pymysql.err.OperationalError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                text = open(log).read() if os.path.exists(log) else "(no log)"
                raise RuntimeError(f"mariadbd did not start (exit {proc.poll()}):\n{text[-3000:]}")
            time.sleep(0.2)


def restart_mariadb(db: MariaDB, down_for: float = 1.0) -> None:
    """A server restart as an operator does it: a clean shutdown (clients see their connections
    dropped, then refused), `down_for` seconds with nothing listening, the same server started again
    on the same port and data."""
    stop_mariadb(db)
    time.sleep(down_for)
    db.process, conn = _launch(db.command, db.socket, db.log)
    conn.close()


def stop_mariadb(db: MariaDB) -> None:
    if db.process.poll() is None:
        db.process.send_signal(signal.SIGTERM)
        try:
            db.process.wait(30)
        except subprocess.TimeoutExpired:
            db.process.kill()
            db.process.wait()


@pytest.fixture(scope="module")
def mariadb():
    tmp = tempfile.mkdtemp(prefix="gf-mariadb-")
    db = start_mariadb(tmp)
    try:
        yield db
    finally:
        stop_mariadb(db)
        shutil.rmtree(tmp, ignore_errors=True)
