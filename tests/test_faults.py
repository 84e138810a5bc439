"""Fault injection on the evaluation store: what survives ``kill -9`` at random points, a
damaged or truncated store, read-only media, a foreign database and two processes
resuming one run. Each test states the exact outcome: the same results as an
uninterrupted run, or a clear refusal (exit 2, one ``error:`` line) with nothing written.

Runs are small (40 MNIST images in chunks of 10, a two-stage suite) so that the module
stays well under a minute and a half on two cores.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import TEST_CACHE
from typer.testing import CliRunner

from advkit.cli import app

SUITE_TOML = """
[[stage]]
name = "apgd-ce"
attack = "apgd"
params = { steps = 20 }
[[stage]]
name = "square"
attack = "square"
params = { n_queries = 300 }
"""
N, BATCH = 40, 10


@pytest.fixture(scope="module")
def checkpoint(mnist_model) -> Path:
    path = TEST_CACHE / "small_cnn-mnist.safetensors"
    assert path.exists()
    return path


def _env() -> dict:
    # One thread per process: the same arithmetic in every process, so the same results.
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}


def _evaluate(checkpoint: Path, store: Path) -> list[str]:
    suite = store.parent / "suite.toml"
    suite.write_text(SUITE_TOML)
    return [sys.executable, "-m", "advkit", "evaluate", "--model", str(checkpoint),
            "--suite", str(suite), "--eps", "0.1", "--limit", str(N), "--batch-size",
            str(BATCH), "--check-samples", "10", "--store", str(store), "--device", "cpu",
            "--json"]


def _resume(store: Path) -> list[str]:
    return [sys.executable, "-m", "advkit", "evaluate", "--resume", "1", "--store", str(store),
            "--device", "cpu", "--json"]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _events(store: Path) -> int:
    """Committed chunks and checks of run 1 (0 before the store exists)."""
    try:
        with closing(_read(store)) as db:
            return db.execute("SELECT (SELECT COUNT(*) FROM chunks) + "
                              "(SELECT COUNT(*) FROM checks)").fetchone()[0]
    except sqlite3.OperationalError:   # not created yet
        return 0


def _read(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)


def _kill_after(argv: list[str], store: Path, events: int, extra: float = 0.0) -> None:
    """Start ``argv``, ``kill -9`` it once ``events`` chunks or checks are committed (and
    ``extra`` seconds more), and check it was still running then."""
    victim = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _events(store) < events and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(extra)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()


def _copy_store(src: Path, dst: Path) -> Path:
    """The store with its write-ahead log (a killed run's last chunks live there)."""
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")
    return dst


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "1000"})


