"""advkit versus torchattacks, Foolbox and ART: the same attacks, model and images, one run.

For every attack configuration the benchmark configures each library that implements
it identically (eps, steps, step size, random start, momentum; for minimal-norm attacks
steps, overshoot, confidence, search settings), runs it over the same MNIST test images
in the same batches, and then judges every output itself: success from a fresh forward
pass of the model (no library's own flags are read), whether the images stay inside
[0, 1] and the eps-ball (the largest norm is reported), and the median and mean
perturbation norm over the images it broke. Speed is the wall time of the whole call,
also expressed as a number of plain forward+backward passes of the same model on the
same batch, measured in the same run.

Run ``python benchmarks/attacks.py --help``; install the peers with
``scripts/install_bench.sh``. Each run rewrites only its own sections of
``benchmarks/RESULTS.md`` (one per model and attack family plus the notes, each between
``<!-- benchmarks/attacks.py NAME: begin/end -->`` markers), so other benchmarks, and
runs of other attacks (``--attacks cw,deepfool``), share the file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing advkit
    sys.path.insert(0, str(REPO))

import advkit  # noqa: E402
from advkit.attacks import (  # noqa: E402
    APGD,
    BIM,
    EAD,
    FAB,
    FGSM,
    JSMA,
    MIFGSM,
    PGD,
    Attack,
    CarliniWagnerL2,
    DeepFool,
    Square,
    UniversalPerturbation,
)
from advkit.evaluation import accuracy, run_attack  # noqa: E402
from advkit.models import checkpoint  # noqa: E402
from advkit.models.loaders import model_dir, trained_path  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402
from advkit.threat import norms as lp_norms  # noqa: E402
from advkit.training import TrainConfig, train  # noqa: E402

LIBRARIES = ("advkit", "advkit-noexit", "advkit-paper", "advkit-paper-full", "torchattacks",
             "foolbox", "art")
LIBRARY_LABELS = {"advkit-noexit": "advkit (early_exit=False)",
                  "advkit-paper": "advkit (paper's search)",
                  "advkit-paper-full": "advkit (paper's search, abort_early=False)"}
PEER_MODULES = {"torchattacks": "torchattacks", "foolbox": "foolbox", "art": "art"}
PEER_DISTRIBUTIONS = {"torchattacks": "torchattacks", "foolbox": "foolbox",
                      "art": "adversarial-robustness-toolbox"}
MODELS = ("small_cnn", "mnist_cnn")
#: The bigger model, trained here for one epoch (Madry et al.'s MNIST architecture).
MNIST_CNN_CONFIG = TrainConfig(arch="mnist_cnn", dataset="mnist", epochs=1, seed=0)
#: Linf and L2 bounds and tolerance of the eps-ball check (float32 arithmetic).
BOX = (0.0, 1.0)
TOL = 1e-5
INF = math.inf
#: A pixel counts as changed (L0) when it moved by more than this (float32 round trips
#: through NumPy are exact; JSMA moves a pixel by theta = 1).
L0_TOL = 1e-6
#: torchattacks' FAB takes an eps and counts only results inside it; this one never binds.
FAB_NO_CAP = 1e3


@dataclass(frozen=True)
class Spec:
    """One attack configuration, applied identically to every library that implements it."""

    family: str           # the --attacks name: fgsm, bim, pgd, pgd_l2, mifgsm, cw, ...
    label: str            # shown in the table
    norm: str             # linf, l2, l1, or l0 (JSMA): the norm the table reports
    eps: float            # the budget; inf for minimal-norm attacks (smallest perturbation)
    steps: int = 1        # iterations (queries for Square, epochs for UAP)
    step_size: float = 0.0
    random_start: bool = False
    decay: float = 0.0
    options: tuple[tuple[str, Any], ...] = ()  # further settings, shown in the config column

    @property
    def minimal(self) -> bool:
        return math.isinf(self.eps)

    @property
    def targeted(self) -> bool:
        return self.family == "jsma"

    def option(self, name: str) -> Any:
        return dict(self.options)[name]

    @property
    def config(self) -> str:
        if self.family == "fgsm":
            return "one step of eps"
        unit = {"square": "queries", "uap": "epochs"}.get(self.family, "steps")
        parts = [f"{self.steps} {unit}"] if self.steps > 1 else []
        if self.step_size:
            parts.append(f"step {self.step_size:.4g}")
        if self.random_start:
            parts.append("random start")
        if self.decay:
            parts.append(f"decay {self.decay:g}")
        parts += [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.options]
        return ", ".join(parts)


def _kurakin_steps(eps: float) -> int:
    return max(1, int(min(eps * 255 + 4, 1.25 * eps * 255)))


#: The order is the order of the run and of the table: the headline PGD rows first, and the
#: 80-step BIM last, so that a run stopped early has already written what matters most.
SPECS: tuple[Spec, ...] = (
    # PGD as in Madry et al.: 40 steps of 0.01 at eps 0.3; 2.5 * eps / steps at eps 0.1.
    Spec("pgd", "PGD", "linf", 0.3, 40, 0.01, random_start=True),
    Spec("pgd", "PGD", "linf", 0.1, 40, 2.5 * 0.1 / 40, random_start=True),
    Spec("pgd_l2", "PGD", "l2", 1.5, 40, 2.5 * 1.5 / 40, random_start=True),
    Spec("fgsm", "FGSM", "linf", 0.3),
    Spec("fgsm", "FGSM", "linf", 0.1),
    Spec("mifgsm", "MI-FGSM", "linf", 0.3, 10, 0.3 / 10, decay=1.0),
    Spec("mifgsm", "MI-FGSM", "linf", 0.1, 10, 0.1 / 10, decay=1.0),
    # BIM as in Kurakin et al. (advkit's defaults): step 1/255, min(255eps + 4, 1.25*255eps) steps.
    Spec("bim", "BIM", "linf", 0.1, _kurakin_steps(0.1), 1 / 255),
    Spec("bim", "BIM", "linf", 0.3, _kurakin_steps(0.3), 1 / 255),
    # Minimal-norm attacks (eps = inf: no cap); the norm columns are what matters.
    # C&W L2 at 100 Adam steps; lr 0.1 is the paper's 0.01 at its 1000 steps, scaled to 100
    # (advkit's default; at 0.01 pixels at 0 or 1 cannot move in 100 steps). How each library
    # chooses c differs (notes); advkit-paper runs the search Foolbox and ART run.
    Spec("cw", "C&W L2", "l2", INF, 100, options=(("lr", 0.1), ("kappa", 0.0))),
    Spec("deepfool", "DeepFool", "l2", INF, 50, options=(("overshoot", 0.02),
                                                         ("candidates", 10))),
    Spec("deepfool", "DeepFool", "linf", INF, 50, options=(("overshoot", 0.02),
                                                           ("candidates", 10))),
    Spec("ead", "EAD", "l1", INF, 100, options=(("beta", 1e-3), ("lr", 0.01), ("rule", "L1"))),
    Spec("fab", "FAB", "linf", INF, 100, options=(
        ("restarts", 1), ("alpha_max", 0.1), ("eta", 1.05), ("beta", 0.9))),
    Spec("jsma", "JSMA", "l0", INF, options=(
        ("theta", 1.0), ("gamma", 0.1), ("targets", "(y + 1) mod 10"))),
    # Budgeted attacks of issue 3.
    Spec("apgd", "APGD-CE", "linf", 0.1, 100, options=(("restarts", 1), ("rho", 0.75))),
    Spec("square", "Square", "linf", 0.3, 1000, options=(("p_init", 0.8), ("loss", "margin"))),
    Spec("uap", "UAP", "linf", 0.2, 5, options=(
        ("delta", 0.2), ("inner", "DeepFool"), ("DeepFool steps", 10), ("overshoot", 0.02),
        ("candidates", 10))),
)
ATTACK_FAMILIES = tuple(dict.fromkeys(s.family for s in SPECS))
#: The libraries that implement each family (an advkit variant only where it means something).
_STEP_ATTACKS = ("advkit", "advkit-noexit", "torchattacks", "foolbox", "art")
FAMILY_LIBRARIES: dict[str, tuple[str, ...]] = {
    "pgd": _STEP_ATTACKS, "pgd_l2": _STEP_ATTACKS, "bim": _STEP_ATTACKS,
    "mifgsm": _STEP_ATTACKS, "fgsm": ("advkit", "torchattacks", "foolbox", "art"),
    "cw": ("advkit", "advkit-paper", "advkit-paper-full", "torchattacks", "foolbox", "art"),
    "deepfool": ("advkit", "torchattacks", "foolbox", "art"),
    "ead": ("advkit", "advkit-paper", "torchattacks", "foolbox", "art"),
    "fab": ("advkit", "torchattacks"),
    "jsma": ("advkit", "torchattacks", "art"),
    "apgd": ("advkit", "torchattacks", "art"),
    "square": ("advkit", "torchattacks", "art"),
    "uap": ("advkit", "art"),
}
#: EAD's search over c as the paper runs it (every peer; advkit's "paper's search" row).
EAD_SEARCH_STEPS, EAD_INITIAL_C = 9, 1e-3
#: (family, library) pairs left out unless --include-slow: ART's C&W (gradient descent with a
#: line search of up to 10 extra forward passes per step) took 911 s for 20 images at
#: 100 steps x 9 search steps (load average 6-8), about 12 hours for the default 1,000.
SLOW = {("cw", "art")}
#: Families whose cost is one gradient per step (the overhead table applies to them).
GRADIENT_STEP_FAMILIES = ("pgd", "pgd_l2", "bim", "mifgsm", "apgd")


def implements(library: str, spec: Spec, include_slow: bool = False) -> bool:
    """Whether ``library`` has this attack (torchattacks' and ART's DeepFool are L2 only)."""
    if library not in FAMILY_LIBRARIES[spec.family]:
        return False
    if (spec.family, library) in SLOW and not include_slow:
        return False
    return not (spec.family == "deepfool" and spec.norm != "l2"
                and library in ("torchattacks", "art"))


def spec_targets(spec: Spec, y: Tensor) -> Tensor | None:
    """The target classes of a targeted configuration (JSMA: the next class), else None."""
    return (y + 1) % 10 if spec.targeted else None
#: Differences in how the libraries implement the same configuration (kept, and stated).
DIFFERENCES = (
    "**Early exit.** advkit drops a sample from the working batch as soon as it is "
    "misclassified (default `early_exit=True`) and keeps that point; torchattacks, Foolbox and "
    "ART always run every step on every sample and return the last iterate, which may have "
    "drifted back to the right class. The `advkit (early_exit=False)` rows do the same work as "
    "the peers and are the fair speed comparison.",
    "**Loss reduction.** torchattacks and ART use the batch-mean cross-entropy, advkit and "
    "Foolbox the sum; the sign (Linf) and the normalised gradient (L2, the L1-normalised "
    "momentum) do not depend on that scale.",
    "**Gradients.** ART's `PyTorchClassifier.loss_gradient` calls `loss.backward()`, which also "
    "computes and accumulates the parameter gradients; advkit and torchattacks ask autograd for "
    "the input gradient only.",
    "**MI-FGSM momentum.** advkit, torchattacks and ART accumulate the L1-normalised gradient "
    "(torchattacks divides by the mean |g| instead of the sum: a constant factor, same sign). "
    "Foolbox 3.3.4's `LinfMomentumIterativeFastGradientMethod` accumulates `sign(g)` (the "
    "gradient is normalised by the Linf steepest direction before the momentum optimizer), "
    "which is not the update of Dong et al.; it cannot be configured otherwise.",
    "**L2 random start.** advkit, Foolbox and ART draw uniformly from the L2 ball; torchattacks "
    "draws a uniform direction with a radius uniform in [0, eps], so its starts sit nearer "
    "the clean image. **L2 projection.** advkit projects exactly onto ball ∩ box; the peers "
    "rescale into the ball and clip (Foolbox, torchattacks) or clip and rescale (ART).",
    "**Extra passes.** ART's PGD family runs one more forward pass over all images at the end "
    "of `generate` to log its own success rate; Foolbox runs one to report `is_adv`; advkit "
    "runs the success pass, plus a separate clean forward pass only for attacks that read the "
    "clean logits (FGSM, BIM, MI-FGSM and PGD run their entry checks on the logits of their "
    "first gradient pass instead); torchattacks none. All of them are inside the measured time.",
    "**Random numbers.** Each library draws its random starts from its own generator (advkit "
    "its seeded `torch.Generator`, torchattacks and Foolbox the global torch RNG, ART NumPy's); "
    "all are seeded with 0 before each run, but the starts differ between libraries.",
)
#: The same for the attacks of issue 3 (minimal-norm ones first): what each library runs.
ISSUE3_DIFFERENCES = (
    "**C&W L2: how c is chosen.** Every library runs 100 Adam steps per value of c at learning "
    "rate 0.1 (the paper's 0.01 at its 1000 steps, scaled to 100; the peers' default 0.01 "
    "cannot move pixels at 0 or 1 in 100 steps) with kappa 0. advkit (default) starts each "
    "image at c = 4 (m + kappa) / ||grad m||^2, twice the c at which the model linearised at x "
    "puts the minimiser on the boundary (one extra gradient pass), and stops at the first "
    "success (`search_tolerance=1`); an image whose run fails gets c x 10, up to 9 runs. "
    "`advkit (paper's search)` and Foolbox run the paper's search: c from 1e-3, x 10 until a "
    "success, then bisection, all 9 search steps. torchattacks has no search: one run at its "
    "default c = 1. ART (left out unless `--include-slow`) does gradient descent with a line "
    "search on the step size (up to 5 halvings and 5 doublings, each a forward pass) instead "
    "of Adam, doubling c until a success.",
    "**C&W L2: early abort and the box.** The paper's abort (loss not below 0.9999 of its "
    "value a tenth of the steps earlier) is per image in advkit (a run that has already "
    "succeeded stops only after three such checks in a row), on the batch's summed loss in "
    "Foolbox; torchattacks returns as soon as the batch's summed loss rose at a check. "
    "torchattacks maps x to `atanh(2x - 1)` without the reference code's 0.999999 factor, so "
    "pixels at exactly 0 or 1 (most of an MNIST digit) start at +-inf and never move. "
    "Foolbox returns an all-zero image where it found nothing; the benchmark counts what the "
    "model predicts for it (usually a success with a large norm) and says how many there are.",
    "**DeepFool.** All run 50 steps with overshoot 0.02 over the 10 classes. advkit and "
    "Foolbox apply the overshoot to the sum of the steps from x and clip that into the box; "
    "torchattacks steps from the clipped iterate, `x_{i+1} = clip(x_i + 1.02 r_i)`, so where "
    "the box clips a step the iterate creeps towards the boundary and often has not crossed "
    "it after 50 steps; it also loops over images one at a time with a full Jacobian. ART's "
    "DeepFool (`epsilon` = overshoot) is L2 only, as is torchattacks'.",
    "**EAD.** All use the L1 decision rule, beta 1e-3, 100 (F)ISTA iterations per run at "
    "learning rate 0.01 with the paper's square-root decay. The peers and `advkit (paper's "
    "search)` search c as the paper does: 9 runs from c = 1e-3 (x 10 until a success, then "
    "bisection). advkit (default) starts each image at the c read off the model linearised "
    "at x (as its C&W L2) and stops at its first success; an image whose run fails gets c x "
    "10, up to 9 runs. advkit's early abort is per image (as for C&W: three stalled checks "
    "end a run that has succeeded). Once an iterate is adversarial the attack term is flat; "
    "advkit (under the L1 rule) and ART then take the shrinkage step alone (ART zeroes the "
    "whole gradient of such an iterate), torchattacks and Foolbox also take the L2 term's "
    "pull towards x, which shortens every coordinate and makes the perturbation less "
    "sparse. advkit's abort then watches the run's smallest L1 rather than its loss.",
    "**FAB.** Untargeted Linf, 100 steps, one run from x, alpha_max 0.1, eta 1.05, beta 0.9. "
    "torchattacks' FAB (AutoAttack's code) needs an eps and keeps only results within it: "
    f"eps = {FAB_NO_CAP:g}, which never binds.",
    "**JSMA.** Targeted at (y + 1) mod 10 (torchattacks' default target in its untargeted "
    "mode; ART's JSMA is always targeted), theta 1, gamma 0.1. *success* means classified as "
    "the target; the norm is L0, the number of pixels the benchmark finds changed by more "
    f"than {L0_TOL:g}. torchattacks computes one image at a time.",
    "**APGD-CE.** Linf eps 0.1, 100 steps, one run from a random start, rho 0.75, first step "
    "2 eps (ART's `eps_step`); ART's loss is its `cross_entropy` option.",
    "**Square.** Linf eps 0.3, a budget of 1,000 queries per image, p_init 0.8, margin loss; "
    "advkit stops querying an image as soon as it is broken.",
    "**UAP.** One Linf perturbation of eps 0.2 fitted on the benchmark's own images (the "
    "success rate is on the same images), at most 5 passes over them, stop at a fooling "
    "rate of 1 - delta = 0.8, DeepFool as the inner attack (10 steps, overshoot 0.02, 10 "
    "candidates). advkit updates v once per 32 images (`batch_size=32`); ART runs the "
    "paper's loop, one image at a time. advkit's default inner step (`inner=\"gradient\"`) "
    "is not what ART runs, so it is not used here.",
)


@dataclass
class Row:
    model: str
    library: str
    spec: Spec
    seconds: float
    n: int
    success_rate: float = math.nan
    median_norm: float = math.nan
    mean_norm: float = math.nan
    max_norm: float = math.nan
    in_box: bool = False
    in_ball: bool = False
    finite: bool = True
    fb_equiv: float = math.nan
    note: str = ""


@dataclass
class ModelRun:
    name: str
    params: int
    clean_accuracy: float
    # Per attack family: seconds of one forward+backward pass on batch_size images, one value
    # per timed loop; advkit's overhead rows; configurations done and planned.
    fb_seconds: dict[str, list[float]] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    overhead: dict[str, list[tuple[str, float, float, float]]] = field(default_factory=dict)
    specs_done: dict[str, int] = field(default_factory=dict)
    specs_total: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Models and data


def load_model(name: str, device: torch.device, log: Callable[[str], None]) -> nn.Module:
    """The demo's small_cnn, or the Madry MNIST CNN trained for one epoch (both cached)."""
    if name == "small_cnn":
        from advkit.demo import DEMO_CONFIG, demo_model
        path = trained_path("small_cnn-mnist")
        if _trained_with(path, DEMO_CONFIG):
            log(f"using the cached demo model {path}")
            model = checkpoint.load_checkpoint(path)
        else:
            model = demo_model(progress=False, log=log)
    else:
        path = model_dir() / "bench" / "mnist_cnn-mnist-1epoch.safetensors"
        if _trained_with(path, MNIST_CNN_CONFIG):
            log(f"using the cached model {path}")
            model = checkpoint.load_checkpoint(path)
        else:
            log("training mnist_cnn on MNIST for one epoch (a few minutes on 2 CPU cores)")
            result = train(MNIST_CNN_CONFIG, path.parent / "runs" / "mnist_cnn-1epoch",
                           resume=False, progress=False, log=log)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(result.checkpoint.read_bytes())
            model = result.model
    return model.to(device).eval()


