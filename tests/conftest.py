"""Shared fixtures: a real MNIST CNN trained once and cached between test runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: Where the trained test model is cached (kept between runs; CI trains it once, ~70 s).
TEST_CACHE = Path(os.environ.get("ADVKIT_TEST_CACHE",
                                 Path.home() / ".cache" / "advkit" / "test-models"))


@pytest.fixture(scope="session")
def mnist_model() -> torch.nn.Module:
    """The demo's small_cnn, trained on MNIST (3 epochs, seed 0), in eval mode."""
    from advkit.demo import demo_model

    previous = os.environ.get("ADVKIT_MODEL_DIR")
    os.environ["ADVKIT_MODEL_DIR"] = str(TEST_CACHE)
    try:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        return demo_model(progress=False, log=lambda _: None)
    finally:
        if previous is None:
            del os.environ["ADVKIT_MODEL_DIR"]
        else:
            os.environ["ADVKIT_MODEL_DIR"] = previous


@pytest.fixture(scope="session")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """All 10,000 MNIST test images and labels."""
    from advkit import data

    return data.load("mnist", split="test")
