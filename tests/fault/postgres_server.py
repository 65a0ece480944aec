"""A real PostgreSQL server for the shared-catalogue tests: the binaries of the `pgserver` wheel (dev extra), on
a Unix socket in a temporary directory, stopped and started at will (never a mock).

As root, pgserver runs PostgreSQL as its own system user `pgserver` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


class Postgres:
    """initdb + start on first use; stop(immediate=True) is a crash, start() brings it back with the same data."""

    def __init__(self, directory: Path) -> None:
        try:
            import pgserver
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError as error:
            pytest.skip(f"no PostgreSQL to test against: the pgserver wheel (dev extra) is not installed ({error})")
        self.data = directory
        try:
            self._server = pgserver.get_server(directory, cleanup_mode="stop")
        except (OSError, subprocess.SubprocessError) as error:
            pytest.skip(f"the pgserver wheel's PostgreSQL does not start here ({error})")
        self._pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
        self.dsn = self._server.get_uri()

    def _ctl(self, *args: str) -> None:
        command = [self._pg_ctl, "-D", str(self.data), "-l", str(self.data / "log"), "-w", *args]
        # runuser, not subprocess's user=: that forks a child which runs gRPC's fork handlers before exec (and
        # can crash there); a plain command line is spawned without them.
        user = self._server.system_user
        done = subprocess.run(["runuser", "-u", user, "--", *command] if user else command, capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)

    def stop(self, immediate: bool = True) -> None:
        """immediate: no checkpoint, connections cut, as if the machine lost power (committed data survives)."""
        self._ctl("-m", "immediate" if immediate else "fast", "stop")

    def start(self) -> None:
        # restart on a stopped server starts it with the options of its last start (postmaster.opts)
        self._ctl("restart")

    def psql(self, sql: str) -> str:
        return self._server.psql(sql)

    def close(self) -> None:
        try:
            self._ctl("-m", "fast", "stop")
        except subprocess.CalledProcessError:
            pass  # already stopped
        self._server.cleanup()