def _trained_with(path: Path, config: TrainConfig) -> bool:
    """Whether the checkpoint at ``path`` was trained with ``config`` (standard recipe).

    Compared as TrainConfig values, so a checkpoint recorded before TrainConfig gained a
    field (which then takes its default) still matches.
    """
    if not path.is_file():
        return False
    try:
        recorded = dict(checkpoint.read_metadata(path).get("config") or {})
        if recorded.pop("recipe_params", None) not in (None, {}):
            return False
        return TrainConfig(**recorded) == config
    except (TypeError, ValueError):
        return False


def forward_backward_seconds(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, *,
                             repeats: int = 7, loop: int = 5) -> list[float]:
    """Seconds of one forward+backward pass (gradient w.r.t. the input) on batch ``x``.

    A warm-up, then ``repeats`` timed loops of ``loop`` passes each; one value per loop.
    """
    def once() -> None:
        xg = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
        # Reading one value keeps the work honest on asynchronous devices.
        grad.view(-1)[0].item()

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(loop):
            once()
        _sync(device)
        times.append((time.perf_counter() - t0) / loop)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# One runner per library: (model, spec, device, batch_size) -> attack(xb, yb) -> x_adv on CPU

Runner = Callable[[Tensor, Tensor], Tensor]


def advkit_runner(model: nn.Module, spec: Spec, device: torch.device, batch_size: int,
                  variant: str = "") -> Runner:
    """advkit's attack for ``spec``; ``variant`` "noexit" (early_exit=False), "paper" or
    "paper-full" (C&W: the paper's search; -full without early abort)."""
    threat = ThreatModel({"l0": "l2"}.get(spec.norm, spec.norm), spec.eps)  # JSMA: no L0 norm
    early_exit = variant != "noexit"
    o = dict(spec.options)
    attack: Attack
    if spec.family == "fgsm":
        attack = FGSM(threat)
    elif spec.family == "bim":
        attack = BIM(threat, steps=spec.steps, step_size=spec.step_size, early_exit=early_exit)
    elif spec.family in ("pgd", "pgd_l2"):
        attack = PGD(threat, steps=spec.steps, step_size=spec.step_size,
                     random_start=spec.random_start, early_exit=early_exit, seed=0)
    elif spec.family == "mifgsm":
        attack = MIFGSM(threat, steps=spec.steps, decay=spec.decay, step_size=spec.step_size,
                        early_exit=early_exit)
    elif spec.family == "cw":
        # advkit's default: a first c per sample from the linearised model, one run unless it
        # fails; "paper": the paper's search, c from 1e-3 and all 9 search steps, as Foolbox.
        # "paper-full": the same search, every run all its steps (Foolbox aborts on the whole
        # batch's loss, so its images keep optimising after advkit's per-image abort).
        search = ({"initial_const": 1e-3, "search_tolerance": 0.0}
                  if variant.startswith("paper") else {})
        attack = CarliniWagnerL2(threat, steps=spec.steps, search_steps=9,
                                 learning_rate=o["lr"], confidence=o["kappa"],
                                 abort_early=variant != "paper-full", **search)
    elif spec.family == "deepfool":
        attack = DeepFool(threat, steps=spec.steps, overshoot=o["overshoot"],
                          top_k=o["candidates"])
    elif spec.family == "ead":
        # advkit's default: a first c per sample from the linearised model, one run unless
        # it fails; "paper": the paper's search from c = 1e-3, all 9 steps, as the peers.
        search = ({"initial_const": EAD_INITIAL_C, "search_tolerance": 0.0}
                  if variant == "paper" else {"initial_const": None})
        attack = EAD(threat, steps=spec.steps, search_steps=EAD_SEARCH_STEPS, beta=o["beta"],
                     learning_rate=o["lr"], decision_rule=o["rule"].lower(), **search)
    elif spec.family == "fab":
        attack = FAB(threat, steps=spec.steps, restarts=o["restarts"], alpha_max=o["alpha_max"],
                     eta=o["eta"], beta=o["beta"], seed=0)
    elif spec.family == "jsma":
        attack = JSMA(threat, theta=o["theta"], gamma=o["gamma"])
    elif spec.family == "apgd":
        attack = APGD(threat, steps=spec.steps, restarts=o["restarts"], loss="ce", rho=o["rho"],
                      seed=0)
    elif spec.family == "square":
        attack = Square(threat, n_queries=spec.steps, p_init=o["p_init"], loss=o["loss"], seed=0)
    elif spec.family == "uap":
        uap = UniversalPerturbation(threat, delta=o["delta"], max_epochs=spec.steps,
                                    inner="deepfool", deepfool_steps=o["DeepFool steps"],
                                    overshoot=o["overshoot"], candidates=o["candidates"],
                                    batch_size=32, seed=0)

        def fit_and_apply(x: Tensor, y: Tensor) -> Tensor:
            # One perturbation for the whole set: fitted on all images at once, never per batch.
            return uap(model, x.to(device), y.to(device)).x_adv.cpu()
        return fit_and_apply
    else:
        raise ValueError(f"advkit has no runner for {spec.family!r}")

    def run(x: Tensor, y: Tensor) -> Tensor:
        result = run_attack(attack, model, x, y, targets=spec_targets(spec, y),
                            batch_size=batch_size, progress=False, device=device)
        return result.x_adv
    return run