def _refused(result, phrase: str) -> None:
    """Exit 2 with one ``error:`` line that says ``phrase``; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert phrase in lines[0], lines[0]


def _export(store: Path) -> str:
    result = _cli("runs", "export", "1", "--store", str(store))
    assert result.exit_code == 0, result.output
    return result.output


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def whole(checkpoint, tmp_path_factory) -> Path:
    """A finished, uninterrupted run: the reference."""
    store = tmp_path_factory.mktemp("whole") / "runs.sqlite"
    _run(_evaluate(checkpoint, store))
    return store


@pytest.fixture(scope="module")
def killed(checkpoint, tmp_path_factory) -> Path:
    """A run killed right after the first chunk of its first attack was committed."""
    store = tmp_path_factory.mktemp("killed") / "runs.sqlite"
    _kill_after(_evaluate(checkpoint, store), store, events=N // BATCH + 1)
    with closing(_read(store)) as db:   # at least one chunk of images no attack has reached
        reached = db.execute("SELECT COUNT(DISTINCT idx) FROM outcomes").fetchone()[0]
    assert reached <= N - BATCH
    return store


def _expected_counts(store: Path) -> dict[str, int]:
    """Broken, robust and unknown images of run 1, straight from the tables: broken if
    misclassified or an attack succeeded; robust if both stages attacked it in vain."""
    with closing(_read(store)) as db:
        broken = db.execute(
            "SELECT COUNT(*) FROM samples s WHERE s.clean_pred != s.label OR EXISTS "
            "(SELECT 1 FROM outcomes o WHERE o.idx = s.idx AND o.success)").fetchone()[0]
        robust = db.execute(
            "SELECT COUNT(*) FROM samples s WHERE s.clean_pred = s.label AND NOT EXISTS "
            "(SELECT 1 FROM outcomes o WHERE o.idx = s.idx AND o.success) AND "
            "(SELECT COUNT(*) FROM outcomes o WHERE o.idx = s.idx) = 2").fetchone()[0]
    return {"broken": broken, "robust": robust, "unknown": N - broken - robust}


# --- kill -9: what an unfinished run says ------------------------------------------------------


def test_runs_lists_a_killed_run_as_unfinished_with_bounds_and_never_reliable(killed):
    counts = _expected_counts(killed)
    listed = _cli("runs", "--store", str(killed), "--json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert row["status"] == "unfinished" and row["reliable"] is False
    assert row["robust_accuracy"] is None and row["unknown"] == counts["unknown"]
    assert row["robust_accuracy_bounds"] == [0.0, counts["unknown"] / N]
    table = _cli("runs", "--store", str(killed))
    assert "unfinished" in table.output and f"{counts['unknown']} unknown" in table.output


def test_report_of_a_killed_run_opens_with_unfinished_and_gives_bounds(killed, tmp_path):
    counts = _expected_counts(killed)
    page = tmp_path / "r.html"
    made = _cli("report", "1", "--store", str(killed), "--out", str(page))
    assert made.exit_code == 0, made.output
    document = json.loads(page.with_suffix(".json").read_text())
    assert document["banner"].startswith("UNFINISHED: run 1 stopped before the end")
    assert f"{counts['unknown']} of {N} images have not yet faced every attack" \
        in document["banner"]
    [summary] = document["summary"]
    assert summary["status"] == "unfinished" and summary["robust_acc"] is None
    assert summary["robust_acc_at_least"] == 0.0
    assert summary["robust_acc_at_most"] == counts["unknown"] / N
    assert summary["unknown"] == counts["unknown"]
    assert summary["reliable"] == "NO (unfinished)"
    assert document["tables"]["Checks"] == [{"check": "-", "status": "not run", "explanation":
                                             "not run yet: the run is unfinished"}]
    html = page.read_text()
    assert 'role="alert" aria-label="warning">UNFINISHED: run 1' in html
    assert "[UNFINISHED]</h1>" in html


def test_export_marks_never_attacked_images_unknown_not_robust(killed):
    counts = _expected_counts(killed)
    rows = list(csv.DictReader(io.StringIO(_export(killed))))
    assert len(rows) == N
    status = [r["status"] for r in rows]
    assert {s: status.count(s) for s in ("broken", "robust", "unknown")} == counts
    assert all(r["robust"] == "" for r in rows if r["status"] == "unknown")
    assert all(r["robust"] == "False" for r in rows if r["status"] == "broken")
    as_json = json.loads(_cli("runs", "export", "1", "--format", "json", "--store",
                              str(killed)).output)
    assert as_json["status"] == "unfinished" and as_json["unknown"] == counts["unknown"]
    assert [r["robust"] for r in as_json["per_sample"]].count(None) == counts["unknown"]


# --- kill -9 at seeded random points, then --resume --------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_resume_after_kill_at_a_random_point_matches_the_uninterrupted_run(
        seed, checkpoint, whole, tmp_path):
    with closing(_read(whole)) as db:
        chunks = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    # The point: after some chunk, or one of the first two checks, and a little later
    # (the last checks come too close together to land between them reliably).
    rng = random.Random(seed)
    events, extra = rng.randint(1, chunks + 2), rng.uniform(0.0, 0.02)
    store = tmp_path / "runs.sqlite"
    _kill_after(_evaluate(checkpoint, store), store, events, extra)
    listed = json.loads(_cli("runs", "--store", str(store), "--json").output)
    assert listed[0]["status"] == "unfinished" and listed[0]["reliable"] is False

    resumed = json.loads(_run(_resume(store)).stdout)
    reference = json.loads(_cli("runs", "--store", str(whole), "--json").output)[0]
    assert resumed["status"] == "done" and resumed["unknown"] == 0
    assert resumed["robust_accuracy"] == reference["robust_accuracy"]
    assert _export(store) == _export(whole)
    assert not Path(f"{store}-run1.lock").exists()   # a finished run leaves no lock file


# --- damaged stores -----------------------------------------------------------------------------


def test_truncated_store_is_refused_as_damaged(whole, tmp_path):
    store = _copy_store(whole, tmp_path / "runs.sqlite")
    os.truncate(store, store.stat().st_size // 2)
    for args in (["runs"], ["runs", "export", "1"], ["report", "1", "--out",
                                                     str(tmp_path / "r.html")]):
        _refused(_cli(*args, "--store", str(store)), "is damaged (database disk image is "
                                                     "malformed)")
    assert not (tmp_path / "r.html").exists()


def test_corrupted_page_is_refused_as_damaged_when_read(whole, tmp_path):
    store = _copy_store(whole, tmp_path / "runs.sqlite")
    with closing(_read(store)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name='outcomes'").fetchone()[0]
    with open(store, "r+b") as f:   # garbage over the b-tree page header of the outcomes table
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 16)
    assert _cli("runs", "--store", str(store)).exit_code == 0   # its pages are intact
    _refused(_cli("runs", "export", "1", "--store", str(store)), "is damaged")
    _refused(_cli("report", "1", "--store", str(store), "--out", str(tmp_path / "r.html")),
             "is damaged")


# --- foreign databases and missing stores -------------------------------------------------------


@pytest.mark.parametrize("schema", [
    "CREATE TABLE users (id INTEGER, name TEXT); INSERT INTO users VALUES (1, 'ada');",
    "CREATE TABLE runs (id INTEGER, name TEXT); INSERT INTO runs VALUES (1, 'not ours');",
], ids=["unrelated-tables", "own-runs-table"])
def test_foreign_database_is_refused_and_left_byte_identical(schema, checkpoint, tmp_path):
    other = tmp_path / "other.sqlite"
    with closing(sqlite3.connect(other)) as db:
        db.executescript(schema)
    before = _digest(other)
    for args in (["runs"], ["runs", "export", "1"],
                 ["report", "1", "--out", str(tmp_path / "r.html")],
                 ["evaluate", "--suite", "fast", "--model", str(checkpoint), "--limit", "10",
                  "--device", "cpu"]):
        _refused(_cli(*args, "--store", str(other)), "is not an advkit result store")
    assert _digest(other) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]  # no -wal, no -shm


def test_resume_with_a_missing_store_is_refused_and_creates_nothing(tmp_path):
    missing = tmp_path / "missing.sqlite"
    _refused(_cli("evaluate", "--resume", "1", "--store", str(missing)), "no store at")
    assert list(tmp_path.iterdir()) == []


# --- read-only media ----------------------------------------------------------------------------


def _read_only(directory: Path) -> list[str]:
    """A command prefix under which ``directory`` is on read-only media. As root, file
    permissions bind nobody, so the directory is bind-mounted read-only in a private mount
    namespace (``unshare -m``) that ends with the command; otherwise ``chmod -w`` does."""
    if os.geteuid() != 0:
        for path in [directory, *directory.iterdir()]:
            path.chmod(path.stat().st_mode & ~0o222)
        return []
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", mount, str(directory)]
    if shutil.which("unshare") is None or subprocess.run(
            [*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("as root, a read-only store needs a read-only mount (unshare -m, "
                    "CAP_SYS_ADMIN), which this machine does not allow")
    return prefix


# Runs CLI commands given as JSON and prints their exit codes and output, after checking
# that the store's directory really cannot be written.
_INVOKE = """
import json, sys
from pathlib import Path
from typer.testing import CliRunner
from advkit.cli import app
try:
    (Path(sys.argv[1]) / "probe").write_text("x")
    writable = True
