"""Runs that survive: kill -9 and resume, torchrun sharding, `advkit runs`, `advkit report`
rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from browser import run_chromium
from conftest import TEST_CACHE
from typer.testing import CliRunner

import advkit
from advkit.cli import app
from advkit.evaluation import Stage, Suite
from advkit.threat import ThreatModel

SUITE_TOML = """
[[stage]]
name = "apgd-ce"
attack = "apgd"
params = { steps = 30 }
[[stage]]
name = "square"
attack = "square"
params = { n_queries = 300 }
"""


@pytest.fixture(scope="module")
def checkpoint(mnist_model) -> Path:
    path = TEST_CACHE / "small_cnn-mnist.safetensors"
    assert path.exists()
    return path


def _env() -> dict:
    # One thread per process: the same arithmetic in every process, so the same results.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _evaluate_args(checkpoint: Path, store: Path, limit: int, batch: int) -> list:
    """`python -m advkit evaluate` of SUITE_TOML (written beside the store) on the first
    ``limit`` MNIST test images."""
    suite = store.parent / "suite.toml"
    suite.write_text(SUITE_TOML)
    return ["-m", "advkit", "evaluate", "--model", str(checkpoint), "--suite", str(suite),
            "--eps", "0.1", "--limit", str(limit), "--batch-size", str(batch), "--no-checks",
            "--store", str(store), "--device", "cpu", "--json"]


def _run(args: list) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _export(store: Path, run: int = 1) -> str:
    result = CliRunner().invoke(app, ["runs", "export", str(run), "--store", str(store)])
    assert result.exit_code == 0, result.output
    return result.output


def _chunks(store: Path, stage_from: int = 1) -> int:
    try:
        with sqlite3.connect(store, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM chunks WHERE stage >= ?",
                              (stage_from,)).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_kill_9_then_resume_gives_the_uninterrupted_results(checkpoint, tmp_path):
    whole, broken = tmp_path / "whole.sqlite", tmp_path / "broken.sqlite"
    args = dict(checkpoint=checkpoint, limit=300, batch=30)
    _run(_evaluate_args(store=whole, **args))

    victim = subprocess.Popen([sys.executable, *_evaluate_args(store=broken, **args)],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _chunks(broken) < 3 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    with sqlite3.connect(broken) as db:
        before = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        assert db.execute("SELECT status FROM runs WHERE id=1").fetchone()[0] == "running"

    resumed = _run(["-m", "advkit", "evaluate", "--resume", "1", "--store", str(broken),
                    "--device", "cpu", "--json"])
    summary = json.loads(resumed.stdout)
    with sqlite3.connect(broken) as db:
        total = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    with sqlite3.connect(whole) as db:
        assert total == db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    assert summary["chunks_run"] == total - before     # no finished chunk was repeated
    assert _export(broken) == _export(whole)           # same per-sample results


def test_torchrun_two_processes_match_one(checkpoint, tmp_path):
    one, two = tmp_path / "one.sqlite", tmp_path / "two.sqlite"
    args = dict(checkpoint=checkpoint, limit=200, batch=25)
    _run(_evaluate_args(store=one, **args))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(port), *_evaluate_args(store=two, **args)[1:]])
    json.loads(done.stdout)  # one summary (rank 0's), not one per process
    assert _export(two) == _export(one)
    with sqlite3.connect(two) as db:   # one merged run, not one per process
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_runs_lists_and_report_renders_in_chromium(mnist_model, mnist_test, tmp_path):
    x, y = mnist_test
    store = tmp_path / "runs.sqlite"
    suite = Suite("quick", (Stage("apgd-ce", "apgd", {"steps": 10}),
                            Stage("square", "square", {"n_queries": 50})))
    report = advkit.evaluate(mnist_model, x[:80], y[:80], ThreatModel("linf", 0.1), suite,
                             store=store, progress=False, check_samples=20)
    listed = CliRunner().invoke(app, ["runs", "--store", str(store), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["run"] for r in rows] == [report.run_id] and rows[0]["status"] == "done"
    assert rows[0]["robust_accuracy"] == pytest.approx(report.robust_accuracy)

    page = tmp_path / "report.html"
    made = CliRunner().invoke(app, ["report", str(report.run_id), "--store", str(store),
                                    "--out", str(page)])
    assert made.exit_code == 0, made.output
    assert json.loads(page.with_suffix(".json").read_text())["tables"]["Stages"][0]["stage"] \
        == "apgd-ce"
    dom = run_chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    for visible in ("Stages", "Checks", "Per class", "apgd-ce", "square", "gradients",
                    "unbounded", "Robust accuracy versus perturbation budget",
                    "Adversarial examples", report.config["model_fingerprint"],
                    f"{report.robust_accuracy:.1%}"):
        assert visible in text, visible
    shot = tmp_path / "shot.png"
    run_chromium(page, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 20_000


def test_unreliable_run_is_marked_in_the_report_and_the_list(mnist_model, mnist_test, tmp_path):
    from toys import Saturated
    x, y = mnist_test
    store = tmp_path / "runs.sqlite"
    report = advkit.evaluate(Saturated(mnist_model).eval(), x[:40], y[:40],
                             ThreatModel("linf", 0.1), Suite("q", (Stage("a", "apgd",
                                                                         {"steps": 5}),)),
                             store=store, progress=False, check_samples=20)
    assert not report.reliable
    listed = CliRunner().invoke(app, ["runs", "--store", str(store)])
    assert "NO" in listed.output
    page = tmp_path / "r.html"
    assert CliRunner().invoke(app, ["report", "1", "--store", str(store), "--out",
                                    str(page)]).exit_code == 0
    html = page.read_text()
    assert "UNRELIABLE" in html and "check &#39;gradients&#39; failed" in html


def test_cli_errors(tmp_path, checkpoint):
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--suite", "nope", "--model", str(checkpoint),
                                 "--limit", "10"])
    assert result.exit_code == 2 and "unknown suite" in result.output
    result = runner.invoke(app, ["evaluate", "--suite", "fast", "--attack", "pgd"])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["report", "3", "--store", str(tmp_path / "none.sqlite")])
    assert result.exit_code == 2 and "no store" in result.output
    store = tmp_path / "s.sqlite"
    advkit.evaluation.Store(store).close()
    result = runner.invoke(app, ["report", "3", "--store", str(store)])
    assert result.exit_code == 2 and "no run 3" in result.output
    result = runner.invoke(app, ["evaluate", "--resume", "3", "--store", str(store)])
    assert result.exit_code == 2 and "no run 3" in result.output
    # --resume takes the run's own settings: given ones are refused, not silently ignored
    result = runner.invoke(app, ["evaluate", "--resume", "3", "--store", str(store), "--eps",
                                 "0.5", "--limit", "7"], env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "drop --eps, --limit" in result.output


def test_a_model_that_does_not_fit_the_data_leaves_no_run_behind(tmp_path):
    store = tmp_path / "s.sqlite"
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"cannot take these images \(shape \(1, 28, 28\)\)"):
        advkit.evaluate(wrong, x, y, advkit.ThreatModel("linf", 0.1), "fast", store=store,
                        progress=False)
    assert not store.exists()


def test_unwritable_report_and_export_paths_are_an_error_line(tmp_path):
    store = tmp_path / "s.sqlite"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    advkit.evaluate(model, torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]),
                    advkit.ThreatModel("linf", 0.1), "fgsm", store=store, checks=False,
                    progress=False)
    runner = CliRunner()
    for args in (["report", "1", "--out", "/proc/advkit-no-such-dir/r.html"],
                 ["runs", "export", "1", "--out", "/proc/advkit-no-such-dir/r.csv"]):
        result = runner.invoke(app, [*args, "--store", str(store)], env={"COLUMNS": "250"})
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error:") and "Traceback" not in result.output


def test_the_api_does_not_create_a_store_to_resume_from(mnist_model, mnist_test, tmp_path):
    x, y = mnist_test
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(FileNotFoundError, match="no store at"):
        advkit.evaluate(mnist_model, x[:4], y[:4], advkit.ThreatModel("linf", 0.1), "fast",
                        store=missing, resume=1, progress=False)
    assert not missing.exists()