def torchattacks_runner(model: nn.Module, spec: Spec, device: torch.device,
                        batch_size: int) -> Runner:
    import torchattacks as ta
    o = dict(spec.options)
    if spec.family == "fgsm":
        attack = ta.FGSM(model, eps=spec.eps)
    elif spec.family == "bim":
        attack = ta.BIM(model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps)
    elif spec.family == "pgd":
        attack = ta.PGD(model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps,
                        random_start=spec.random_start)
    elif spec.family == "pgd_l2":
        attack = ta.PGDL2(model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps,
                          random_start=spec.random_start)
    elif spec.family == "mifgsm":
        attack = ta.MIFGSM(model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps,
                           decay=spec.decay)
    elif spec.family == "cw":
        # No search over c: one run at its default c = 1.
        attack = ta.CW(model, c=1, kappa=o["kappa"], steps=spec.steps, lr=o["lr"])
    elif spec.family == "deepfool":
        attack = ta.DeepFool(model, steps=spec.steps, overshoot=o["overshoot"])
    elif spec.family == "ead":
        attack = ta.EADL1(model, kappa=0, lr=o["lr"], binary_search_steps=EAD_SEARCH_STEPS,
                          max_iterations=spec.steps, abort_early=True,
                          initial_const=EAD_INITIAL_C, beta=o["beta"])
    elif spec.family == "fab":
        attack = ta.FAB(model, norm="Linf", eps=FAB_NO_CAP, steps=spec.steps,
                        n_restarts=o["restarts"], alpha_max=o["alpha_max"], eta=o["eta"],
                        beta=o["beta"], seed=0, n_classes=10)
    elif spec.family == "jsma":
        # Its untargeted mode attacks the target (y + 1) mod 10, the benchmark's targets.
        attack = ta.JSMA(model, theta=o["theta"], gamma=o["gamma"])
    elif spec.family == "apgd":
        attack = ta.APGD(model, norm="Linf", eps=spec.eps, steps=spec.steps,
                         n_restarts=o["restarts"], loss="ce", rho=o["rho"], seed=0)
    elif spec.family == "square":
        attack = ta.Square(model, norm="Linf", eps=spec.eps, n_queries=spec.steps, n_restarts=1,
                           p_init=o["p_init"], loss=o["loss"], seed=0)
    else:
        raise ValueError(f"torchattacks has no runner for {spec.family!r}")
    return _batched(lambda xb, yb: attack(xb, yb), device, batch_size)


