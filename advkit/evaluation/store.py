"""The result store: one SQLite file per workspace holding every evaluation run.

A run is cut into *chunks* (a stage's slice of samples); a chunk's per-sample
outcomes and its bookkeeping row are written in one transaction, so a run killed
at any instant (``kill -9`` included) leaves only whole chunks behind and a
resumed run repeats none of them. The schema carries a version number; a store
written by a newer advkit is refused rather than misread.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class Store:
    """A SQLite file of evaluation runs (created on first use)."""

    def __init__(self, path: str | Path = DEFAULT_STORE) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"store {self.path} is a directory; pass a file path (runs.sqlite)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path} is not an advkit result store ({err}); "
                             "pass another --store path") from err
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise ValueError(f"{self.path} was written by a newer advkit (schema {row[0]}, this "
                             f"advkit reads {SCHEMA_VERSION}); upgrade advkit")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- runs ---------------------------------------------------------------------------------

    def create_run(self, config: dict, environment: dict) -> int:
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO runs (created, updated, status, config, environment) "
                "VALUES (?, ?, 'running', ?, ?)",
                (_now(), _now(), json.dumps(config), json.dumps(environment)))
            return int(cur.lastrowid)

    def run(self, run_id: int) -> dict:
        row = self._db.execute("SELECT id, created, updated, status, config, environment, summary "
                               "FROM runs WHERE id=?", (int(run_id),)).fetchone()
        if row is None:
            known = [r[0] for r in self._db.execute("SELECT id FROM runs ORDER BY id")]
            raise ValueError(f"no run {run_id} in {self.path} (runs: "
                             f"{', '.join(map(str, known)) or 'none'}); see `advkit runs`")
        return {"id": row[0], "created": row[1], "updated": row[2], "status": row[3],
                "config": json.loads(row[4]), "environment": json.loads(row[5]),
                "summary": json.loads(row[6]) if row[6] else None}

    def runs(self) -> list[dict]:
        ids = [r[0] for r in self._db.execute("SELECT id FROM runs ORDER BY id")]
        return [self.run(i) for i in ids]

    def finish_run(self, run_id: int, summary: dict) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET status='done', updated=?, summary=? WHERE id=?",
                       (_now(), json.dumps(summary), run_id))

    # --- the clean pass -----------------------------------------------------------------------

    def add_clean(self, run_id: int, chunk: ChunkRecord,
                  rows: Iterable[tuple[int, int, int, float]]) -> None:
        """Clean predictions of one chunk: (idx, label, prediction, confidence)."""
        with self._transaction() as db:
            db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
                           [(run_id, *r) for r in rows])
            self._add_chunk(db, run_id, chunk)

    def samples(self, run_id: int) -> list[tuple[int, int, int, float]]:
        return list(self._db.execute(
            "SELECT idx, label, clean_pred, clean_conf FROM samples WHERE run_id=? ORDER BY idx",
            (run_id,)))

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
        return {r[0] for r in self._db.execute(
            "SELECT chunk FROM chunks WHERE run_id=? AND stage=?", (run_id, stage))}

    def chunks(self, run_id: int) -> list[ChunkRecord]:
        return [ChunkRecord(*r) for r in self._db.execute(
            "SELECT stage, chunk, n, forward, backward, seconds FROM chunks WHERE run_id=? "
            "ORDER BY stage, chunk", (run_id,))]

    def outcomes(self, run_id: int, stage: int | None = None) -> list[tuple[int, Outcome]]:
        """(stage, outcome) pairs, ordered by stage and sample."""
        query = ("SELECT stage, idx, success, norm, prediction, passes, passes_exact FROM outcomes "
                 "WHERE run_id=?" + (" AND stage=?" if stage is not None else "") +
                 " ORDER BY stage, idx")
        args = (run_id,) if stage is None else (run_id, stage)
        return [(r[0], Outcome(r[1], bool(r[2]), r[3], r[4], r[5], bool(r[6])))
                for r in self._db.execute(query, args)]

    def images(self, run_id: int) -> list[tuple[int, int, dict, np.ndarray, np.ndarray]]:
        """(stage, idx, info, clean, adversarial) for the stored gallery images."""
        rows = self._db.execute("SELECT stage, idx, shape, info, clean, adversarial FROM images "
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
                for r in self._db.execute("SELECT name, status, message, details FROM checks "
                                          "WHERE run_id=? ORDER BY rowid", (run_id,))]

    # --- export -------------------------------------------------------------------------------

    def per_sample_rows(self, run_id: int) -> list[dict]:
        """One row per sample: label, clean prediction, the stage that broke it (if any),
        with what norm, after how many model passes or queries."""
        config = self.run(run_id)["config"]
        names = ["clean"] + [s["name"] for s in config["suite"]["stages"]]
        minimal = config["suite"]["kind"] == "minimal"
        eps = config["threat"]["eps"]
        rows = {idx: {"idx": idx, "label": label, "clean_pred": pred, "clean_conf": conf,
                      "broken_by": "clean" if pred != label else None,
                      "norm": 0.0 if pred != label else None, "prediction": pred,
                      "passes": 0.0, "passes_exact": True}
                for idx, label, pred, conf in self.samples(run_id)}
        for stage, o in self.outcomes(run_id):
            row = rows[o.idx]
            row["passes"] += o.passes
            row["passes_exact"] = row["passes_exact"] and o.passes_exact
            if not o.success:
                continue
            better = minimal and o.norm is not None and (
                row["norm"] is None or o.norm < row["norm"])
            if row["broken_by"] is None or better:
                row.update(broken_by=names[stage], norm=o.norm, prediction=o.prediction)
        if minimal:  # broken at the run's eps only if the smallest perturbation fits
            for row in rows.values():
                fits = row["norm"] is not None and row["norm"] <= eps * (1 + 1e-9)
                row["robust"] = row["broken_by"] is None or not fits
        else:
            for row in rows.values():
                row["robust"] = row["broken_by"] is None
        return [rows[i] for i in sorted(rows)]

    def export(self, run_id: int, fmt: str) -> str:
        """The run (JSON: config, summary, checks and per-sample rows) or its per-sample table
        (CSV) as text."""
        rows = self.per_sample_rows(run_id)
        if fmt == "json":
            run = self.run(run_id)
            return json.dumps({**run, "checks": self.checks(run_id), "per_sample": rows},
                              indent=2, default=str)
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["idx"])
            writer.writeheader()
            writer.writerows(rows)
            return buffer.getvalue()
        raise ValueError(f"unknown export format {fmt!r}: use json or csv")
