"""The embedded store: one SQLite file in WAL mode, shared by every worker process on the host.

Each read-modify-write runs in ``BEGIN IMMEDIATE`` (a deferred transaction that reads and then
writes can fail with SQLITE_BUSY despite the busy timeout), and a step's record and idempotency
claim commit in that one transaction before the answer leaves. ``synchronous=NORMAL`` survives a
killed process; ``FULL`` (``?synchronous=full`` in the URL) also survives a power cut. WAL needs one
host and a local filesystem.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import anyio.to_thread

from .base import (
    ANY, HISTORY_DOWNSAMPLE, CapReached, Caps, Claim, RoundRecord, SessionExists, SessionRecord, record_bytes,
    translate_errors,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT,
    version INTEGER NOT NULL,
    meta BLOB NOT NULL,
    data BLOB NOT NULL,
    expires_at REAL NOT NULL,
    nbytes INTEGER NOT NULL DEFAULT 0  -- length(meta) + length(data), for the byte budgets
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, id);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS claims (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    body_digest TEXT NOT NULL,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (session_id, key)
);
CREATE INDEX IF NOT EXISTS claims_by_expiry ON claims (expires_at);
CREATE TABLE IF NOT EXISTS history (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,  -- the record version that wrote it
    archived INTEGER NOT NULL DEFAULT 0,
    entry BLOB NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS history_dropped (
    session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    dropped INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    version INTEGER NOT NULL,
    meta BLOB NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (session_id, step)
);
CREATE TABLE IF NOT EXISTS rounds (
    session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    meta BLOB NOT NULL,
    data BLOB NOT NULL
);
"""
NEVER = float("inf")