def foolbox_runner(model: nn.Module, spec: Spec, device: torch.device, batch_size: int) -> Runner:
    import foolbox as fb
    fmodel = fb.PyTorchModel(model, bounds=BOX, device=device)
    attacks = fb.attacks
    o = dict(spec.options)
    if spec.family == "fgsm":
        attack = attacks.LinfFastGradientAttack(random_start=False)
    elif spec.family == "bim":
        attack = attacks.LinfBasicIterativeAttack(abs_stepsize=spec.step_size, steps=spec.steps,
                                                  random_start=False)
    elif spec.family == "pgd":
        attack = attacks.LinfPGD(abs_stepsize=spec.step_size, steps=spec.steps,
                                 random_start=spec.random_start)
    elif spec.family == "pgd_l2":
        attack = attacks.L2PGD(abs_stepsize=spec.step_size, steps=spec.steps,
                               random_start=spec.random_start)
    elif spec.family == "mifgsm":
        attack = attacks.LinfMomentumIterativeFastGradientMethod(
            momentum=spec.decay, abs_stepsize=spec.step_size, steps=spec.steps,
            random_start=False)
    elif spec.family == "cw":
        attack = attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=spec.steps,
                                               stepsize=o["lr"], confidence=o["kappa"],
                                               initial_const=1e-3, abort_early=True)
    elif spec.family == "deepfool":
        cls = attacks.L2DeepFoolAttack if spec.norm == "l2" else attacks.LinfDeepFoolAttack
        attack = cls(steps=spec.steps, candidates=o["candidates"], overshoot=o["overshoot"],
                     loss="logits")
    elif spec.family == "ead":
        attack = attacks.EADAttack(binary_search_steps=EAD_SEARCH_STEPS, steps=spec.steps,
                                   initial_stepsize=o["lr"], confidence=0.0,
                                   initial_const=EAD_INITIAL_C, regularization=o["beta"],
                                   decision_rule=o["rule"], abort_early=True)
    else:
        raise ValueError(f"Foolbox has no runner for {spec.family!r}")
    # Minimal-norm attacks run without epsilons (the smallest example found, unclipped).
    epsilons = None if spec.minimal else spec.eps

    def one(xb: Tensor, yb: Tensor) -> Tensor:
        _raw, clipped, _is_adv = attack(fmodel, xb, yb, epsilons=epsilons)
        return clipped
    return _batched(one, device, batch_size)


