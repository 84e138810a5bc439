"""The result store: one SQLite file per workspace holding every evaluation run.

A run is cut into *chunks* (a stage's slice of samples); a chunk's per-sample
outcomes and its bookkeeping row are written in one transaction, so a run killed
at any instant (``kill -9`` included) leaves only whole chunks behind and a
resumed run repeats none of them. The schema carries a version number; a store
written by a newer advkit is refused rather than misread.

Reading commands open a store with ``read_only=True``: nothing is created or changed,
and a store on read-only media still opens. A file that is not an advkit store is
refused before anything is written to it. One process at a time works on a run: it
holds an operating-system lock (a ``-runN.lock`` file beside the store) that ``kill -9``
releases, so a second ``--resume`` is refused while the first is alive and allowed
once it is gone.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import sqlite3
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected against a second resume
    fcntl = None

SCHEMA_VERSION = 1
DEFAULT_STORE = Path("advkit-output") / "runs.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    status TEXT NOT NULL,              -- running | done
    config TEXT NOT NULL,              -- JSON: model, data, threat, suite, seed, chunk size
    environment TEXT NOT NULL,         -- JSON: versions, device, fingerprint
    summary TEXT                       -- JSON, once done
);
CREATE TABLE IF NOT EXISTS samples (   -- the clean pass
    run_id INTEGER NOT NULL, idx INTEGER NOT NULL,
    label INTEGER NOT NULL, clean_pred INTEGER NOT NULL, clean_conf REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS chunks (
    run_id INTEGER NOT NULL, stage INTEGER NOT NULL, chunk INTEGER NOT NULL,
    n INTEGER NOT NULL, forward INTEGER NOT NULL, backward INTEGER NOT NULL,
    seconds REAL NOT NULL, finished TEXT NOT NULL,
    PRIMARY KEY (run_id, stage, chunk)
);
CREATE TABLE IF NOT EXISTS outcomes (  -- one row per sample a stage attacked
    run_id INTEGER NOT NULL, stage INTEGER NOT NULL, idx INTEGER NOT NULL,
    success INTEGER NOT NULL, norm REAL, prediction INTEGER NOT NULL,
    passes REAL NOT NULL, passes_exact INTEGER NOT NULL,
    PRIMARY KEY (run_id, stage, idx)
);
CREATE TABLE IF NOT EXISTS images (    -- a few clean / adversarial pairs for the gallery
    run_id INTEGER NOT NULL, stage INTEGER NOT NULL, idx INTEGER NOT NULL,
    shape TEXT NOT NULL, info TEXT NOT NULL, clean BLOB NOT NULL, adversarial BLOB NOT NULL,
    PRIMARY KEY (run_id, stage, idx)
);
CREATE TABLE IF NOT EXISTS checks (
    run_id INTEGER NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL,
    message TEXT NOT NULL, details TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""


@dataclass(frozen=True)
class Outcome:
    """What one stage did to one sample."""

    idx: int
    success: bool
    norm: float | None
    prediction: int
    passes: float
    passes_exact: bool


@dataclass(frozen=True)
class ChunkRecord:
    stage: int
    chunk: int
    n: int
    forward: int
    backward: int
    seconds: float


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _pack(array: np.ndarray) -> bytes:
    return zlib.compress(np.ascontiguousarray(array, dtype=np.float32).tobytes(), 6)


def _unpack(blob: bytes, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=np.float32).reshape(shape)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class StoreError(ValueError):
    """A store that cannot be used as asked (missing, not an advkit store, damaged,
    read-only, or its run busy in another process); the message says what to do."""


@functools.cache
def _expected_columns() -> dict[str, list[str]]:
    """Each advkit table's columns, read from the schema itself."""
    db = sqlite3.connect(":memory:")
    db.executescript(_SCHEMA)
    columns = _columns(db)
    db.close()
    return columns