except OSError:
    writable = False
results = [CliRunner().invoke(app, args, env={"COLUMNS": "1000"})
           for args in json.loads(sys.argv[2])]
print(json.dumps({"writable": writable, "results": [[r.exit_code, r.output] for r in results]}))
"""


def test_reading_commands_work_on_a_read_only_store(whole, killed, tmp_path):
    media, out = tmp_path / "media", tmp_path / "out"
    media.mkdir()
    out.mkdir()
    # A finished store closed cleanly: the file alone, no -wal or -shm beside it; and a
    # killed run's store with its write-ahead log and shared memory.
    shutil.copyfile(whole, media / "done.sqlite")
    _copy_store(killed, media / "killed.sqlite")

    def commands(done: Path, stopped: Path) -> list[list[str]]:
        return [["runs", "--store", str(done), "--json"],
                ["runs", "export", "1", "--store", str(done)],
                ["runs", "--store", str(stopped), "--json"],
                ["runs", "export", "1", "--store", str(stopped)],
                ["report", "1", "--store", str(done), "--out", str(out / "r.html")]]

    expected = [_cli(*args).output for args in commands(whole, killed)[:4]]
    before = {p.name: _digest(p) for p in media.iterdir()}
    ran = subprocess.run([*_read_only(media), sys.executable, "-c", _INVOKE, str(media),
                          json.dumps(commands(media / "done.sqlite", media / "killed.sqlite"))],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout)
    assert answer["writable"] is False
    assert [code for code, _ in answer["results"]] == [0] * 5, answer["results"]
    assert [output for _, output in answer["results"][:4]] == expected
    assert json.loads((out / "r.json").read_text())["summary"][0]["status"] == "done"
    assert {p.name: _digest(p) for p in media.iterdir()} == before


def test_read_only_log_without_shared_memory_is_refused_not_read_without_it(killed,
                                                                            tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    store = _copy_store(killed, media / "runs.sqlite")
    Path(f"{store}-shm").unlink()   # SQLite cannot rebuild it on read-only media
    ran = subprocess.run([*_read_only(media), sys.executable, "-c", _INVOKE, str(media),
                          json.dumps([["runs", "--store", str(store)]])],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    [[code, output]] = json.loads(ran.stdout)["results"]
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert output.startswith(f"error: {store} is on read-only media with a write-ahead log "
                             "(runs.sqlite-wal) but without its runs.sqlite-shm")


def test_evaluate_refuses_a_read_only_store_and_says_reading_still_works(whole, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    store = _copy_store(whole, media / "runs.sqlite")
    ran = subprocess.run([*_read_only(media), sys.executable, "-c", _INVOKE, str(media),
                          json.dumps([["evaluate", "--resume", "1", "--store", str(store),
                                       "--device", "cpu"]])],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    [[code, output]] = json.loads(ran.stdout)["results"]
    assert code == 2 and output.startswith("error: ") and len(output.strip().splitlines()) == 1
    assert "is on read-only media or not writable" in output
    assert "reading commands (runs, report, export) still work" in output


# --- two processes, one run ---------------------------------------------------------------------


def _wait_for_holder(store: Path, pid: int) -> None:
    lock = Path(f"{store}-run1.lock")
    deadline = time.time() + 120
    while time.time() < deadline:
        if lock.exists() and lock.read_text().strip() == str(pid):
            return
        time.sleep(0.01)
    raise AssertionError("the first process never took the run")


def test_second_resume_of_a_run_is_refused_while_the_first_works_on_it(killed, whole,
                                                                       tmp_path):
    store = _copy_store(killed, tmp_path / "runs.sqlite")
    first = subprocess.Popen(_resume(store), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(store, first.pid)
        os.kill(first.pid, signal.SIGSTOP)   # frozen while it holds the run: no race
        second = subprocess.run(_resume(store), env=_env(), capture_output=True, text=True,
                                timeout=120)
        listed = json.loads(_cli("runs", "--store", str(store), "--json").output)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.startswith(f"error: run 1 in {store} is being worked on by another "
                                    f"process (pid {first.pid})")
    assert "Traceback" not in second.stderr
    assert listed[0]["status"] == "running"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert _export(store) == _export(whole)   # the first finished as if alone


# --- advkit train under kill -9 ------------------------------------------------------------

def _train(out: Path) -> list[str]:
    return [sys.executable, "-m", "advkit", "train", "--arch", "small_cnn", "--epochs", "3",
            "--train-limit", "600", "--batch-size", "100", "--no-card", "--out", str(out),
            "--json"]


@pytest.fixture(scope="module")
def trained_whole(tmp_path_factory) -> dict:
    """An uninterrupted `advkit train` (its JSON summary), models installed in a folder of
    this module's."""
    models = tmp_path_factory.mktemp("models")
    out = tmp_path_factory.mktemp("whole-train") / "run"
    done = subprocess.run(_train(out), env={**_env(), "ADVKIT_MODEL_DIR": str(models)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "models": models}


@pytest.mark.parametrize("seed", [3, 4])
def test_train_killed_at_a_random_point_resumes_to_the_uninterrupted_weights(
        trained_whole, tmp_path, seed):
    from advkit import models
    out, installed = tmp_path / "run", tmp_path / "models"
    env = {**_env(), "ADVKIT_MODEL_DIR": str(installed)}
    victim = subprocess.Popen(_train(out), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    # A seeded point after the first epoch's state is on disk, before the run ends.
    deadline = time.time() + 120
    while not (out / "state.pt").exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    if victim.poll() is not None:
        pytest.skip("the run finished before the kill point (a faster machine)")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done = subprocess.run(_train(out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = models.load_checkpoint(trained_whole["out"] / "model.safetensors")
    again = models.load_checkpoint(out / "model.safetensors")
    assert models.fingerprint(again) == models.fingerprint(whole)
    assert models.fingerprint(models.load_checkpoint(installed / "small_cnn-mnist.safetensors")
                              ) == models.fingerprint(whole)