def art_runner(model: nn.Module, spec: Spec, device: torch.device, batch_size: int) -> Runner:
    from art.attacks import evasion
    from art.estimators.classification import PyTorchClassifier
    classifier = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
        clip_values=BOX, device_type="gpu" if device.type == "cuda" else "cpu")
    norm = {"linf": np.inf, "l2": 2, "l1": 1}.get(spec.norm)
    o = dict(spec.options)
    common = {"batch_size": batch_size, "verbose": False}
    if spec.family == "fgsm":
        attack = evasion.FastGradientMethod(classifier, norm=norm, eps=spec.eps,
                                            eps_step=spec.eps, num_random_init=0,
                                            batch_size=batch_size)
    elif spec.family == "bim":
        attack = evasion.BasicIterativeMethod(classifier, eps=spec.eps, eps_step=spec.step_size,
                                              max_iter=spec.steps, **common)
    elif spec.family in ("pgd", "pgd_l2"):
        attack = evasion.ProjectedGradientDescent(
            classifier, norm=norm, eps=spec.eps, eps_step=spec.step_size, max_iter=spec.steps,
            num_random_init=1 if spec.random_start else 0, **common)
    elif spec.family == "mifgsm":
        attack = evasion.MomentumIterativeMethod(classifier, norm=norm, eps=spec.eps,
                                                 eps_step=spec.step_size, decay=spec.decay,
                                                 max_iter=spec.steps, **common)
    elif spec.family == "cw":
        attack = evasion.CarliniL2Method(classifier, confidence=o["kappa"],
                                         learning_rate=o["lr"], binary_search_steps=9,
                                         max_iter=spec.steps, initial_const=1e-3, **common)
    elif spec.family == "deepfool":
        attack = evasion.DeepFool(classifier, max_iter=spec.steps, epsilon=o["overshoot"],
                                  nb_grads=o["candidates"], **common)
    elif spec.family == "ead":
        attack = evasion.ElasticNet(classifier, confidence=0.0, learning_rate=o["lr"],
                                    binary_search_steps=EAD_SEARCH_STEPS, max_iter=spec.steps,
                                    beta=o["beta"], initial_const=EAD_INITIAL_C,
                                    decision_rule=o["rule"], **common)
    elif spec.family == "jsma":
        attack = evasion.SaliencyMapMethod(classifier, theta=o["theta"], gamma=o["gamma"],
                                           **common)
    elif spec.family == "apgd":
        # ART's eps_step is APGD's first step size, 2 eps in the paper (advkit, torchattacks).
        attack = evasion.AutoProjectedGradientDescent(
            classifier, norm=norm, eps=spec.eps, eps_step=2 * spec.eps, max_iter=spec.steps,
            nb_random_init=o["restarts"], loss_type="cross_entropy", **common)
    elif spec.family == "square":
        attack = evasion.SquareAttack(classifier, norm=norm, eps=spec.eps, max_iter=spec.steps,
                                      p_init=o["p_init"], nb_restarts=1, **common)
    elif spec.family == "uap":
        attack = evasion.UniversalPerturbation(
            classifier, attacker="deepfool",
            attacker_params={"max_iter": o["DeepFool steps"], "epsilon": o["overshoot"],
                             "nb_grads": o["candidates"], "verbose": False},
            delta=o["delta"], max_iter=spec.steps, eps=spec.eps, norm=norm, batch_size=32,
            verbose=False)
    else:
        raise ValueError(f"ART has no runner for {spec.family!r}")

    def run(x: Tensor, y: Tensor) -> Tensor:
        # ART batches internally; it takes and returns NumPy arrays (part of its measured cost).
        # JSMA is always targeted in ART: its y are the target classes.
        targets = spec_targets(spec, y)
        labels = targets if targets is not None else y
        adv = attack.generate(x=x.numpy(), y=labels.numpy())
        return torch.from_numpy(np.asarray(adv, dtype=np.float32))
    return run


