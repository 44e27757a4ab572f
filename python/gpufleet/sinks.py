"""gpufleet.sinks: database sinks for pipelines.

``SqlSink`` is one writer that owns its connection and writes rows in batched transactions as keyed
upserts, so a re-run (or a batch retried after a disconnect) never duplicates a row. This replaces the
seed-003 pattern (a new SQLAlchemy session per write from 8 threads on a shared engine), which dies
with a connection reset hours into a run.

- SQLite (a path, or a ``sqlite:///path`` URL): Python's sqlite3, WAL journal, a busy timeout,
  ``BEGIN IMMEDIATE`` transactions of ``batch_rows`` rows, ``INSERT ... ON CONFLICT DO UPDATE``.
- Any other SQLAlchemy URL (``mysql+pymysql://...``, ``postgresql://...``): an engine with
  ``pool_pre_ping`` and ``pool_recycle``, the dialect's upsert (``ON DUPLICATE KEY UPDATE`` /
  ``ON CONFLICT DO UPDATE``), and the whole batch retried on a new connection after a disconnect.

Usable as a pipeline sink (``Pipeline(...).sink(SqlSink(...))``) or on its own::

    with SqlSink("scores.db", "scores", key="id") as sink:
        sink.write({"id": 1, "score": 0.5})
"""
from __future__ import annotations

import re
import sqlite3
import sys
import threading
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from . import _extras

__all__ = ["SqlSink"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"{what} must be an identifier (letters, digits, underscore; not starting with a digit), "
                         f"got {name!r}")
    return name


def _plain(v):
    """NumPy scalars to Python scalars (sqlite3 and the DB-API drivers want plain values)."""
    item = getattr(v, "item", None)
    if item is not None and type(v).__module__ == "numpy":
        return item()
    return v


_PLAIN_TYPES = (int, float, str, bytes, type(None))

# MySQL/MariaDB error codes of a server that is away for now: shutting down (1053), connection killed
# (1927), cannot connect by socket or TCP (2002, 2003: refused while it restarts), gone away / lost
# (2006, 2013, 2055), disconnected for inactivity (4031).
_MYSQL_UNREACHABLE = {1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031}


def _server_unreachable(e, engine) -> bool:
    """Whether a DBAPIError says the server dropped us or cannot be reached right now (a restart, a
    failover, a KILL), so that the same batch may succeed on a fresh connection later. A dropped
    connection (``connection_invalidated``) was the only case retried before; the refused reconnect
    while a server restarts is the other half of a restart."""
    if getattr(e, "connection_invalidated", False):
        return True
    orig = getattr(e, "orig", None)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_UNREACHABLE:
        return True
    sqlstate = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")):
        return True  # PostgreSQL: connection exceptions, admin shutdown, cannot connect now
    if isinstance(e, getattr(sys.modules.get("sqlalchemy.exc"), "OperationalError", ())) and any(
            m in str(orig) for m in ("could not connect to server", "Connection refused", "the database system is")):
        return True
    try:
        return engine is not None and bool(engine.dialect.is_disconnect(orig, None, None))
    except Exception:
        return False


def _sqlite_type(v) -> str:
    if isinstance(v, (bool, int)):
        return "INTEGER"
    if isinstance(v, float):
        return "REAL"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "BLOB"
    if isinstance(v, str):
        return "TEXT"
    return ""


def _is_sqlite(url: str) -> Optional[str]:
    """The database path when ``url`` means SQLite through sqlite3, else None."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    if url in ("sqlite://", ":memory:"):
        return ":memory:"
    if "://" not in url:
        return url
    return None


def _check_driver(url: str) -> None:
    """Imports SQLAlchemy and the URL's driver (``mysql+pymysql`` -> pymysql), or raises naming what to
    install: a missing package surfaces when the sink is built, not after the pipeline's first batch."""
    feature = f"SqlSink({url!r})"
    sa = _extras.require("sqlalchemy", "sql", feature)
    try:
        dialect = sa.engine.make_url(url).get_dialect()
    except sa.exc.NoSuchModuleError as e:  # an ArgumentError: first
        raise ValueError(f"{feature}: SQLAlchemy has no such dialect or driver: {e}") from None
    except sa.exc.ArgumentError as e:
        raise ValueError(f"{feature}: not a database path or an SQLAlchemy URL: {e}") from None
    load = getattr(dialect, "import_dbapi", None) or dialect.dbapi
    try:
        load()
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing in _extras.EXTRAS["sql"]:
            raise _extras.MissingExtraError(feature, missing, "sql", str(e)) from e
        raise ImportError(f"{feature} needs the database driver {missing or dialect.driver!r}, which cannot be "
                          f"imported ({e}); install it (pip install 'gpufleet[sql]' brings SQLAlchemy and "
                          f"PyMySQL)", name=e.name) from e