@translate_errors(sqlite3.OperationalError)
class SQLiteStore:
    private = False  # other processes may write the same sessions
    max_record_bytes = max_round_bytes = 1_000_000_000  # SQLite's own limit on one value (SQLITE_MAX_LENGTH)

    def __init__(self, path: str, session_ttl_seconds: int = 0, synchronous: str = "normal",
                 timeout_seconds: float = 5.0):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._ttl = session_ttl_seconds
        self._lock = threading.Lock()  # one connection per process, used by one thread at a time
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout_seconds)
        self._db.execute(f"PRAGMA busy_timeout={int(timeout_seconds * 1000)}")
        # Tensor blobs are megabytes: 64 KiB pages write them 3× faster than 4 KiB (bench/stores.py).
        # Only takes effect when the file is created.
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous.lower() == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        if "nbytes" not in {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}:  # 0.1.0's table
            self._db.execute("ALTER TABLE sessions ADD COLUMN nbytes INTEGER NOT NULL DEFAULT 0")
            self._db.execute("UPDATE sessions SET nbytes = length(meta) + length(data)")
        if "body_sha256" in {row[1] for row in self._db.execute("PRAGMA table_info(claims)")}:
            self._db.execute("ALTER TABLE claims RENAME COLUMN body_sha256 TO body_digest")  # 0.1.0's name

    async def _run(self, fn, write: bool = True):
        """Run ``fn(db)`` in a worker thread; writes inside one BEGIN IMMEDIATE transaction."""
        def locked():
            with self._lock:
                if not write:
                    return fn(self._db)
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
        return await anyio.to_thread.run_sync(locked)

    def _expiry(self) -> float:
        return time.time() + self._ttl if self._ttl else NEVER

    async def create(self, record: SessionRecord, caps: Caps | None = None) -> None:
        nbytes = record_bytes(record) + (caps.reserve if caps is not None else 0)

        def insert(db):  # one BEGIN IMMEDIATE: no other writer between the counts and the insert
            now = time.time()
            db.execute("DELETE FROM sessions WHERE id = ? AND expires_at <= ?", (record.id, now))
            if db.execute("SELECT 1 FROM sessions WHERE id = ?", (record.id,)).fetchone():
                raise SessionExists(record.id)
            if caps is not None:
                _check(db, caps, record.owner, nbytes, now)
            db.execute("INSERT INTO sessions (id, owner, version, meta, data, expires_at, nbytes) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (record.id, record.owner, record.version, record.meta, record.data, self._expiry(), nbytes))
        await self._run(insert)

    async def get(self, session_id: str, owner=ANY) -> SessionRecord | None:
        def select(db):
            now = time.time()
            if owner is ANY:
                row = db.execute("SELECT id, owner, version, meta, data FROM sessions WHERE id = ? AND expires_at > ?",
                                 (session_id, now)).fetchone()
            else:  # the owner is compared before the row's blobs are read
                row = db.execute("SELECT id, owner, version, meta, data FROM sessions "
                                 "WHERE id = ? AND owner IS ? AND expires_at > ?", (session_id, owner, now)).fetchone()
            return SessionRecord(*row) if row else None
        return await self._run(select, write=False)

    async def version(self, session_id: str) -> int | None:
        def select(db):
            row = db.execute("SELECT version FROM sessions WHERE id = ? AND expires_at > ?",
                             (session_id, time.time())).fetchone()
            return row[0] if row else None
        return await self._run(select, write=False)

    async def compare_and_set(self, record, expected_version, claim: Claim | None = None,
                              close_round: int | None = None, history: tuple[bytes, int] | None = None,
                              snapshot: tuple[int, int] | None = None) -> bool:
        def cas(db):
            now = time.time()
            row = db.execute("SELECT version FROM sessions WHERE id = ? AND expires_at > ?",
                             (record.id, now)).fetchone()
            if row is None or row[0] != expected_version:
                return False
            if close_round is not None and _round_version(db, record.id) != close_round:
                return False
            if not _claim(db, record.id, claim, now):  # a refusal here has written nothing
                return False
            if close_round is not None:
                db.execute("DELETE FROM rounds WHERE session_id = ?", (record.id,))
            if history is not None:
                _append(db, record.id, record.version, *history)
            if snapshot is not None:
                step, keep = snapshot
                db.execute("DELETE FROM snapshots WHERE session_id = ? AND step >= ?", (record.id, step))
                db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?)",
                           (record.id, step, record.version, record.meta, record.data))
                db.execute("DELETE FROM snapshots WHERE session_id = ? AND step NOT IN (SELECT step FROM snapshots "
                           "WHERE session_id = ? ORDER BY step DESC LIMIT ?)", (record.id, record.id, keep))
            db.execute("UPDATE sessions SET version = ?, meta = ?, data = ?, expires_at = ? WHERE id = ?",
                       (record.version, record.meta, record.data, self._expiry(), record.id))
            return True
        return await self._run(cas)

    async def get_history(self, session_id: str) -> list[bytes]:
        def select(db):
            rows = db.execute("SELECT h.entry FROM history h JOIN sessions s ON s.id = h.session_id "
                              "WHERE h.session_id = ? AND s.expires_at > ? ORDER BY h.seq",
                              (session_id, time.time())).fetchall()
            return [row[0] for row in rows]
        return await self._run(select, write=False)

    async def get_snapshot(self, session_id: str, step: int) -> SessionRecord | None:
        def select(db):
            row = db.execute("SELECT s.id, s.owner, n.version, n.meta, n.data FROM snapshots n JOIN sessions s "
                             "ON s.id = n.session_id WHERE n.session_id = ? AND n.step = ? AND s.expires_at > ?",
                             (session_id, step, time.time())).fetchone()
            return SessionRecord(*row) if row else None
        return await self._run(select, write=False)

    async def snapshot_steps(self, session_id: str) -> list[int]:
        def select(db):
            return [row[0] for row in db.execute(
                "SELECT n.step FROM snapshots n JOIN sessions s ON s.id = n.session_id WHERE n.session_id = ? "
                "AND s.expires_at > ? ORDER BY n.step", (session_id, time.time())).fetchall()]
        return await self._run(select, write=False)

    async def get_round(self, session_id: str) -> RoundRecord | None:
        def select(db):
            row = db.execute("SELECT r.version, r.meta, r.data FROM rounds r JOIN sessions s ON s.id = r.session_id "
                             "WHERE r.session_id = ? AND s.expires_at > ?", (session_id, time.time())).fetchone()
            return RoundRecord(*row) if row else None
        return await self._run(select, write=False)

    async def put_round(self, session_id: str, round: RoundRecord, expected_version: int,
                        claim: Claim | None = None) -> bool:
        def put(db):
            now = time.time()
            if db.execute("SELECT 1 FROM sessions WHERE id = ? AND expires_at > ?", (session_id, now)).fetchone() is None:
                return False
            if _round_version(db, session_id) != expected_version or not _claim(db, session_id, claim, now):
                return False
            db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?)", (session_id, round.version, round.meta, round.data))
            return True
        return await self._run(put)

    async def get_claim(self, session_id: str, key: str) -> Claim | None:
        def select(db):
            row = db.execute(
                "SELECT body_digest, version, step, expires_at FROM claims WHERE session_id = ? AND key = ? AND expires_at > ?",
                (session_id, key, time.time())).fetchone()
            return Claim(key, row[0], row[1], row[2], max(1, int(row[3] - time.time()))) if row else None
        return await self._run(select, write=False)

    async def delete(self, session_id: str) -> bool:
        def remove(db):
            return db.execute("DELETE FROM sessions WHERE id = ? AND expires_at > ?",
                              (session_id, time.time())).rowcount == 1
        return await self._run(remove)

    async def list(self, owner, limit, after):
        def select(db):
            rows = db.execute(
                "SELECT id, owner, version, meta FROM sessions WHERE owner IS ? AND id > ? AND expires_at > ? "
                "ORDER BY id LIMIT ?", (owner, after or "", time.time(), limit)).fetchall()
            return [SessionRecord(*row, b"") for row in rows]
        return await self._run(select, write=False)

    async def count(self) -> int:
        return await self._run(
            lambda db: db.execute("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (time.time(),)).fetchone()[0],
            write=False)

    async def count_owned(self, owner: str | None) -> int:
        return await self._run(
            lambda db: db.execute("SELECT COUNT(*) FROM sessions WHERE owner IS ? AND expires_at > ?",
                                  (owner, time.time())).fetchone()[0],
            write=False)

    async def sweep(self) -> int:
        def purge(db):
            now = time.time()
            db.execute("DELETE FROM claims WHERE expires_at <= ?", (now,))
            return db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount
        return await self._run(purge)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone(), write=False)

    async def close(self) -> None:
        with self._lock:
            self._db.close()


