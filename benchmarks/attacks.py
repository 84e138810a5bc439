"""advkit versus torchattacks, Foolbox and ART: the same attacks, model and images, one run.

For every (attack, eps) the benchmark configures each library identically (eps,
steps, step size, random start, momentum), runs it over the same MNIST test
images in the same batches, and then judges every output itself: success from a
fresh forward pass of the model (no library's own flags are read), whether the
images stay inside [0, 1] and the eps-ball (the largest norm is reported), and
the median and mean perturbation norm over the images it broke. Speed is the
wall time of the whole call, also expressed as a number of plain forward+backward
passes of the same model on the same batch, measured in the same run.

Run ``python benchmarks/attacks.py --help``; install the peers with
``scripts/install_bench.sh``. Each run rewrites only its own sections of
``benchmarks/RESULTS.md`` (one per model plus the notes, each between
``<!-- benchmarks/attacks.py NAME: begin/end -->`` markers), so other benchmarks and
other runs share the file.
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing advkit
    sys.path.insert(0, str(REPO))

import advkit  # noqa: E402
from advkit.attacks import BIM, FGSM, MIFGSM, PGD, Attack  # noqa: E402
from advkit.evaluation import run_attack  # noqa: E402
from advkit.models import checkpoint  # noqa: E402
from advkit.models.loaders import model_dir, trained_path  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402
from advkit.threat import norms as lp_norms  # noqa: E402
from advkit.train import TrainConfig, accuracy, train  # noqa: E402

LIBRARIES = ("advkit", "advkit-noexit", "torchattacks", "foolbox", "art")
LIBRARY_LABELS = {"advkit-noexit": "advkit (early_exit=False)"}
PEER_MODULES = {"torchattacks": "torchattacks", "foolbox": "foolbox", "art": "art"}
PEER_DISTRIBUTIONS = {"torchattacks": "torchattacks", "foolbox": "foolbox",
                      "art": "adversarial-robustness-toolbox"}
MODELS = ("small_cnn", "mnist_cnn")
#: The bigger model, trained here for one epoch (Madry et al.'s MNIST architecture).
MNIST_CNN_CONFIG = TrainConfig(arch="mnist_cnn", dataset="mnist", epochs=1, seed=0)
#: Linf and L2 bounds and tolerance of the eps-ball check (float32 arithmetic).
BOX = (0.0, 1.0)
TOL = 1e-5


@dataclass(frozen=True)
class Spec:
    """One attack configuration, applied identically to every library."""

    family: str           # fgsm, bim, pgd, pgd_l2, mifgsm (the --attacks names)
    label: str            # shown in the table
    norm: str             # linf or l2
    eps: float
    steps: int = 1
    step_size: float = 0.0
    random_start: bool = False
    decay: float = 0.0

    @property
    def config(self) -> str:
        if self.family == "fgsm":
            return "one step of eps"
        parts = [f"{self.steps} steps", f"step {self.step_size:.4g}"]
        if self.random_start:
            parts.append("random start")
        if self.decay:
            parts.append(f"decay {self.decay:g}")
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
)
ATTACK_FAMILIES = tuple(dict.fromkeys(s.family for s in SPECS))
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
    "runs a clean pass (entry checks) and the success pass; torchattacks none. All of them "
    "are inside the measured time.",
    "**Random numbers.** Each library draws its random starts from its own generator (advkit "
    "its seeded `torch.Generator`, torchattacks and Foolbox the global torch RNG, ART NumPy's); "
    "all are seeded with 0 before each run, but the starts differ between libraries.",
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
    fb_seconds: list[float] = field(default_factory=list)   # per batch of batch_size, each repeat
    rows: list[Row] = field(default_factory=list)
    overhead: list[tuple[str, float, float, float]] = field(default_factory=list)
    specs_done: int = 0
    specs_total: int = 0


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
                  early_exit: bool = True) -> Runner:
    threat = ThreatModel(spec.norm, spec.eps)
    attack: Attack
    if spec.family == "fgsm":
        attack = FGSM(threat)
    elif spec.family == "bim":
        attack = BIM(threat, steps=spec.steps, step_size=spec.step_size, early_exit=early_exit)
    elif spec.family in ("pgd", "pgd_l2"):
        attack = PGD(threat, steps=spec.steps, step_size=spec.step_size,
                     random_start=spec.random_start, early_exit=early_exit, seed=0)
    else:
        attack = MIFGSM(threat, steps=spec.steps, decay=spec.decay, step_size=spec.step_size,
                        early_exit=early_exit)

    def run(x: Tensor, y: Tensor) -> Tensor:
        result = run_attack(attack, model, x, y, batch_size=batch_size, progress=False,
                            device=device)
        return result.x_adv
    return run


def torchattacks_runner(model: nn.Module, spec: Spec, device: torch.device,
                        batch_size: int) -> Runner:
    import torchattacks as ta
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
    else:
        attack = ta.MIFGSM(model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps,
                           decay=spec.decay)
    return _batched(lambda xb, yb: attack(xb, yb), device, batch_size)


def foolbox_runner(model: nn.Module, spec: Spec, device: torch.device, batch_size: int) -> Runner:
    import foolbox as fb
    fmodel = fb.PyTorchModel(model, bounds=BOX, device=device)
    attacks = fb.attacks
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
    else:
        attack = attacks.LinfMomentumIterativeFastGradientMethod(
            momentum=spec.decay, abs_stepsize=spec.step_size, steps=spec.steps,
            random_start=False)

    def one(xb: Tensor, yb: Tensor) -> Tensor:
        _raw, clipped, _is_adv = attack(fmodel, xb, yb, epsilons=spec.eps)
        return clipped
    return _batched(one, device, batch_size)


def art_runner(model: nn.Module, spec: Spec, device: torch.device, batch_size: int) -> Runner:
    from art.attacks.evasion import (
        BasicIterativeMethod,
        FastGradientMethod,
        MomentumIterativeMethod,
        ProjectedGradientDescent,
    )
    from art.estimators.classification import PyTorchClassifier
    classifier = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
        clip_values=BOX, device_type="gpu" if device.type == "cuda" else "cpu")
    norm = np.inf if spec.norm == "linf" else 2
    if spec.family == "fgsm":
        attack = FastGradientMethod(classifier, norm=norm, eps=spec.eps, eps_step=spec.eps,
                                    num_random_init=0, batch_size=batch_size)
    elif spec.family == "bim":
        attack = BasicIterativeMethod(classifier, eps=spec.eps, eps_step=spec.step_size,
                                      max_iter=spec.steps, batch_size=batch_size, verbose=False)
    elif spec.family in ("pgd", "pgd_l2"):
        attack = ProjectedGradientDescent(
            classifier, norm=norm, eps=spec.eps, eps_step=spec.step_size, max_iter=spec.steps,
            num_random_init=1 if spec.random_start else 0, batch_size=batch_size, verbose=False)
    else:
        attack = MomentumIterativeMethod(classifier, norm=norm, eps=spec.eps,
                                         eps_step=spec.step_size, decay=spec.decay,
                                         max_iter=spec.steps, batch_size=batch_size,
                                         verbose=False)

    def run(x: Tensor, y: Tensor) -> Tensor:
        # ART batches internally; it takes and returns NumPy arrays (part of its measured cost).
        adv = attack.generate(x=x.numpy(), y=y.numpy())
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
    if library == "advkit":
        return advkit_runner(model, spec, device, batch_size)
    if library == "advkit-noexit":
        return advkit_runner(model, spec, device, batch_size, early_exit=False)
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
    success = pred != y
    norms = lp_norms(x_adv - x, spec.norm)
    # The perturbation of an image the model got wrong to begin with says nothing about the
    # attack; norms are over images correctly classified before and misclassified after.
    broken = norms[success & (clean_pred == y)]
    return {
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
              done: Callable[[ModelRun], None]) -> ModelRun:
    """Run every spec with every library on model ``name``; ``done(run)`` after each spec."""
    model = load_model(name, device, log)
    for p in model.parameters():
        p.requires_grad_(True)  # as a user's model would be; ART needs it, advkit does not
    x, y = advkit.data.load("mnist", split="test", limit=args.limit)
    clean = accuracy(model, x, y, device=device)
    with torch.no_grad():
        clean_pred = torch.cat([model(x[i:i + args.batch_size].to(device)).argmax(1).cpu()
                                for i in range(0, x.shape[0], args.batch_size)])
    run = ModelRun(name, sum(p.numel() for p in model.parameters()), clean,
                   specs_total=len(specs))
    log(f"[{name}] clean accuracy {clean:.2%} on {x.shape[0]} images")
    xb, yb = x[:args.batch_size].to(device), y[:args.batch_size].to(device)
    n_batches = math.ceil(x.shape[0] / args.batch_size)
    warm_x, warm_y = x[:args.warmup], y[:args.warmup]
    for spec in specs:
        libs = [lib for lib in libraries
                if not (lib == "advkit-noexit" and spec.family == "fgsm")]  # one step: no exit
        runners = {lib: make_runner(lib, model, spec, device, args.batch_size) for lib in libs}
        times: dict[str, list[float]] = {lib: [] for lib in libs}
        outputs: dict[str, Tensor] = {}
        fb_spec: list[float] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for runner in runners.values():
                runner(warm_x, warm_y)  # warm-up: lazy imports, allocator, thread pools
            # Repeats are interleaved (every library, then again), and the forward+backward
            # reference is timed beside them, so load from other processes hits all alike.
            for _ in range(args.repeats):
                fb_spec += forward_backward_seconds(model, xb, yb, device, repeats=3)
                for lib, runner in runners.items():
                    torch.manual_seed(0)
                    np.random.seed(0)
                    _sync(device)
                    t0 = time.perf_counter()
                    x_adv = runner(x, y)
                    _sync(device)
                    times[lib].append(time.perf_counter() - t0)
                    outputs.setdefault(lib, x_adv)
        run.fb_seconds += fb_spec
        # Fastest against fastest: load from other processes only ever adds time.
        fb = min(fb_spec)
        for lib in libs:
            verdict = judge(model, x, y, clean_pred, outputs[lib], spec, device, args.batch_size)
            row = Row(name, lib, spec, min(times[lib]), x.shape[0], **verdict)
            row.fb_equiv = row.seconds / (n_batches * fb)
            run.rows.append(row)
            log(f"[{name}] {lib:14s} {spec.label:8s} {spec.norm:4s} eps={spec.eps:<5g} "
                f"{' '.join(f'{t:6.2f}' for t in times[lib])} s  success "
                f"{row.success_rate:6.1%}  max norm {row.max_norm:.4f}  "
                f"{'ok' if row.in_box and row.in_ball else 'OUT OF BOUNDS'}")
            if lib.startswith("advkit") and spec.steps > 1:
                run.overhead.append((f"{LIBRARY_LABELS.get(lib, lib)} {spec.label} {spec.norm} "
                                     f"eps={spec.eps:g}", row.seconds, fb,
                                     row.seconds / (spec.steps * n_batches * fb)))
        run.specs_done += 1
        done(run)
    return run


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f"{value:.{digits}f}"


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
        f"- versions: {', '.join(versions)}; advkit source {_source_state()}",
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


def model_section(run: ModelRun, env: list[str], args: argparse.Namespace) -> str:
    """This model's section: environment, the comparison table, advkit's overhead."""
    lines = [
        _marker(run.name, "begin"),
        f"## {run.name}: {run.params:,} parameters, clean accuracy {run.clean_accuracy:.2%}",
        "",
        *env,
        *([] if run.specs_done == run.specs_total else
          [f"- **incomplete**: {run.specs_done} of {run.specs_total} attack configurations "
           "done when this was written"]),
        f"- one forward+backward pass on {args.batch_size} images: fastest "
        f"{min(run.fb_seconds) * 1e3:.2f} ms, median {statistics.median(run.fb_seconds) * 1e3:.2f}"
        f", slowest {max(run.fb_seconds) * 1e3:.2f} ({len(run.fb_seconds)} timed loops of 5 "
        "passes, taken beside each attack's runs; each attack is compared with the fastest "
        "loop taken beside it)",
        "",
        "| library | attack | norm | eps | config | seconds | images/s | success | "
        "median norm | mean norm | max norm | box | ball | vs advkit | fwd+bwd |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|:-:|:-:|---:|---:|",
    ]
    base = {r.spec: r.seconds for r in run.rows if r.library == "advkit"}
    for r in run.rows:
        ref = base.get(r.spec)
        lines.append(
            f"| {LIBRARY_LABELS.get(r.library, r.library)} | {r.spec.label} | {r.spec.norm} "
            f"| {r.spec.eps:g} | {r.spec.config} | {r.seconds:.2f} | {r.n / r.seconds:,.0f} "
            f"| {r.success_rate:.1%} | {_fmt(r.median_norm)} | {_fmt(r.mean_norm)} "
            f"| {_fmt(r.max_norm, 4)} | {'yes' if r.in_box else '**no**'} "
            f"| {'yes' if r.in_ball else '**no**'} "
            f"| {_fmt(r.seconds / ref, 2) if ref else '–'} | {r.fb_equiv:.1f} |")
    if run.overhead:
        lines += [
            "",
            "advkit's cost against the model's own limit: time / (steps x batches x one "
            "forward+backward pass, the fastest timed beside that attack). Target with early "
            "exit off: <= 1.05. With it on, broken samples leave the batch and the ratio falls "
            "below 1.",
            "",
            "| advkit attack | seconds | fwd+bwd (ms) | time / (steps x fwd+bwd) |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {label} | {sec:.2f} | {ref * 1e3:.2f} | {ratio:.3f} |"
                  for label, sec, ref, ratio in run.overhead]
    lines.append(_marker(run.name, "end"))
    return "\n".join(lines) + "\n"


def notes_section(notes: list[str]) -> str:
    """How to read the tables, and what configuration cannot make equal."""
    lines = [
        _marker("notes", "begin"),
        "## Attacks: advkit vs torchattacks, Foolbox and ART (`benchmarks/attacks.py`)",
        "",
        "One section per model below, each written by one run of `benchmarks/attacks.py` "
        "(rerun it to refresh that section only). Same model, same images, same batches, "
        "every library configured alike (eps, steps, step size, random start, momentum).",
        "",
        "Columns: *seconds* is the wall time of the whole call over all images (input checks, "
        "NumPy conversions and a library's own extra passes included). *success* is counted "
        "by the benchmark with a fresh forward pass over the returned images, never from a "
        "library's flags (an image misclassified before the attack counts as a success for "
        "every library). *median / mean norm* are over the images classified correctly "
        "before and misclassified after. *max norm* is over all images; *box* / *ball* say "
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
    parser.add_argument("--attacks", nargs="+", default=list(ATTACK_FAMILIES),
                        choices=ATTACK_FAMILIES, help="attack families (each at its eps)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES,
                        help="advkit-noexit is advkit with early_exit=False")
    parser.add_argument("--models", nargs="+", default=["small_cnn"], choices=MODELS,
                        help="small_cnn: the demo's model; mnist_cnn: Madry et al.'s, 1 epoch")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=20, help="images in each warm-up call")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each library (interleaved); the fastest is reported")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    if min(args.limit, args.batch_size, args.warmup, args.repeats) < 1:
        parser.error("--limit, --batch-size, --warmup and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    libraries, notes = available_libraries(args.libraries, log)
    specs = [s for s in SPECS if s.family in args.attacks]
    write_section(args.out, "notes", notes_section(notes))

    def done(run: ModelRun) -> None:  # written after every attack, so a stopped run keeps its rows
        env = environment(args, libraries, device, started)
        write_section(args.out, run.name, model_section(run, env, args))

    for name in args.models:
        run_model(name, args, libraries, specs, device, log, done)
    log(f"wrote {args.out} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