class SqlSink:
    """Writes rows (dicts, or sequences in ``columns`` order) to ``table`` as keyed upserts.

    ``key``: the column (or columns) that identify a row; the table gets a unique key on them, so a
    row written twice is updated, never duplicated. The table is created from the first row when it
    does not exist (``create=True``); an existing table keeps its other columns (an upsert only sets
    the columns given; as the database inserts before it resolves the conflict, every row must still
    carry the table's NOT NULL columns that have no default). Rows are buffered and written ``batch_rows`` per transaction, or when the
    oldest buffered row has waited ``max_delay`` seconds. ``retries`` bounds the retries of one batch
    after a disconnect or a refused reconnect (server URLs: a KILL, a restart), with ``retry_wait``
    seconds doubling between them (the defaults wait about 6 s in all; ``retries=8`` about 50 s).
    """

    def __init__(self, url: str, table: str, *, key: Union[str, Sequence[str]], columns: Optional[Sequence[str]] = None,
                 batch_rows: int = 500, max_delay: Optional[float] = 1.0, busy_timeout: float = 30.0,
                 retries: int = 5, retry_wait: float = 0.2, pool_recycle: int = 280, create: bool = True,
                 engine_options: Optional[Mapping[str, Any]] = None):
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be a database path or an SQLAlchemy URL, got {url!r}")
        self.url = url
        self.table = _check_ident(table, "table")
        keys = [key] if isinstance(key, str) else list(key)
        if not keys:
            raise ValueError("key must name at least one column")
        self.key = tuple(_check_ident(k, "key column") for k in keys)
        self.columns = None if columns is None else tuple(_check_ident(c, "column") for c in columns)
        if self.columns is not None and not set(self.key) <= set(self.columns):
            raise ValueError(f"columns {list(self.columns)} must include the key columns {list(self.key)}")
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
        if max_delay is not None and (isinstance(max_delay, bool) or not isinstance(max_delay, (int, float))
                                      or max_delay < 0):
            raise ValueError(f"max_delay must be None or non-negative seconds, got {max_delay!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.batch_rows = batch_rows
        self.max_delay = None if max_delay is None else float(max_delay)
        self.busy_timeout = float(busy_timeout)
        self.retries = retries
        self.retry_wait = float(retry_wait)
        self.pool_recycle = int(pool_recycle)
        self.create = bool(create)
        self.engine_options = dict(engine_options or {})
        self._path = _is_sqlite(url)
        if self._path is None:
            _check_driver(url)  # before any work starts (Note [Optional extras])
        self._buffer: list[tuple[tuple, tuple]] = []  # (columns, values) per row
        self._valid_columns: set = set()  # column tuples already checked
        self._first_buffered: Optional[float] = None
        self._lock = threading.RLock()
        self._conn = None  # sqlite3.Connection or sqlalchemy Connection
        self._engine = None
        self._sa_table = None
        self._table_columns: Optional[set] = None
        self._closed = False
        #: rows committed, transactions committed, batches retried after a disconnect
        self.rows_written = 0
        self.batches_written = 0
        self.batches_retried = 0

    # ---- public -------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"sqlite3"`` or ``"sqlalchemy"``."""
        return "sqlite3" if self._path is not None else "sqlalchemy"

    def open(self) -> "SqlSink":
        """Connects (also done by the first write). Call it from the thread that will write: the
        sink owns one connection and uses it from that thread."""
        with self._lock:
            if self._closed:
                raise ValueError(f"SqlSink({self.url!r}, {self.table!r}) is closed")
            if self._conn is None and self._engine is None:
                if self._path is not None:
                    self._open_sqlite()
                else:
                    self._open_sqlalchemy()
        return self

    def write(self, row: Union[Mapping[str, Any], Sequence[Any]]) -> None:
        """Buffers one row; writes a batch when ``batch_rows`` rows wait or the oldest has waited
        ``max_delay`` seconds."""
        d = self._as_row(row)
        with self._lock:
            if self._closed:
                raise ValueError(f"SqlSink({self.url!r}, {self.table!r}) is closed")
            self._buffer.append(d)
            if self._first_buffered is None:
                self._first_buffered = time.monotonic()
            if len(self._buffer) >= self.batch_rows or self._due():
                self.flush()

    def write_many(self, rows: Iterable) -> None:
        for r in rows:
            self.write(r)

    def poll(self) -> None:
        """Writes the buffered rows if the oldest has waited ``max_delay`` (pipelines call this when idle)."""
        with self._lock:
            if self._buffer and self._due():
                self.flush()

    def flush(self) -> None:
        """Writes every buffered row now, in transactions of at most ``batch_rows`` rows."""
        with self._lock:
            if not self._buffer:
                return
            self.open()
            while self._buffer:
                batch = self._buffer[: self.batch_rows]
                if self._path is not None:
                    self._write_sqlite(batch)
                else:
                    self._write_sqlalchemy(batch)
                del self._buffer[: len(batch)]
                self.rows_written += len(batch)
                self.batches_written += 1
            self._first_buffered = None

    def close(self) -> None:
        """Writes what is buffered, then closes the connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                self._closed = True
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except Exception:
                        pass
                    self._conn = None
                if self._engine is not None:
                    self._engine.dispose()
                    self._engine = None

    def existing_keys(self) -> set:
        """The keys already in the table (a tuple per row for a composite key): lets a resumed run
        skip finished items. Empty when the table does not exist yet."""
        with self._lock:
            self.open()
            cols = ", ".join(self._q(k) for k in self.key)
            if self._path is not None:
                if not self._sqlite_table_exists():
                    return set()
                rows = self._conn.execute(f"SELECT {cols} FROM {self._q(self.table)}").fetchall()
            else:
                import sqlalchemy as sa

                if not sa.inspect(self._engine).has_table(self.table):
                    return set()
                with self._engine.connect() as c:
                    rows = c.execute(sa.text(f"SELECT {cols} FROM {self._q(self.table)}")).fetchall()
            return {r[0] if len(self.key) == 1 else tuple(r) for r in rows}

    def __enter__(self) -> "SqlSink":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SqlSink({self.url!r}, {self.table!r}, key={list(self.key)}, batch_rows={self.batch_rows}, "
                f"rows_written={self.rows_written})")

    # ---- helpers ------------------------------------------------------------------------------
    def _due(self) -> bool:
        return (self.max_delay is not None and self._first_buffered is not None
                and time.monotonic() - self._first_buffered >= self.max_delay)

    def _as_row(self, row) -> tuple[tuple, tuple]:
        """(columns, values) of a row, validated (once per distinct column tuple)."""
        if type(row) is dict:
            cols, vals = tuple(row), tuple(row.values())
        elif isinstance(row, Mapping):
            cols = tuple(row)
            vals = tuple(row[c] for c in cols)
        elif isinstance(row, (list, tuple)) and self.columns is not None:
            if len(row) != len(self.columns):
                raise ValueError(f"row {row!r} has {len(row)} values; columns are {list(self.columns)}")
            cols, vals = self.columns, tuple(row)
        else:
            raise TypeError(f"SqlSink rows are dicts (or sequences when columns= is given), got {type(row).__name__}: "
                            f"{row!r}")
        if cols not in self._valid_columns:
            for k in cols:
                if not isinstance(k, str) or not _IDENT.match(k):
                    raise ValueError(f"row column names must be identifiers, got {k!r} in {row!r}")
            missing = [k for k in self.key if k not in cols]
            if missing:
                raise ValueError(f"row {row!r} lacks the key column(s) {missing}")
            if len(set(cols)) != len(cols):
                raise ValueError(f"row {row!r} names a column twice")
            self._valid_columns.add(cols)
        for v in vals:
            if type(v) not in _PLAIN_TYPES:
                vals = tuple(_plain(x) for x in vals)
                break
        return cols, vals

    def _q(self, name: str) -> str:
        return f'"{name}"' if self._path is not None else self._sa_quote(name)

    def _sa_quote(self, name: str) -> str:
        if self._engine is not None:
            return self._engine.dialect.identifier_preparer.quote_identifier(name)
        return name

    @staticmethod
    def _groups(batch: list) -> list[tuple[tuple, list[tuple]]]:
        """Rows grouped by their column tuple (one executemany per group)."""
        groups: dict = {}
        for cols, vals in batch:
            g = groups.get(cols)
            if g is None:
                groups[cols] = g = []
            g.append(vals)
        return list(groups.items())

    def _check_columns(self, cols: Iterable[str]) -> None:
        if self._table_columns is not None:
            missing = [c for c in cols if c not in self._table_columns]
            if missing:
                raise ValueError(f"table {self.table!r} has no column(s) {missing}; its columns are "
                                 f"{sorted(self._table_columns)}")

    # ---- SQLite through sqlite3 ---------------------------------------------------------------
    def _open_sqlite(self) -> None:
        conn = sqlite3.connect(self._path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if self._path != ":memory:":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.close()
                raise RuntimeError(f"could not switch {self._path!r} to WAL journal mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._conn = conn
        if self._sqlite_table_exists():
            self._table_columns = {r[1] for r in conn.execute(f"PRAGMA table_info({self._q(self.table)})")}
            self._check_columns(self.key)
            self._ensure_sqlite_unique_key()

    def _sqlite_table_exists(self) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                  (self.table,)).fetchone() is not None

    def _ensure_sqlite_unique_key(self) -> None:
        # Is there already a unique index (or primary key) on exactly the key columns?
        for idx in self._conn.execute(f"PRAGMA index_list({self._q(self.table)})").fetchall():
            name, unique = idx[1], idx[2]
            if unique:
                cols = tuple(r[2] for r in self._conn.execute(f"PRAGMA index_info({self._q(name)})"))
                if set(cols) == set(self.key):
                    return
        pk = [r[1] for r in sorted(self._conn.execute(f"PRAGMA table_info({self._q(self.table)})"),
                                   key=lambda r: r[5]) if r[5] > 0]
        if set(pk) == set(self.key):
            return  # an INTEGER PRIMARY KEY is the rowid: no index, still unique
        try:
            self._conn.execute(f"CREATE UNIQUE INDEX {self._q('gf_' + self.table + '_key')} ON "
                               f"{self._q(self.table)} ({', '.join(self._q(k) for k in self.key)})")
        except sqlite3.IntegrityError as e:
            raise ValueError(f"table {self.table!r} already holds duplicate keys {list(self.key)}, so they cannot "
                             f"be made unique: {e}") from e

    def _create_sqlite_table(self, row: dict) -> None:
        cols = ", ".join(f"{self._q(c)} {_sqlite_type(v)}".rstrip() for c, v in row.items())
        pk = ", ".join(self._q(k) for k in self.key)
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {self._q(self.table)} ({cols}, PRIMARY KEY ({pk}))")
        self._table_columns = {r[1] for r in self._conn.execute(f"PRAGMA table_info({self._q(self.table)})")}

    def _write_sqlite(self, batch: list[dict]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._table_columns is None:
                if not self.create:
                    raise ValueError(f"table {self.table!r} does not exist and create=False")
                self._create_sqlite_table(dict(zip(*batch[0])))
            for cols, rows in self._groups(batch):
                self._check_columns(cols)
                names = ", ".join(self._q(c) for c in cols)
                marks = ", ".join("?" for _ in cols)
                updates = [c for c in cols if c not in self.key]
                conflict = ", ".join(self._q(k) for k in self.key)
                tail = (f"DO UPDATE SET {', '.join(f'{self._q(c)} = excluded.{self._q(c)}' for c in updates)}"
                        if updates else "DO NOTHING")
                sql = (f"INSERT INTO {self._q(self.table)} ({names}) VALUES ({marks}) "
                       f"ON CONFLICT ({conflict}) {tail}")
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ---- any SQLAlchemy URL ----------------------------------------------------------------------
    def _open_sqlalchemy(self) -> None:
        sa = _extras.require("sqlalchemy", "sql", f"SqlSink({self.url!r})")
        options = {"pool_pre_ping": True, "pool_recycle": self.pool_recycle}
        options.update(self.engine_options)
        self._engine = sa.create_engine(self.url, **options)
        dialect = self._engine.dialect.name
        if dialect not in ("mysql", "mariadb", "postgresql", "sqlite"):
            raise ValueError(f"SqlSink has no upsert for the {dialect!r} dialect; supported: mysql, mariadb, "
                             f"postgresql, sqlite")
        insp = sa.inspect(self._engine)
        if insp.has_table(self.table):
            self._reflect()

    def _reflect(self) -> None:
        import sqlalchemy as sa

        md = sa.MetaData()
        self._sa_table = sa.Table(self.table, md, autoload_with=self._engine)
        self._table_columns = {c.name for c in self._sa_table.columns}
        self._check_columns(self.key)
        insp = sa.inspect(self._engine)
        keyset = set(self.key)
        pk = set(insp.get_pk_constraint(self.table).get("constrained_columns") or [])
        uniques = [set(u["column_names"]) for u in insp.get_unique_constraints(self.table)]
        uniques += [set(i["column_names"]) for i in insp.get_indexes(self.table) if i.get("unique")]
        if pk != keyset and keyset not in uniques:
            raise ValueError(f"table {self.table!r} has no primary key or unique index on {list(self.key)}: add one "
                             f"(a keyed upsert needs it), or choose the key it has ({sorted(pk) or 'none'})")

    def _create_sa_table(self, row: dict) -> None:
        import sqlalchemy as sa

        def col_type(name, v):
            if isinstance(v, bool):
                return sa.Boolean()
            if isinstance(v, int):
                return sa.BigInteger()
            if isinstance(v, float):
                return sa.Float(precision=53)
            if isinstance(v, (bytes, bytearray)):
                return sa.LargeBinary()
            return sa.String(255) if name in self.key else sa.Text()

        md = sa.MetaData()
        cols = [sa.Column(c, col_type(c, v), primary_key=c in self.key, autoincrement=False)
                for c, v in row.items()]
        sa.Table(self.table, md, *cols)
        md.create_all(self._engine, checkfirst=True)
        self._reflect()

    def _upsert(self, cols: tuple):
        import sqlalchemy as sa

        t = self._sa_table
        dialect = self._engine.dialect.name
        updates = [c for c in cols if c not in self.key]
        if dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import insert

            stmt = insert(t)
            if updates:
                return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in updates})
            return stmt.prefix_with("IGNORE")
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(t)
        if updates:
            return stmt.on_conflict_do_update(index_elements=list(self.key),
                                              set_={c: stmt.excluded[c] for c in updates})
        return stmt.on_conflict_do_nothing(index_elements=list(self.key))

    def _write_sqlalchemy(self, batch: list[dict]) -> None:
        import sqlalchemy as sa

        wait = self.retry_wait
        for attempt in range(self.retries + 1):
            try:
                if self._sa_table is None:
                    if not self.create:
                        raise ValueError(f"table {self.table!r} does not exist and create=False")
                    self._create_sa_table(dict(zip(*batch[0])))
                if self._conn is None:
                    self._conn = self._engine.connect()
                with self._conn.begin():
                    for cols, rows in self._groups(batch):
                        self._check_columns(cols)
                        self._conn.execute(self._upsert(cols), [dict(zip(cols, v)) for v in rows])
                return
            except sa.exc.DBAPIError as e:
                disconnect = _server_unreachable(e, self._engine)
                # Drop the connection whatever happened: the next attempt starts on a fresh one.
                if self._conn is not None:
                    try:
                        self._conn.invalidate()
                        self._conn.close()
                    except Exception:
                        pass
                    self._conn = None
                if not disconnect or attempt == self.retries:
                    raise
                self.batches_retried += 1
                time.sleep(wait)
                wait *= 2