def _append(db, session_id: str, seq: int, entry: bytes, limit: int) -> None:
    """Append a history entry; past ``limit`` recent ones, drop the oldest, keeping every 10th."""
    db.execute("INSERT OR REPLACE INTO history (session_id, seq, archived, entry) VALUES (?, ?, 0, ?)",
               (session_id, seq, entry))
    (recent,) = db.execute("SELECT COUNT(*) FROM history WHERE session_id = ? AND archived = 0", (session_id,)).fetchone()
    for (old,) in db.execute("SELECT seq FROM history WHERE session_id = ? AND archived = 0 ORDER BY seq LIMIT ?",
                             (session_id, max(recent - limit, 0))).fetchall():
        db.execute("INSERT INTO history_dropped VALUES (?, 1) ON CONFLICT (session_id) DO UPDATE SET dropped = dropped + 1",
                   (session_id,))
        (dropped,) = db.execute("SELECT dropped FROM history_dropped WHERE session_id = ?", (session_id,)).fetchone()
        if dropped % HISTORY_DOWNSAMPLE == 0:
            db.execute("UPDATE history SET archived = 1 WHERE session_id = ? AND seq = ?", (session_id, old))
        else:
            db.execute("DELETE FROM history WHERE session_id = ? AND seq = ?", (session_id, old))
    db.execute("DELETE FROM history WHERE session_id = ? AND archived = 1 AND seq NOT IN (SELECT seq FROM history "
               "WHERE session_id = ? AND archived = 1 ORDER BY seq DESC LIMIT ?)", (session_id, session_id, limit))


def _round_version(db, session_id: str) -> int:
    row = db.execute("SELECT version FROM rounds WHERE session_id = ?", (session_id,)).fetchone()
    return row[0] if row else 0


def _claim(db, session_id: str, claim: Claim | None, now: float) -> bool:
    """Write ``claim`` unless its key is claimed (and live) already."""
    if claim is None:
        return True
    db.execute("DELETE FROM claims WHERE session_id = ? AND key = ? AND expires_at <= ?", (session_id, claim.key, now))
    try:
        db.execute("INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                   (session_id, claim.key, claim.body_digest, claim.version, claim.step, now + claim.ttl_seconds))
    except sqlite3.IntegrityError:
        return False
    return True


def _check(db, caps: Caps, owner: str | None, nbytes: int, now: float) -> None:
    (count,) = db.execute("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (now,)).fetchone()
    if count >= caps.sessions:
        raise CapReached("sessions", caps.sessions, count)
    if owner is None:
        return
    count, used = db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM sessions "
                             "WHERE owner = ? AND expires_at > ?", (owner, now)).fetchone()
    if count >= caps.sessions_per_owner:
        raise CapReached("sessions_per_owner", caps.sessions_per_owner, count)
    if used + nbytes > caps.bytes_per_owner:
        raise CapReached("bytes_per_owner", caps.bytes_per_owner, used, nbytes)
