"""Data-parallel training with torchrun (2 CPU processes, gloo) matches one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from advkit.models import load
from advkit.training import TrainConfig, train

ARGS = ["--epochs", "2", "--train-limit", "1000", "--batch-size", "100", "--no-resume", "--json",
        "--no-card"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(tmp_path):
    single = train(TrainConfig(epochs=2, train_limit=1000, batch_size=100), tmp_path / "one",
                   resume=False, progress=False, log=lambda _: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVKIT_MODEL_DIR": str(tmp_path / "models")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "advkit", "train", *ARGS, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = load(tmp_path / "two" / "model.safetensors")
    # Same data order, same global batches: only the order of float sums differs.
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(parallel.state_dict()[name], value, atol=2e-5, rtol=1e-4)
    assert (tmp_path / "two" / "state.pt").exists()
    assert not any(p.name.startswith("model.safetensors") and p.suffix == ".tmp"
                   for p in (tmp_path / "two").iterdir())