def _columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    names = [r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    return {name: [r[1] for r in db.execute(f'PRAGMA table_info("{name}")')] for name in names}


def _lock_file(path: Path, run_id: int) -> Path:
    return path.with_name(f"{path.name}-run{run_id}.lock")


class Store:
    """A SQLite file of evaluation runs (created on first use).

    Args:
        path: the file (``":memory:"`` for a store that lives and dies with the object).
        read_only: open an existing store for reading only: never create, change or
            lock anything (reading commands; a store on read-only media).
    """

    def __init__(self, path: str | Path = DEFAULT_STORE, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._locks: dict[int, int] = {}   # run id -> file descriptor holding its lock
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"store {self.path} is a directory; pass a file path "
                             "(runs.sqlite)")
        if read_only:
            if not self.path.is_file():
                raise StoreError(f"no store at {self.path}; check the --store path")
            self._db = self._guard(self._connect_read_only)
            self._guard(self._check_schema)
            return
        if str(path) != ":memory:":
            self._check_writable()
        self._db = self._guard(lambda: sqlite3.connect(self.path, timeout=60,
                                                       isolation_level=None))
        if not self._guard(lambda: _columns(self._db)):
            # A new (or empty) file: create the schema. IF NOT EXISTS and OR IGNORE let
            # two processes that both found it empty create it side by side.
            self._guard(lambda: self._db.executescript(
                "BEGIN IMMEDIATE;" + _SCHEMA + "INSERT OR IGNORE INTO meta VALUES "
                f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;"))
        # Checked before anything is written: a foreign database is left as it was.
        self._guard(self._check_schema)
        self._guard(lambda: self._db.execute("PRAGMA journal_mode=WAL"))

    def _check_writable(self) -> None:
        """A store that records results needs its file and directory writable (SQLite
        keeps its write-ahead log beside the file); say so before touching anything."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the store's directory {self.path.parent} "
                             f"({err.strerror}); pass another --store path") from err
        if not os.access(self.path.parent, os.W_OK) or (
                self.path.exists() and not os.access(self.path, os.W_OK)):
            raise StoreError(f"{self.path} is on read-only media or not writable: this command "
                             "records results there; reading commands (runs, report, export) "
                             "still work. Copy the store to a writable place or pass another "
                             "--store path")

    def _connect_read_only(self) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(str(self.path.resolve()))
        db = None
        try:
            db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=60, isolation_level=None)
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            if db is not None:
                db.close()
            if os.access(self.path.parent, os.W_OK):
                raise
        # Read-only media: SQLite cannot create the shared-memory file (-shm) that a
        # reader of a WAL store needs. Without a write-ahead log beside it, the file alone
        # holds every committed transaction and nobody can change it, so it may be read as
        # immutable. A log would be ignored that way (and its last chunks lost): refuse.
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise StoreError(f"{self.path} is on read-only media with a write-ahead log "
                             f"({wal.name}) but without its {self.path.name}-shm, so SQLite "
                             f"cannot read it there; copy {self.path.name} and {wal.name} to a "
                             "writable place and read them there")
        return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None)

    def _check_schema(self) -> None:
        """Refuse a file that is not an advkit store, or one from a newer advkit."""
        found = _columns(self._db)
        if "meta" not in found:
            tables = ", ".join(sorted(found)) or "none"
            raise StoreError(f"{self.path} is not an advkit result store (its tables: "
                             f"{tables}); pass another --store path")
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None or not str(row[0]).isdigit():
            raise StoreError(f"{self.path} is not an advkit result store (no schema version); "
                             "pass another --store path")
        if int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer advkit (schema {row[0]}, this "
                             f"advkit reads {SCHEMA_VERSION}); upgrade advkit")
        for table, columns in _expected_columns().items():
            if found.get(table) != columns:
                have = ", ".join(found[table]) if table in found else "missing"
                raise StoreError(f"{self.path} is not an advkit result store: table {table} "
                                 f"has columns ({have}), advkit's has ({', '.join(columns)}); "
                                 "pass another --store path")

    def _guard(self, work):
        """Run ``work``; a SQLite error becomes a StoreError (a damaged page can surface on
        any read, not only on opening)."""
        try:
            return work()
        except sqlite3.DatabaseError as err:
            raise self._error(err) from err

    def _error(self, err: sqlite3.DatabaseError) -> StoreError:
        """What a SQLite error means for the user, naming the store and what to do."""
        text = str(err)
        if isinstance(err, sqlite3.IntegrityError):
            return StoreError(f"{self.path}: a result is already stored ({text}); is another "
                              "process working on the same run?")
        if "malformed" in text:
            return StoreError(f"{self.path} is damaged ({text}); restore it from a copy, or "
                              "pass another --store path")
        if "not a database" in text:
            return StoreError(f"{self.path} is not an advkit result store ({text}); pass "
                              "another --store path")
        if "readonly" in text or "read-only" in text:
            return StoreError(f"{self.path} is read-only ({text}); copy the store to a writable "
                              "place or pass another --store")
        return StoreError(f"cannot use the store {self.path}: {text}")

    def _rows(self, query: str, args: Sequence = ()) -> list[tuple]:
        return self._guard(lambda: self._db.execute(query, args).fetchall())

    def close(self) -> None:
        for run_id in list(self._locks):
            # A finished run (one resumed after it was done, say) keeps no lock file.
            done = False
            with contextlib.suppress(sqlite3.Error):
                done = self._db.execute("SELECT status FROM runs WHERE id=?",
                                        (run_id,)).fetchone() == ("done",)
            self._release(run_id, remove=done)
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._guard(lambda: self._db.execute("BEGIN IMMEDIATE"))
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as err:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back
                self._db.execute("ROLLBACK")
            if isinstance(err, sqlite3.DatabaseError):
                raise self._error(err) from err
            raise

    # --- who works on a run -------------------------------------------------------------------

    def claim(self, run_id: int) -> None:
        """Hold run ``run_id`` until it finishes or this store is closed; refuse if another
        process holds it. Two processes resuming one run would compute the same chunks and
        collide when storing them; the lock is the operating system's (``flock``), so a
        process that dies, even by ``kill -9``, lets go of it at once."""
        if fcntl is None or run_id in self._locks or str(self.path) == ":memory:":
            return
        lock = _lock_file(self.path, run_id)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreError(f"cannot lock run {run_id} ({lock}: {err.strerror}); the store's "
                             "directory must be writable to record results") from err
        # A reader asking whether the run is busy holds a shared lock for a moment: retry.
        for _ in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            holder = _read_pid(fd)
            os.close(fd)
            raise StoreError(
                f"run {run_id} in {self.path} is being worked on by another process"
                f"{f' (pid {holder})' if holder else ''}; wait for it to finish (`advkit runs "
                f"--store {self.path}` shows it as running), or stop it and resume again")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._locks[run_id] = fd

    def _release(self, run_id: int, remove: bool = False) -> None:
        fd = self._locks.pop(run_id, None)
        if fd is None:
            return
        if remove:  # while still held: whoever opens the file next sees a new, free one
            with contextlib.suppress(OSError):
                _lock_file(self.path, run_id).unlink()
        os.close(fd)

    def holder(self, run_id: int) -> int | None:
        """The pid of the process working on run ``run_id`` (None when none is): reads
        the lock, never creates or takes it for longer than a moment."""
        if fcntl is None or str(self.path) == ":memory:":
            return None
        if run_id in self._locks:
            return os.getpid()
        try:
            fd = os.open(_lock_file(self.path, run_id), os.O_RDONLY)
        except OSError:
            return None   # no lock file: nobody has worked on the run since it finished
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        finally:
            os.close(fd)   # closing also drops the shared lock, if it was taken
        return None

    def state(self, run_id: int) -> str:
        """``done``, ``running`` (a live process works on it) or ``unfinished`` (stopped
        before the end: killed, failed, interrupted; ``--resume`` continues it)."""
        if self.run(run_id)["status"] == "done":
            return "done"
        return "running" if self.holder(run_id) is not None else "unfinished"

    # --- runs ---------------------------------------------------------------------------------

    def create_run(self, config: dict, environment: dict) -> int:
        """A new run, held by this store (:meth:`claim`) until it finishes."""
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO runs (created, updated, status, config, environment) "
                "VALUES (?, ?, 'running', ?, ?)",
                (_now(), _now(), json.dumps(config), json.dumps(environment)))
            run_id = int(cur.lastrowid)
        self.claim(run_id)
        return run_id

    def run(self, run_id: int) -> dict:
        found = self._rows("SELECT id, created, updated, status, config, environment, summary "
                           "FROM runs WHERE id=?", (int(run_id),))
        if not found:
            known = [r[0] for r in self._rows("SELECT id FROM runs ORDER BY id")]
            raise ValueError(f"no run {run_id} in {self.path} (runs: "
                             f"{', '.join(map(str, known)) or 'none'}); see `advkit runs`")
        row = found[0]
        return {"id": row[0], "created": row[1], "updated": row[2], "status": row[3],
                "config": json.loads(row[4]), "environment": json.loads(row[5]),
                "summary": json.loads(row[6]) if row[6] else None}

    def runs(self) -> list[dict]:
        ids = [r[0] for r in self._rows("SELECT id FROM runs ORDER BY id")]
        return [self.run(i) for i in ids]

    def finish_run(self, run_id: int, summary: dict) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET status='done', updated=?, summary=? WHERE id=?",
                       (_now(), json.dumps(summary), run_id))
        self._release(run_id, remove=True)  # a finished run needs no guard: no lock file left

    # --- the clean pass -----------------------------------------------------------------------

    def add_clean(self, run_id: int, chunk: ChunkRecord,
                  rows: Iterable[tuple[int, int, int, float]]) -> None:
        """Clean predictions of one chunk: (idx, label, prediction, confidence)."""
        with self._transaction() as db:
            db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
                           [(run_id, *r) for r in rows])
            self._add_chunk(db, run_id, chunk)

    def samples(self, run_id: int) -> list[tuple[int, int, int, float]]:
        return self._rows(
            "SELECT idx, label, clean_pred, clean_conf FROM samples WHERE run_id=? ORDER BY idx",
            (run_id,))

    # --- stages -------------------------------------------------------------------------------

    def add_outcomes(self, run_id: int, chunk: ChunkRecord, outcomes: Sequence[Outcome],
                     images: Sequence[tuple[int, dict, np.ndarray, np.ndarray]] = ()) -> None:
        """One chunk of a stage: every outcome, a few gallery images (idx, info, clean,
        adversarial), the chunk row."""
        with self._transaction() as db:
            db.executemany("INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                (run_id, chunk.stage, o.idx, int(o.success), o.norm, o.prediction, o.passes,
                 int(o.passes_exact)) for o in outcomes])
            db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (run_id, chunk.stage, idx, json.dumps(list(clean.shape)), json.dumps(info),
                 _pack(clean), _pack(adv)) for idx, info, clean, adv in images])
            self._add_chunk(db, run_id, chunk)

    def _add_chunk(self, db: sqlite3.Connection, run_id: int, c: ChunkRecord) -> None:
        db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (run_id, c.stage, c.chunk, c.n, c.forward, c.backward, c.seconds, _now()))
        db.execute("UPDATE runs SET updated=? WHERE id=?", (_now(), run_id))

    def done_chunks(self, run_id: int, stage: int) -> set[int]:
        return {r[0] for r in self._rows(
            "SELECT chunk FROM chunks WHERE run_id=? AND stage=?", (run_id, stage))}

    def chunks(self, run_id: int) -> list[ChunkRecord]:
        return [ChunkRecord(*r) for r in self._rows(
            "SELECT stage, chunk, n, forward, backward, seconds FROM chunks WHERE run_id=? "
            "ORDER BY stage, chunk", (run_id,))]

    def outcomes(self, run_id: int, stage: int | None = None) -> list[tuple[int, Outcome]]:
        """(stage, outcome) pairs, ordered by stage and sample."""
        query = ("SELECT stage, idx, success, norm, prediction, passes, passes_exact FROM outcomes "
                 "WHERE run_id=?" + (" AND stage=?" if stage is not None else "") +
                 " ORDER BY stage, idx")
        args = (run_id,) if stage is None else (run_id, stage)
        return [(r[0], Outcome(r[1], bool(r[2]), r[3], r[4], r[5], bool(r[6])))
                for r in self._rows(query, args)]

    def images(self, run_id: int) -> list[tuple[int, int, dict, np.ndarray, np.ndarray]]:
        """(stage, idx, info, clean, adversarial) for the stored gallery images."""
        rows = self._rows("SELECT stage, idx, shape, info, clean, adversarial FROM images "
                          "WHERE run_id=? ORDER BY idx, stage", (run_id,))
        out = []
        for stage, idx, shape, info, clean, adv in rows:
            shape = json.loads(shape)
            out.append((stage, idx, json.loads(info), _unpack(clean, shape), _unpack(adv, shape)))
        return out

    # --- checks -------------------------------------------------------------------------------

    def set_check(self, run_id: int, name: str, status: str, message: str, details: dict) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?)",
                       (run_id, name, status, message, json.dumps(details)))

    def checks(self, run_id: int) -> list[dict]:
        return [{"name": r[0], "status": r[1], "message": r[2], "details": json.loads(r[3])}
                for r in self._rows("SELECT name, status, message, details FROM checks "
                                    "WHERE run_id=? ORDER BY rowid", (run_id,))]

    # --- export -------------------------------------------------------------------------------

    def per_sample_rows(self, run_id: int) -> list[dict]:
        """One row per sample: label, clean prediction, the stage that broke it (if any),
        with what norm, after how many model passes or queries, and its ``status``:

        - ``broken``: misclassified, or an adversarial example within eps was found;
        - ``robust``: every stage it must face attacked it and none broke it;
        - ``unknown``: the run stopped before that (no clean prediction yet, or a stage
          still to attack it). ``robust`` is then None: an image nobody attacked is not
          robust, and not broken either.
        """
        config = self.run(run_id)["config"]
        names = ["clean"] + [s["name"] for s in config["suite"]["stages"]]
        minimal = config["suite"]["kind"] == "minimal"
        eps = config["threat"]["eps"]
        rows = {idx: {"idx": idx, "label": None, "clean_pred": None, "clean_conf": None,
                      "broken_by": None, "norm": None, "prediction": None,
                      "passes": 0.0, "passes_exact": True} for idx in range(config["n"])}
        for idx, label, pred, conf in self.samples(run_id):
            rows[idx].update(label=label, clean_pred=pred, clean_conf=conf,
                             broken_by="clean" if pred != label else None,
                             norm=0.0 if pred != label else None, prediction=pred)
        attacked = dict.fromkeys(rows, 0)   # stages that attacked each sample
        for stage, o in self.outcomes(run_id):
            row = rows[o.idx]
            attacked[o.idx] += 1
            row["passes"] += o.passes
            row["passes_exact"] = row["passes_exact"] and o.passes_exact
            if not o.success:
                continue
            better = minimal and o.norm is not None and (
                row["norm"] is None or o.norm < row["norm"])
            if row["broken_by"] is None or better:
                row.update(broken_by=names[stage], norm=o.norm, prediction=o.prediction)
        for idx, row in rows.items():
            if minimal:  # broken at the run's eps only if the smallest perturbation fits
                broken = row["norm"] is not None and row["norm"] <= eps * (1 + 1e-9)
            else:
                broken = row["broken_by"] is not None
            # Every stage attacks each sample that is still standing (a budgeted suite) or
            # that the model classifies correctly (a minimal one): one missing is unknown.
            if broken:
                status = "broken"
            elif row["label"] is not None and attacked[idx] == len(names) - 1:
                status = "robust"
            else:
                status = "unknown"
            row["robust"] = {"broken": False, "robust": True, "unknown": None}[status]
            row["status"] = status
        return [rows[i] for i in sorted(rows)]

    def export(self, run_id: int, fmt: str) -> str:
        """The run (JSON: config, summary, checks and per-sample rows) or its per-sample table
        (CSV) as text. Both say whether the run finished: JSON in ``status`` (as
        :meth:`state`) and ``unknown``, both in each sample's ``status``."""
        if fmt not in ("json", "csv"):
            raise ValueError(f"unknown export format {fmt!r}: use json or csv")
        rows = self.per_sample_rows(run_id)
        if fmt == "json":
            run = {**self.run(run_id), "status": self.state(run_id),
                   "unknown": sum(r["status"] == "unknown" for r in rows)}
            return json.dumps({**run, "checks": self.checks(run_id), "per_sample": rows},
                              indent=2, default=str)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["idx"])
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
