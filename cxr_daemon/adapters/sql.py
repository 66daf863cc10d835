"""Connections and dialect details for the SQL store: MySQL/MariaDB and SQLite.

SQL in ``db.py`` is written once with ``?`` placeholders; the connector turns
it into the driver's style and supplies the few fragments that differ. Driver
errors become cxrd errors here and nowhere else:

- cannot connect, connection lost, deadlock, lock timeout, "database is
  locked" -> ``TransientError``;
- access denied, unknown database, unusable path -> ``ConfigError``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import pymysql

from cxr_daemon.errors import ConfigError, CxrdError, TransientError

# MySQL client/server error numbers (include/mysqld_error.h, errmsg.h).
_MYSQL_CONFIG = {1044: "access denied", 1045: "access denied", 1049: "unknown database"}
_MYSQL_TRANSIENT = {1205, 1213, 2002, 2003, 2006, 2013, 2055}


class Connector(Protocol):
    """What ``SqlStore`` needs from a database driver."""

    dialect: str
    insert_ignore: str
    for_update: str
    for_update_skip_locked: str

    def transaction(self, *, write: bool = False) -> Any:
        """Context manager yielding a cursor; commits on success, rolls back on error."""
        ...

    def sql(self, statement: str) -> str:
        """The statement with the driver's placeholders."""
        ...

    def ddl(self, statement: str) -> str:
        """The DDL statement with this dialect's fragments."""
        ...

    def table_exists(self, cur: Any, name: str) -> bool:
        """Whether ``name`` is a table of the database."""
        ...

    def describe(self) -> str:
        """Where the database is, without credentials."""
        ...

    def close(self) -> None:
        """Close connections."""
        ...


def connector_for(url: str, password: str = "") -> Connector:
    """Build the connector for a ``mysql://`` or ``sqlite://`` URL.

    Raises:
        ConfigError: any other scheme, or a URL without a database.
    """
    if url.startswith("sqlite://"):
        return SqliteConnector(url.removeprefix("sqlite://"))
    if url.startswith(("mysql://", "mariadb://")):
        return MysqlConnector(url, password)
    raise ConfigError(f"database.url: expected mysql://... or sqlite://..., got {url!r}")


class SqliteConnector:
    """SQLite, the embedded default: one connection, one writer at a time."""

    dialect = "sqlite"
    insert_ignore = "INSERT OR IGNORE"
    for_update = ""
    for_update_skip_locked = ""

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"database.url: cannot create {Path(path).parent}: {exc}"
                ) from None
        try:
            # Autocommit mode: transactions are begun explicitly below.
            self.conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self.conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise ConfigError(f"database.url: cannot open SQLite database {path}: {exc}") from None
        self.lock = threading.RLock()

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Any]:
        """A transaction; ``write`` takes the write lock up front (BEGIN IMMEDIATE)."""
        with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield cur
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise _sqlite_error(exc) from exc
            except BaseException:
                self._rollback()
                raise
            finally:
                cur.close()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def sql(self, statement: str) -> str:
        """SQLite takes ``?`` as is."""
        return statement

    def ddl(self, statement: str) -> str:
        """SQLite DDL fragments."""
        return statement.format(pk_auto="INTEGER PRIMARY KEY AUTOINCREMENT", table_opts="")

    def table_exists(self, cur: Any, name: str) -> bool:
        """Look the table up in sqlite_master."""
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return cur.fetchone() is not None

    def describe(self) -> str:
        """The file path."""
        return f"sqlite {self.path}"

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.conn.close()


def _sqlite_error(exc: sqlite3.Error) -> CxrdError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return TransientError(f"database: SQLite busy: {text}", step="db")
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in text:
        return ConfigError(f"database: {text}", step="db")
    return CxrdError(f"database: {text}", step="db")


class MysqlConnector:
    """MySQL/MariaDB through pymysql: one connection per thread, reconnecting."""

    dialect = "mysql"
    insert_ignore = "INSERT IGNORE"
    for_update = "FOR UPDATE"
    for_update_skip_locked = "FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, password: str = "") -> None:
        parts = urlsplit(url)
        database = parts.path.lstrip("/")
        if not database:
            raise ConfigError(f"database.url: expected a database name in {url!r}")
        self.params: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 3306,
            "user": unquote(parts.username or "cxrd"),
            "password": password or unquote(parts.password or ""),
            "database": database,
            "connect_timeout": 10,
            "read_timeout": 60,
            "write_timeout": 60,
            "autocommit": False,
            "charset": "utf8mb4",
        }
        self.local = threading.local()
        self.all: list[pymysql.connections.Connection[Any]] = []
        self.all_lock = threading.Lock()

    def _conn(self) -> pymysql.connections.Connection[Any]:
        conn: pymysql.connections.Connection[Any] | None = getattr(self.local, "conn", None)
        if conn is None or not conn.open:
            conn = pymysql.connect(**self.params)
            with conn.cursor() as cur:
                # READ COMMITTED: a claim must see rows other workers committed.
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cur.execute("SET time_zone = '+00:00'")
            self.local.conn = conn
            with self.all_lock:
                self.all.append(conn)
        return conn

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Any]:  # noqa: ARG002
        """A transaction on this thread's connection (InnoDB locks rows as needed)."""
        try:
            conn = self._conn()
            conn.begin()
        except pymysql.MySQLError as exc:
            self._drop()
            raise _mysql_error(exc) from exc
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except pymysql.MySQLError as exc:
            self._drop()
            raise _mysql_error(exc) from exc
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: pymysql.connections.Connection[Any]) -> None:
        try:
            conn.rollback()
        except pymysql.MySQLError:
            self._drop()

    def _drop(self) -> None:
        """Forget this thread's connection: the next transaction reconnects."""
        conn = getattr(self.local, "conn", None)
        self.local.conn = None
        if conn is not None:
            try:
                conn.close()
            except pymysql.MySQLError:
                pass
            except pymysql.err.Error:
                pass

    def sql(self, statement: str) -> str:
        """Pymysql wants ``%s``."""
        return statement.replace("?", "%s")

    def ddl(self, statement: str) -> str:
        """MySQL DDL fragments."""
        return statement.format(
            pk_auto="BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
            table_opts="ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        )

    def table_exists(self, cur: Any, name: str) -> bool:
        """Look the table up in information_schema."""
        cur.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = DATABASE() "
            "AND table_name = %s",
            (name,),
        )
        return cur.fetchone() is not None

    def describe(self) -> str:
        """host:port/database, never the password."""
        p = self.params
        return f"mysql {p['user']}@{p['host']}:{p['port']}/{p['database']}"

    def close(self) -> None:
        """Close every thread's connection."""
        with self.all_lock:
            for conn in self.all:
                if conn.open:
                    conn.close()
            self.all.clear()


def _mysql_error(exc: pymysql.MySQLError) -> CxrdError:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    message = exc.args[1] if len(exc.args) > 1 else str(exc)
    if code in _MYSQL_CONFIG:
        return ConfigError(f"database: {_MYSQL_CONFIG[code]}: {message}", step="db")
    if code in _MYSQL_TRANSIENT or isinstance(
        exc, pymysql.err.OperationalError | pymysql.err.InterfaceError
    ):
        return TransientError(f"database unavailable: {message}", step="db")
    return CxrdError(f"database error {code}: {message}", step="db")
