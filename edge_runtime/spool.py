"""The offline spool: every telemetry window is on disk until it is confirmed.

Confirmed means committed to the monitor's database (the monitor's ``ack``
message), not acknowledged by the broker: a broker keeps what it has
acknowledged in memory until its next autosave, so a broker crash would lose
windows a device had already forgotten (see docs/telemetry.md).

SQLite in WAL mode with ``synchronous=FULL``: a window that was appended
survives a crash or power cut. Sequence numbers are assigned here, in the
same transaction, so they increase across agent restarts. The spool is
bounded; when full, the oldest window is dropped and counted, and the count
travels in the next windows (``dropped_windows``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path


class WindowSpool:
    """A bounded, durable FIFO of encoded windows keyed by sequence number.

    Args:
        path: the SQLite file.
        max_windows: how many unsent windows to keep at most.
    """

    def __init__(self, path: str | Path, max_windows: int = 10_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_windows = max_windows
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS windows (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 0), ('dropped', 0)")

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped")

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq")

    def append(self, message: dict) -> int:
        """Assign the next sequence number to ``message`` (sets ``seq`` and ``dropped_windows``), store it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq")
                dropped = self._meta("dropped")
                n = self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
                if n >= self.max_windows:
                    excess = n - self.max_windows + 1
                    self._db.execute(
                        "DELETE FROM windows WHERE seq IN (SELECT seq FROM windows ORDER BY seq LIMIT ?)", (excess,)
                    )
                    dropped += excess
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (dropped,))
                message["seq"] = seq
                message["dropped_windows"] = dropped
                payload = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
                self._db.execute("INSERT INTO windows VALUES (?, ?)", (seq, payload))
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return seq

    def peek(self, limit: int = 100, after: int = -1) -> list[tuple[int, bytes]]:
        """The oldest unsent windows with seq > ``after``, in order."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, payload FROM windows WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()

    def get(self, seqs: list[int]) -> list[tuple[int, bytes]]:
        """The windows among ``seqs`` that are still spooled, in order."""
        if not seqs:
            return []
        with self._lock:
            marks = ",".join("?" * len(seqs))
            return self._db.execute(f"SELECT seq, payload FROM windows WHERE seq IN ({marks}) ORDER BY seq",
                                    list(seqs)).fetchall()

    def delete(self, seq: int) -> None:
        """Forget a confirmed window."""
        with self._lock:
            self._db.execute("DELETE FROM windows WHERE seq = ?", (seq,))

    def delete_ranges(self, ranges: list[tuple[int, int]]) -> int:
        """Forget the windows of inclusive [first, last] ranges (a monitor's confirmation); returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = sum(self._db.execute("DELETE FROM windows WHERE seq BETWEEN ? AND ?", r).rowcount for r in ranges)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def newest(self) -> int:
        """The highest spooled seq, -1 when empty."""
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM windows").fetchone()
        return -1 if row[0] is None else int(row[0])

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