def _batched(one: Callable[[Tensor, Tensor], Tensor], device: torch.device,
             batch_size: int) -> Runner:
    def run(x: Tensor, y: Tensor) -> Tensor:
        parts = []
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            parts.append(one(xb, yb).detach().cpu())
        return torch.cat(parts)
    return run


def make_runner(library: str, model: nn.Module, spec: Spec, device: torch.device,
                batch_size: int) -> Runner:
    if library.startswith("advkit"):
        return advkit_runner(model, spec, device, batch_size, library.partition("-")[2])
    return {"torchattacks": torchattacks_runner, "foolbox": foolbox_runner,
            "art": art_runner}[library](model, spec, device, batch_size)


# ---------------------------------------------------------------------------------------------
# Judging the outputs


def judge(model: nn.Module, x: Tensor, y: Tensor, clean_pred: Tensor, x_adv: Tensor,
          spec: Spec, device: torch.device, batch_size: int) -> dict:
    """Success from a fresh forward pass; box and ball checks; norms over broken images."""
    x_adv = x_adv.detach().float().cpu()
    finite = bool(torch.isfinite(x_adv).all())
    preds = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            preds.append(model(x_adv[i:i + batch_size].to(device)).argmax(1).cpu())
    pred = torch.cat(preds)
    targets = spec_targets(spec, y)
    success = pred == targets if targets is not None else pred != y
    if spec.norm == "l0":
        norms = ((x_adv - x).abs() > L0_TOL).flatten(1).sum(1).float()
    else:
        norms = lp_norms(x_adv - x, spec.norm)
    # The perturbation of an image the model got wrong to begin with says nothing about the
    # attack; norms are over images correctly classified before and successful after.
    broken = norms[success & (clean_pred == y)]
    # Foolbox's minimisation attacks return all-zero images where they found nothing; the
    # model may well misclassify those, so they count as returned, and are reported.
    zeros = int(((x_adv.flatten(1) == 0).all(1) & (x.flatten(1) != 0).any(1)).sum())
    return {
        "note": f"{zeros} of the returned images are all zeros" if zeros else "",
        "success_rate": success.float().mean().item(),
        "median_norm": broken.median().item() if broken.numel() else math.nan,
        "mean_norm": broken.mean().item() if broken.numel() else math.nan,
        "max_norm": norms.max().item(),
        "in_box": finite and x_adv.min().item() >= BOX[0] and x_adv.max().item() <= BOX[1],
        "in_ball": finite and norms.max().item() <= spec.eps * (1 + TOL) + TOL,
        "finite": finite,
    }


# ---------------------------------------------------------------------------------------------
# The run


def available_libraries(wanted: list[str], log: Callable[[str], None]) -> tuple[list[str],
                                                                                 list[str]]:
    """The libraries that import; a note for each one skipped."""
    present, notes = [], []
    for lib in wanted:
        module = PEER_MODULES.get(lib)
        if module is None:
            present.append(lib)
            continue
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any import failure means "skip this peer"
            notes.append(f"{lib} skipped: `import {module}` failed ({type(err).__name__}: "
                         f"{err}); install it with `scripts/install_bench.sh`.")
            log(notes[-1])
            continue
        present.append(lib)
    return present, notes


def run_model(name: str, args: argparse.Namespace, libraries: list[str], specs: list[Spec],
              device: torch.device, log: Callable[[str], None],
              done: Callable[[ModelRun, str], None]) -> ModelRun:
    """Run every spec with every library on model ``name``; ``done(run, family)`` after each."""
    model = load_model(name, device, log)
    for p in model.parameters():
        p.requires_grad_(True)  # as a user's model would be; ART needs it, advkit does not
    x, y = advkit.data.load("mnist", split="test", limit=args.limit)
    clean = accuracy(model, x, y, device=device)
    with torch.no_grad():
        clean_pred = torch.cat([model(x[i:i + args.batch_size].to(device)).argmax(1).cpu()
                                for i in range(0, x.shape[0], args.batch_size)])
    run = ModelRun(name, sum(p.numel() for p in model.parameters()), clean)
    for spec in specs:
        run.specs_total[spec.family] = run.specs_total.get(spec.family, 0) + 1
    log(f"[{name}] clean accuracy {clean:.2%} on {x.shape[0]} images")
    xb, yb = x[:args.batch_size].to(device), y[:args.batch_size].to(device)
    n_batches = math.ceil(x.shape[0] / args.batch_size)
    warm_x, warm_y = x[:args.warmup], y[:args.warmup]
    for spec in specs:
        libs = [lib for lib in libraries if implements(lib, spec, args.include_slow)]
        runners = {lib: make_runner(lib, model, spec, device, args.batch_size) for lib in libs}
        times: dict[str, list[float]] = {lib: [] for lib in libs}
        outputs: dict[str, Tensor] = {}
        fb_spec: list[float] = []
        # The reference pass is timed at the kind of point the attack visits: a random start
        # of its ball when it has one (max pooling on CPU is slower on noisy inputs than on
        # clean digits), else the clean images.
        fb_x = xb
        if spec.random_start:
            fb_x = ThreatModel(spec.norm, spec.eps).random_start(
                xb, torch.Generator(device=xb.device).manual_seed(0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for runner in runners.values():
                runner(warm_x, warm_y)  # warm-up: lazy imports, allocator, thread pools
            # Repeats are interleaved (every library, then again), and the forward+backward
            # reference is timed beside them, so load from other processes hits all alike.
            for _ in range(args.repeats):
                fb_spec += forward_backward_seconds(model, fb_x, yb, device, repeats=3)
                for lib, runner in runners.items():
                    torch.manual_seed(0)
                    np.random.seed(0)
                    _sync(device)
                    t0 = time.perf_counter()
                    x_adv = runner(x, y)
                    _sync(device)
                    times[lib].append(time.perf_counter() - t0)
                    outputs.setdefault(lib, x_adv)
        run.fb_seconds.setdefault(spec.family, []).extend(fb_spec)
        # Fastest against fastest: load from other processes only ever adds time.
        fb = min(fb_spec)
        for lib in libs:
            verdict = judge(model, x, y, clean_pred, outputs[lib], spec, device, args.batch_size)
            row = Row(name, lib, spec, min(times[lib]), x.shape[0], **verdict)
            row.fb_equiv = row.seconds / (n_batches * fb)
            run.rows.append(row)
            log(f"[{name}] {lib:14s} {spec.label:8s} {spec.norm:4s} eps={spec.eps:<5g} "
                f"{' '.join(f'{t:6.2f}' for t in times[lib])} s  success "
                f"{row.success_rate:6.1%}  median norm {row.median_norm:.4f}  mean norm "
                f"{row.mean_norm:.5f}  max norm "
                f"{row.max_norm:.4f}  {'ok' if row.in_box and row.in_ball else 'OUT OF BOUNDS'}")
            # torchattacks (no entry checks, no success pass) shows the measure's own floor.
            if (lib.startswith("advkit") or lib == "torchattacks") \
                    and spec.family in GRADIENT_STEP_FAMILIES:
                run.overhead.setdefault(spec.family, []).append((
                    f"{LIBRARY_LABELS.get(lib, lib)} {spec.label} {spec.norm} eps={spec.eps:g}",
                    row.seconds, fb, row.seconds / (spec.steps * n_batches * fb)))
        run.specs_done[spec.family] = run.specs_done.get(spec.family, 0) + 1
        done(run, spec.family)
    return run


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f"{value:.{digits}f}"


def _rate(images_per_second: float) -> str:
    return (f"{images_per_second:,.0f}" if images_per_second >= 10
            else f"{images_per_second:.2g}")


def environment(args: argparse.Namespace, libraries: list[str], device: torch.device,
                started: float) -> list[str]:
    """The bullet list that says how, where and with what a section was measured."""
    versions = [f"torch {torch.__version__}", f"advkit {advkit.__version__}",
                f"numpy {np.__version__}"]
    for lib in libraries:
        dist = PEER_DISTRIBUTIONS.get(lib)
        if dist:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    if "foolbox" in libraries:
        versions.append(f"eagerpy {importlib.metadata.version('eagerpy')}")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return [
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {_device_name(device)}; torch threads {torch.get_num_threads()}",
        f"- python {platform.python_version()} on {platform.platform()}",
        f"- versions: {', '.join(versions)}; advkit source {args.source}",
        f"- data: MNIST test[:{args.limit}] (`advkit.data.load('mnist', split='test', "
        f"limit={args.limit})`), batch size {args.batch_size} for every library; "
        f"{args.repeats} timed run(s) per library after one warm-up call on {args.warmup} "
        "images (the fastest is shown)",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{args.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
    ]


def _source_state() -> str:
    """The commit advkit was run from, and whether its files had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "advkit"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit}" + (" with uncommitted changes under advkit/" if dirty else "")


def section_name(model: str, family: str) -> str:
    """The marker name of one model's section for one attack family."""
    return f"{model} {family}"


def model_section(run: ModelRun, family: str, env: list[str], args: argparse.Namespace) -> str:
    """One model's section for one family: environment, comparison table, advkit's overhead."""
    rows = [r for r in run.rows if r.spec.family == family]
    labels = ", ".join(dict.fromkeys(f"{r.spec.label} {r.spec.norm}" for r in rows))
    fb_seconds = run.fb_seconds[family]
    done, total = run.specs_done[family], run.specs_total[family]
    lines = [
        _marker(section_name(run.name, family), "begin"),
        f"## {run.name}: {labels} (`--attacks {family}`)",
        "",
        f"- model: {run.name}, {run.params:,} parameters, clean accuracy "
        f"{run.clean_accuracy:.2%}",
        *env,
        *([] if done == total else
          [f"- **incomplete**: {done} of {total} configurations done when this was written"]),
        f"- one forward+backward pass on {min(args.batch_size, args.limit)} images: fastest "
        f"{min(fb_seconds) * 1e3:.2f} ms, median {statistics.median(fb_seconds) * 1e3:.2f}"
        f", slowest {max(fb_seconds) * 1e3:.2f} ({len(fb_seconds)} timed loops of 5 "
        "passes, taken beside each attack's runs, at a random start of the attack's ball for "
        "attacks that start there, else at the clean images; each attack is compared with the "
        "fastest loop taken beside it)",
        "",
        "| library | attack | norm | eps | config | seconds | images/s | success | "
        "median norm | mean norm | max norm | box | ball | vs advkit | fwd+bwd |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|:-:|:-:|---:|---:|",
    ]
    base = {r.spec: r.seconds for r in rows if r.library == "advkit"}
    for r in rows:
        ref = base.get(r.spec)
        eps, ball = ("–", "–") if r.spec.minimal else (
            f"{r.spec.eps:g}", "yes" if r.in_ball else "**no**")
        lines.append(
            f"| {LIBRARY_LABELS.get(r.library, r.library)} | {r.spec.label} | {r.spec.norm} "
            f"| {eps} | {r.spec.config} | {r.seconds:.2f} | {_rate(r.n / r.seconds)} "
            f"| {r.success_rate:.1%} | {_fmt(r.median_norm)} | {_fmt(r.mean_norm)} "
            f"| {_fmt(r.max_norm, 4)} | {'yes' if r.in_box else '**no**'} | {ball} "
            f"| {_fmt(r.seconds / ref, 2) if ref else '–'} | {r.fb_equiv:.1f} |")
    notes = [f"- {LIBRARY_LABELS.get(r.library, r.library)}, {r.spec.label} {r.spec.norm}: "
             f"{r.note}" for r in rows if r.note]
    if notes:
        lines += ["", *notes]
    if run.overhead.get(family):
        lines += [
            "",
            "Cost against the model's own limit: time / (steps x batches x one "
            "forward+backward pass, the fastest timed beside that attack). Target for advkit "
            "with early exit off: <= 1.05. With it on, broken samples leave the batch and the "
            "ratio falls below 1. torchattacks, which runs exactly the steps' passes and "
            "nothing else, shows how far above 1 this wall-clock measure sits by itself (the "
            "fastest of many short reference loops against the fastest of a few whole runs); "
            "`benchmarks/overhead.py` measures the same ratio interleaved, on CPU time.",
            "",
            "| attack | seconds | fwd+bwd (ms) | time / (steps x fwd+bwd) |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {label} | {sec:.2f} | {ref * 1e3:.2f} | {ratio:.3f} |"
                  for label, sec, ref, ratio in run.overhead[family]]
    lines.append(_marker(section_name(run.name, family), "end"))
    return "\n".join(lines) + "\n"


def notes_section(notes: list[str]) -> str:
    """How to read the tables, and what configuration cannot make equal."""
    lines = [
        _marker("notes", "begin"),
        "## Attacks: advkit vs torchattacks, Foolbox and ART (`benchmarks/attacks.py`)",
        "",
        "One section per model and attack family below, each written by a run of "
        "`benchmarks/attacks.py` (`--attacks NAME` reruns that family and replaces its "
        "section only). Same model, same images, same batches, every library that implements "
        "an attack configured alike (eps, steps, step size, random start, momentum; for "
        "minimal-norm attacks steps, overshoot, confidence and the search over c).",
        "",
        "Columns: *seconds* is the wall time of the whole call over all images (input checks, "
        "NumPy conversions and a library's own extra passes included). *success* is counted "
        "by the benchmark with a fresh forward pass over the returned images, never from a "
        "library's flags (an image misclassified before the attack counts as a success for "
        "every library). *median / mean norm* are over the images classified correctly "
        "before and successful after (misclassified; for JSMA classified as its target). "
        "*max norm* is over all images; *box* / *ball* say "
        "whether every returned image lies in [0, 1] and in the eps-ball (tolerance 1e-5). "
        "*vs advkit* is the time divided by advkit's (defaults, early exit on) for the same "
        "attack. *fwd+bwd* is the time in units of one plain forward+backward pass (gradient "
        "w.r.t. the input) of the same model over the same images: a k-step attack that does "
        "all its work costs at least about k.",
        "",
        "### Differences that configuration cannot remove",
        "",
        *[f"- {d}" for d in DIFFERENCES],
        "- **torchvision.** torchattacks 3.5.1 declares torchvision as a requirement but does "
        "not import it: it is installed with `--no-deps` and runs without it; no placeholder "
        "module was needed.",
        "",
        "### The attacks of issue 3 (minimal-norm and the rest)",
        "",
        "For minimal-norm attacks (eps –) there is no budget: each library returns the "
        "smallest perturbation it found per image, and the *median / mean norm* columns are "
        "the comparison; *ball* does not apply.",
        "",
        *[f"- {d}" for d in ISSUE3_DIFFERENCES],
    ]
    if notes:
        lines += ["", "### Skipped in the last run", "", *[f"- {n}" for n in notes]]
    lines.append(_marker("notes", "end"))
    return "\n".join(lines) + "\n"


def _marker(name: str, which: str) -> str:
    return f"<!-- benchmarks/attacks.py {name}: {which} -->"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model} ({os.cpu_count()} logical cores)"


def write_section(path: Path, name: str, section: str) -> None:
    """Replace the section ``name`` of ``path`` (between its markers), keep the rest."""
    begin, end = _marker(name, "begin"), _marker(name, "end")
    text = path.read_text() if path.exists() else "# advkit benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--limit", type=int, default=1000, help="MNIST test images")
    parser.add_argument("--batch-size", type=int, default=500, help="the same for every library")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    parser.add_argument("--attacks", nargs="+", default=[",".join(ATTACK_FAMILIES)],
                        metavar="NAMES",
                        help="attack families, comma- or space-separated, from: "
                             f"{', '.join(ATTACK_FAMILIES)} (default: all)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES,
                        help="advkit-noexit: advkit with early_exit=False (step attacks); "
                             "advkit-paper: C&W with the paper's search over c; "
                             "advkit-paper-full: the same without early abort")
    parser.add_argument("--models", nargs="+", default=["small_cnn"], choices=MODELS,
                        help="small_cnn: the demo's model; mnist_cnn: Madry et al.'s, 1 epoch")
    parser.add_argument("--include-slow", action="store_true",
                        help="also run " + ", ".join(f"{lib}'s {fam}" for fam, lib in
                                                     sorted(SLOW)) + " (hours at 1,000 images)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=20, help="images in each warm-up call")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each library (interleaved); the fastest is reported")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    args.attacks = [a for item in args.attacks for a in item.split(",") if a]
    unknown = sorted(set(args.attacks) - set(ATTACK_FAMILIES))
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}: choose from "
                     f"{', '.join(ATTACK_FAMILIES)}")
    if min(args.limit, args.batch_size, args.warmup, args.repeats) < 1:
        parser.error("--limit, --batch-size, --warmup and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.load_before = os.getloadavg()[0]
    args.source = _source_state()  # at the start: the code the run imported
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    libraries, notes = available_libraries(args.libraries, log)
    specs = [s for s in SPECS if s.family in args.attacks]
    write_section(args.out, "notes", notes_section(notes))

    def done(run: ModelRun, family: str) -> None:  # after every attack: a stopped run keeps rows
        env = environment(args, libraries, device, started)
        write_section(args.out, section_name(run.name, family),
                      model_section(run, family, env, args))

    for name in args.models:
        run_model(name, args, libraries, specs, device, log, done)
    log(f"wrote {args.out} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
