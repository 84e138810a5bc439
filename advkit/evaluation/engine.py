"""The evaluation engine: a suite of attacks over a data set, per-sample worst case,
masking checks, a resumable SQLite record, and sharding over torch.distributed.

The work is cut into *chunks*: stage ``s`` (0 is the clean pass) takes the samples
it must attack (for a budgeted suite: correctly classified and not broken by any
earlier stage), in index order, in slices of ``batch_size``. A chunk's seed is
derived from the run's seed, the stage and the chunk number alone, so a chunk gives
the same per-sample outcome whoever runs it, in one process or many, in one go or
after a resume. Each finished chunk is committed to the store at once; a resumed
run skips the chunks already there.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from advkit.attacks.base import check_inputs, check_label_range, check_logits, eval_mode
from advkit.distributed import World
from advkit.environment import describe
from advkit.evaluation import checks as checks_lib
from advkit.evaluation.store import ChunkRecord, Outcome, Store
from advkit.evaluation.suites import DEFAULT_SUITE, Suite, get_suite
from advkit.models.access import GRADIENTS, LABELS, REJECT, SCORES, ModelAccess, allows, rejects
from advkit.models.device import device_of
from advkit.progress import progress_bar
from advkit.threat import ThreatModel

GALLERY_PER_CHUNK = 4     # adversarial examples kept per chunk (first two chunks of a stage)


class ExpectedLogits(nn.Module):
    """The logits averaged over ``draws`` forward passes: attacking it follows the expected
    gradient (EOT, Athalye et al. 2018) of a randomised model."""

    def __init__(self, model: nn.Module, draws: int) -> None:
        super().__init__()
        self.model = model
        self.draws = draws
        self.train(model.training)

    @property
    def rejects_inputs(self) -> bool:
        return rejects(self.model)

    def rejected(self, x: Tensor) -> Tensor:
        return self.model.rejected(x)

    def forward(self, x: Tensor) -> Tensor:
        total = self.model(x)
        for _ in range(self.draws - 1):
            total = total + self.model(x)
        return total / self.draws


@dataclass
class EvaluationReport:
    """The outcome of :func:`evaluate` (or of a run read back from the store).

    Attributes:
        run_id / store: where the run is recorded (``advkit report RUN``).
        clean_accuracy / robust_accuracy: over all samples; robust accuracy is the
            per-sample worst case over every stage (for a minimal suite: the share of
            samples whose smallest perturbation found exceeds eps).
        stages: one dict per stage (robust accuracy after it, samples it broke, time, passes).
        per_sample: one dict per sample: label, clean prediction, which stage broke it,
            with what norm, at what cost (``passes``: the attacks' ``result.queries``,
            forward + backward passes on that sample; ``passes_exact`` is False only in
            runs stored before every attack counted per sample, where it holds the
            chunk's average) and whether it is robust.
        per_class: clean and robust accuracy per true class.
        checks: the masking checks; ``reliable`` is False when any of them failed, and
            for a run that has not finished.
        curves: robust accuracy versus eps (name -> points).
        chunks_run: chunks this call computed (0 when everything was already stored).
        status: ``done``; or, for a run read back before it finished, ``running`` (a live
            process is working on it) or ``unfinished`` (it stopped: killed, failed,
            interrupted; ``--resume`` continues it).
        unknown: images the run has not settled yet (no clean prediction, or a stage still
            to attack them): counted neither robust nor broken (``status`` "unknown" in
            ``per_sample``).
        robust_accuracy_bounds: (at least, at most): where the finished run's robust
            accuracy will lie (every unknown image broken, or none). While any image is
            unknown, ``robust_accuracy`` is None (likewise ``clean_accuracy`` before the
            clean pass is complete); the model's robust accuracy is at most the upper bound.
        rejection: for a pipeline with detectors (a model that rejects inputs), shares of
            all samples: ``false_rejection`` (clean images rejected, counted as clean
            errors), ``detected`` (robust samples whose last attack's adversarial image was
            rejected) and ``correct_accepted`` (robust samples whose last adversarial image
            was accepted and classified correctly); the two add up to the robust accuracy
            (as in :func:`advkit.defenses.protection_metrics`). None for other models; the
            two parts are None until the run is finished.
    """

    run_id: int
    store: str
    suite: str
    kind: str
    threat: ThreatModel
    n: int
    clean_accuracy: float | None
    robust_accuracy: float | None
    stages: list[dict]
    per_sample: list[dict]
    per_class: list[dict]
    checks: list[checks_lib.Check]
    curves: dict[str, list[tuple[float, float]]]
    seconds: float
    chunks_run: int = 0
    config: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    status: str = "done"
    unknown: int = 0
    robust_accuracy_bounds: tuple[float, float] | None = None
    rejection: dict | None = None

    @property
    def finished(self) -> bool:
        return self.status == "done"

    @property
    def reliable(self) -> bool:
        # Unfinished: not every attack has run, nor perhaps the checks; nothing vouches yet.
        return self.finished and not any(c.status == "fail" for c in self.checks)

    def summary(self) -> dict:
        bounds = self.robust_accuracy_bounds or (self.robust_accuracy, self.robust_accuracy)
        return {"run": self.run_id, "status": self.status, "suite": self.suite,
                "norm": self.threat.norm, "eps": self.threat.eps, "n": self.n,
                "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
                "robust_accuracy_bounds": list(bounds), "unknown": self.unknown,
                "reliable": self.reliable, "seconds": self.seconds,
                **({"rejection": self.rejection} if self.rejection is not None else {})}


# --- the run ----------------------------------------------------------------------------------


def data_digest(x: Tensor, y: Tensor) -> str:
    """A short hash of the images and labels (a resumed run must see the same data)."""
    h = hashlib.sha256()
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _chunk_seed(seed: int, stage: int, chunk: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + chunk) % (2**31 - 1)


def _stage_threat(threat: ThreatModel, suite: Suite) -> ThreatModel:
    # A minimal suite looks for each sample's smallest perturbation: no cap.
    return ThreatModel(threat.norm, math.inf, threat.bounds) if suite.kind == "minimal" else threat


def evaluate(
    model: nn.Module | ModelAccess, x: Tensor, y: Tensor, threat: ThreatModel,
    suite: str | Path | Suite = DEFAULT_SUITE, *, seed: int = 0, batch_size: int = 500,
    store: str | Path | Store | None = None, resume: int | None = None,
    checks: bool = True, check_samples: int = 100, device: str | torch.device | None = None,
    progress: bool = True, log: Callable[[str], None] | None = None,
    describe_model: dict | None = None, describe_data: dict | None = None,
    binarization: int = 0, certify: str | None = None, certify_steps: int = 8,
) -> EvaluationReport:
    """Evaluate ``model`` on (x, y) under ``threat`` with an attack suite.

    ``model`` may be a black box (:func:`advkit.models.scores_only`, ``labels_only``,
    ``remote``): the suite's attacks must make do with its access (``suite="blackbox"``
    picks Square or HopSkipJump), every query goes through it, and the store records each
    sample's queries (``passes``), so an interrupted run resumes with the counts of its
    finished chunks intact. The black box answers one probe, the clean pass (one query per
    image), the attacks (``result.queries`` per image) and, for a score black box, one
    query per gallery image (counted in the stage's forward passes): exactly the sum the
    report gives. Per-sample budgets belong to one attack call and are refused here. The
    gradient-masking checks are skipped.

    Args:
        suite: "lean" (the default: AutoAttack's strength for about a sixth of its
            gradient passes), "standard" (AutoAttack's published attacks), "fast",
            "thorough", "rand" (randomised models), "minimal" (the accuracy-versus-eps
            curve), "blackbox", a :class:`Suite`, or a .toml / .yaml / .json file.
        seed: the run's seed; every chunk's seed derives from it.
        batch_size: samples per chunk (the unit that is committed and resumed).
        store: the SQLite result store (path or :class:`Store`); None keeps the run in
            memory only.
        resume: the id of an unfinished run in ``store`` to continue; model, data,
            threat model, suite, seed and batch size must match the original.
        checks: run the gradient-masking checks on ``check_samples`` correctly
            classified images.
        binarization: with the checks, also run the binarization test (Zimmermann et al.
            2022; :mod:`advkit.evaluation.binarization`) with the run's suite on this many
            correctly classified images (0: not run; it attacks one binarised model per
            image).
        certify: after the attacks, certify every image with this method of
            :data:`advkit.verify.METHODS` (``"ibp"``, ``"crown"``, ``"alpha-crown"``,
            ``"milp"``): the check ``certification`` records each image's certified radius
            beside the smallest perturbation an attack found, the verified, robust and
            clean accuracy curves, and *fails* (the run is unreliable) if any certified
            image was broken within its radius (:mod:`advkit.evaluation.certification`).
            The model must be an ``nn.Sequential`` chain bound propagation reads.
        certify_steps: bisection steps of each certified radius (resolution eps / 2^steps).
        device: where the model runs (default: its parameters' device).
        describe_model / describe_data: recorded with the run (the CLI records the
            model spec and data slice, so ``--resume`` can reload them).

    Returns:
        An :class:`EvaluationReport`. Under ``torchrun`` every process returns it; only
        rank 0 writes to the store.
    """
    start = time.perf_counter()
    log = log or (lambda _: None)
    if isinstance(model, ModelAccess):
        if model.budget is not None:
            raise ValueError(f"{model!r} has a per-sample query budget, which bounds one attack "
                             "call; an evaluation runs several: set each stage's max_queries "
                             "(n_queries for Square) in the suite and drop the budget")
        if model.level == GRADIENTS:
            model = model.module  # white box: the module itself
    suite = get_suite(suite, model).for_norm(threat.norm)
    suite.check(_stage_threat(threat, suite))  # bad option values: an error before any work
    black_box = isinstance(model, ModelAccess)
    _check_stages(model, suite, _stage_threat(threat, suite))
    x, y, _ = check_inputs(model, x, y, None, threat)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if check_samples < 1:
        raise ValueError(f"check_samples must be >= 1 (got {check_samples})")
    if suite.kind == "budgeted":
        threat.check_eps_for(x)
    if device is None:
        local = model.module if black_box else model
        device = device_of(local) if isinstance(local, nn.Module) else torch.device("cpu")
    device = torch.device(device)
    _probe(model, x, y, device)
    adaptive = checks_lib.adaptive_attacks(model, suite)
    if adaptive is not None and adaptive.status == "fail":
        warnings.warn(adaptive.message, stacklevel=2)
        log(f"warning: {adaptive.message}")
    world = World.join(device)
    config = {
        "suite": suite.to_dict(), "threat": {"norm": threat.norm, "eps": threat.eps,
                                             "bounds": list(threat.bounds)},
        "seed": seed, "batch_size": batch_size, "n": int(x.shape[0]),
        "data_digest": data_digest(x, y), "model_fingerprint": _fingerprint(model),
        "checks": checks, "check_samples": check_samples,
        "model": describe_model or {}, "data": describe_data or {},
    }
    if isinstance(binarization, bool) or not isinstance(binarization, int) or binarization < 0:
        raise ValueError(f"binarization must be a number of images >= 0 (got {binarization!r})")
    if binarization:
        config["binarization"] = binarization
    if certify is not None:
        _check_certifiable(model, x, suite, threat, certify, certify_steps)
        config["certify"] = {"method": certify, "steps": certify_steps}
    if rejects(model):
        config["rejects"] = True  # clean and adversarial predictions may be REJECT
    if black_box:
        config["access"] = model.level  # "passes" are then the black box's queries
    owned = not isinstance(store, Store)
    if resume is not None and owned and (store is None or not Path(store).exists()):
        raise FileNotFoundError(f"cannot resume run {resume}: no store at {store}")
    db = None
    if world.rank == 0:
        db = store if isinstance(store, Store) else Store(store if store is not None
                                                          else ":memory:")
    try:
        run_id = world.from_root(lambda: _open_run(db, resume, config, device))
        if adaptive is not None and db is not None:
            # Recorded before any attack: even an unfinished run says it is not adaptive.
            db.set_check(run_id, adaptive.name, adaptive.status, adaptive.message,
                         adaptive.details)
        engine = _Engine(model, x, y, threat, suite, config, db, run_id, world, device, progress,
                         log)
        with eval_mode(model.module if black_box else model):
            engine.run_stages()
            if checks or certify is not None:
                engine.run_checks()
        report = world.from_root(lambda: read_report(db, run_id, finish=True))
    finally:
        if db is not None and owned and store is not None:
            db.close()
    report.seconds = time.perf_counter() - start
    report.chunks_run = sum(world.gather(engine.chunks_run))
    return report


def _check_stages(model: nn.Module | ModelAccess, suite: Suite, threat: ThreatModel) -> None:
    """Every stage, as configured, must make do with the model's access (a black box's level,
    gradients for a module) and run without targets (the engine attacks untargeted): the
    configured attack decides (NES with ``label_only`` needs only labels, and targets)."""
    level = model.level if isinstance(model, ModelAccess) else GRADIENTS
    attacks = [(stage, stage.build(threat, seed=0)) for stage in suite.stages]
    refused = [f"{stage.name} ({attack.name} needs {attack.access})"
               for stage, attack in attacks if not allows(level, attack.access)]
    if refused:
        raise ValueError(f"suite {suite.name!r} has stages the model's {level} access "
                         f"cannot run: {', '.join(refused)}; use suite='blackbox' (or a suite "
                         "of score-based or decision-based attacks: advkit attacks lists each "
                         "attack's access)")
    for stage, attack in attacks:
        try:
            attack.check_call(level, targeted=False)
        except ValueError as err:
            raise ValueError(f"suite {suite.name!r}: stage {stage.name!r} ({stage.attack}) "
                             f"cannot run in an evaluation, which attacks without targets=: "
                             f"{err}") from err


def _check_certifiable(model: nn.Module | ModelAccess, x: Tensor, suite: Suite,
                       threat: ThreatModel, method: str, steps: int) -> None:
    """Certification's requirements, before any work: the weights, a chain bound
    propagation reads, a known method, a finite eps, a budgeted suite."""
    from advkit.verify import METHODS
    from advkit.verify.bounds import network

    if method not in METHODS:
        raise ValueError(f"unknown certification method {method!r}: use one of "
                         f"{', '.join(METHODS)}")
    if isinstance(model, ModelAccess):
        raise ValueError("certification reads the model's weights; a black box has none to "
                         "give: drop certify (or evaluate the local model itself)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"certify_steps must be an integer >= 0 (got {steps!r})")
    if not threat.bounded:
        raise ValueError("certification needs a finite eps (the radius is searched up to it)")
    network(model, x[:1])  # an unsupported layer or a train-mode model: its own clear error


def _fingerprint(model: nn.Module | ModelAccess) -> str:
    """The model's fingerprint, what a resumed run must match: a black box's is its local
    module's (weights), or what it says of itself (a remote endpoint: URL and answers),
    with its access level."""
    if not isinstance(model, ModelAccess):
        from advkit.models import fingerprint
        return fingerprint(model)
    inner = model.model
    if isinstance(inner, nn.Module):
        from advkit.models import fingerprint
        what = fingerprint(inner)
    else:  # a remote endpoint: its URL, what it serves, and the weights it says it has
        what = f"{inner!r}:{getattr(inner, 'model_fingerprint', None)}"
    top_k = getattr(model, "top_k", None)
    return hashlib.sha256(f"{model.level}:{top_k}:{what}".encode()).hexdigest()[:16]


def _probe(model: nn.Module | ModelAccess, x: Tensor, y: Tensor, device: torch.device) -> None:
    """The attacks' entry checks on one image, before a run is stored: logits of shape
    (1, classes), finite, and every label one of the classes. A black box is asked once
    (one query), with its access's own checks."""
    if isinstance(model, ModelAccess):
        if model.level == SCORES:
            scores = model.scores(x[:1].to(device))
            check_label_range(scores.shape[1], y)
        else:
            label = int(model.labels(x[:1].to(device))[0])
            if label < 0 and label != REJECT:
                raise ValueError(f"the model answered label {label}: not a class index")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eval_mode warns once, around the run itself
        with eval_mode(model), torch.no_grad():
            try:
                logits = model(x[:1].to(device))
            except RuntimeError as err:  # shapes or dtypes the model cannot take
                raise ValueError(f"the model cannot take these images (shape "
                                 f"{tuple(x.shape[1:])}): {err}") from err
    check_logits(logits, y[:1].to(device), None)
    check_label_range(logits.shape[1], y)


def _open_run(db: Store, resume: int | None, config: dict, device) -> int:
    if resume is None:
        return db.create_run(config, describe(device))
    db.claim(resume)  # before reading what is done: a second resume is refused, not raced
    stored = db.run(resume)["config"]
    for key in ("suite", "threat", "seed", "batch_size", "n", "data_digest", "model_fingerprint"):
        if stored[key] != config[key]:
            raise ValueError(f"run {resume} was made with a different {key.replace('_', ' ')} "
                             f"({stored[key]!r}, now {config[key]!r}); resume with the same model, "
                             "data and settings, or start a new run")
    return resume


class _Engine:
    def __init__(self, model, x, y, threat, suite, config, db, run_id, world, device, progress,
                 log) -> None:
        self.model, self.x, self.y, self.threat, self.suite = model, x, y, threat, suite
        self.config, self.db, self.run_id, self.world = config, db, run_id, world
        self.device, self.progress, self.log = torch.device(device), progress, log
        self.black_box = isinstance(model, ModelAccess)
        self.chunks_run = 0

    # which samples each stage attacks, decided from the store on rank 0
    def _inputs(self, stage: int) -> list[int]:
        if stage == 0:
            return list(range(len(self.x)))
        rows = self.db.samples(self.run_id)
        todo = {idx for idx, label, pred, _ in rows if pred == label}
        if self.suite.kind == "budgeted":
            # Earlier stages only: a resumed stage must cut the very chunks it cut at first.
            for done_stage, o in self.db.outcomes(self.run_id):
                if o.success and done_stage < stage:
                    todo.discard(o.idx)
        return sorted(todo)

    def run_stages(self) -> None:
        bs = self.config["batch_size"]
        for stage in range(len(self.suite.stages) + 1):
            name = "clean" if stage == 0 else self.suite.stages[stage - 1].name
            plan = self.world.from_root(lambda s=stage: (
                self._inputs(s), sorted(self.db.done_chunks(self.run_id, s))))
            inputs, done = plan
            chunks = [inputs[i:i + bs] for i in range(0, len(inputs), bs)]
            pending = [c for c in range(len(chunks)) if c not in set(done)]
            todo = sum(len(chunks[c]) for c in pending)
            with progress_bar(self.progress and self.world.rank == 0, f"{name}", todo) as bar:
                for first in range(0, len(pending), self.world.size):
                    mine = pending[first + self.world.rank] if (
                        first + self.world.rank < len(pending)) else None
                    record = None
                    if mine is not None:
                        record = self._run_chunk(stage, mine, chunks[mine])
                        self.chunks_run += 1
                    for rec in self.world.gather(record):
                        if rec is not None and self.world.rank == 0:
                            self._commit(stage, rec)
                            bar.advance(steps=rec[0].n)
            if self.world.rank == 0:
                self.log(self._stage_line(stage, name))

    def _stage_line(self, stage: int, name: str) -> str:
        rows = self.db.per_sample_rows(self.run_id) if stage else None
        if stage == 0:
            samples = self.db.samples(self.run_id)
            acc = sum(p == lbl for _, lbl, p, _ in samples) / max(len(samples), 1)
            return f"clean: accuracy {acc:.1%} ({len(samples)} images)"
        stage_names = ["clean"] + [s.name for s in self.suite.stages]
        upto = set(stage_names[:stage + 1])
        robust = sum(1 for r in rows if r["broken_by"] is None or r["broken_by"] not in upto)
        if self.suite.kind == "minimal":
            eps = self.threat.eps
            robust = sum(1 for r in rows if not (r["broken_by"] in upto and r["norm"] is not None
                                                  and r["norm"] <= eps * (1 + 1e-9)))
        return f"{name}: robust accuracy {robust / max(len(rows), 1):.1%}"

    def _run_chunk(self, stage: int, chunk: int, idx: list[int]):
        index = torch.tensor(idx, dtype=torch.long)
        xc, yc = self.x[index].to(self.device), self.y[index].to(self.device)
        t0 = time.perf_counter()
        if stage == 0:
            with torch.no_grad():
                if self.black_box and self.model.level == LABELS:
                    # A label is a one-hot answer: the box is as sure as it lets us see.
                    pred = self.model.labels(xc)
                    conf = torch.ones(pred.shape)
                else:
                    scores = self.model.scores(xc) if self.black_box else self.model(xc)
                    conf, pred = scores.softmax(1).max(1)
                if rejects(self.model):
                    pred = torch.where(self.model.rejected(xc).to(pred.device),
                                       torch.full_like(pred, REJECT), pred)
            rows = [(i, int(lbl), int(p), float(c)) for i, lbl, p, c in
                    zip(idx, yc.tolist(), pred.tolist(), conf.tolist(), strict=True)]
            return (ChunkRecord(0, chunk, len(idx), len(idx), 0, time.perf_counter() - t0), rows,
                    [])
        spec = self.suite.stages[stage - 1]
        attacked = self._attacked()
        model = attacked if spec.eot == 1 else ExpectedLogits(attacked, spec.eot)
        attack = spec.build(_stage_threat(self.threat, self.suite),
                            _chunk_seed(self.config["seed"], stage, chunk))
        result = attack(model, xc, yc)
        n = len(idx)
        # Every attack counts its per-sample cost the same way (forward + backward passes,
        # entry and success passes included); the EOT wrapper runs the model eot times a pass.
        per_sample = result.queries.double() * spec.eot
        outcomes = [Outcome(i, bool(s), float(nm) if math.isfinite(nm) else None, int(p), float(q),
                            True)
                    for i, s, nm, p, q in zip(idx, result.success.tolist(), result.norms.tolist(),
                                              result.predictions.tolist(), per_sample.tolist(),
                                              strict=True)]
        images, extra = [], 0
        # A label-only black box gives no confidence to show; a score black box is asked
        # once more per gallery image, and the chunk's record counts those queries.
        if chunk < 2 and not (self.black_box and self.model.level == LABELS):
            picks = result.success.nonzero().flatten()[:GALLERY_PER_CHUNK]
            if len(picks):
                with torch.no_grad():
                    if self.black_box:
                        probs = self.model.scores(result.x_adv[picks]).softmax(1)
                        extra = len(picks)
                    else:
                        probs = model(result.x_adv[picks]).softmax(1)
                for j, p in zip(picks.tolist(), probs, strict=True):
                    conf, pred = p.max(0)
                    info = {"attack": spec.name, "norm": float(result.norms[j]),
                            "adv_pred": int(pred), "adv_conf": float(conf)}
                    images.append((idx[j], info, xc[j].cpu().numpy(),
                                   result.x_adv[j].cpu().numpy()))
        record = ChunkRecord(stage, chunk, n, result.forward_passes * spec.eot + extra,
                             result.backward_passes * spec.eot, time.perf_counter() - t0)
        return record, outcomes, images

    def _attacked(self) -> nn.Module | ModelAccess:
        """The model as attacks and checks differentiate it: a pipeline through its
        transforms' declared approximations (BPDA); the forward pass, and so every
        prediction, is unchanged. A black box is attacked as it is."""
        if self.black_box:
            return self.model
        for_attack = getattr(self.model, "for_attack", None)
        return for_attack() if callable(for_attack) else self.model

    def _commit(self, stage: int, rec) -> None:
        record, rows, images = rec
        if stage == 0:
            self.db.add_clean(self.run_id, record, rows)
        else:
            self.db.add_outcomes(self.run_id, record, rows, images)

    def run_checks(self) -> None:
        if self.world.rank == 0:
            done = {c["name"] for c in self.db.checks(self.run_id)}
            for check in self._checks(done):
                self.db.set_check(self.run_id, check.name, check.status, check.message,
                                  check.details)
                self.log(f"check {check.name}: {check.status.upper()} - {check.message}")
        self.world.barrier()

    def _checks(self, done: set[str]):
        if not self.config["checks"]:  # certification only: the masking checks count as done
            done = done | {"randomness", "logits", "gradients", "black_box", "eps_monotone",
                           "unbounded", "restarts", "binarization"}
        rows = self.db.samples(self.run_id)
        correct = [idx for idx, label, pred, _ in rows if pred == label]
        pick = torch.tensor(correct[:self.config["check_samples"]], dtype=torch.long)
        if len(pick) == 0:
            yield checks_lib.Check("samples", "fail", "No image is classified correctly: there is "
                                   "nothing to attack, and no check can run.")
            return
        if self.black_box:
            # Gradient masking fools gradient-based attacks; a black box is attacked without
            # gradients, and probing it would spend queries the run does not count.
            if "gradients" not in done:
                yield checks_lib.Check(
                    "gradients", "skip", f"The model is a black box ({self.model.level} "
                    "access): the gradient-masking checks need gradients, and the suite's "
                    "attacks use none.")
            return
        xs, ys = self.x[pick].to(self.device), self.y[pick].to(self.device)
        eot = max(s.eot for s in self.suite.stages)
        # The masking checks judge the gradients of a classifier: a pipeline's detectors are
        # left out of them (the adaptive check says whether the suite evades those).
        probed = self._attacked()
        if callable(getattr(probed, "without_detectors", None)):
            probed = probed.without_detectors()
        model = probed if eot == 1 else ExpectedLogits(probed, eot)
        if "randomness" not in done:
            yield checks_lib.forward_randomness(self.model, xs, self.suite)
        if "logits" not in done:
            yield checks_lib.logit_outputs(self.model, xs)
        if "gradients" not in done:
            yield checks_lib.gradient_health(model, xs, ys)
        if "black_box" not in done:
            black_box = {s.name: s.attack_class.taxonomy.black_box for s in self.suite.stages}
            yield checks_lib.black_box_gain(self.db.per_sample_rows(self.run_id), self.suite,
                                            black_box)
        if not {"eps_monotone", "unbounded", "restarts"} <= done:
            if self.threat.bounded:
                yield from checks_lib.eps_behaviour(model, xs, ys, self.threat,
                                                    self.config["seed"])
            else:
                yield checks_lib.Check("eps_monotone", "skip", "No finite eps to vary.")
        certify = self.config.get("certify")
        if certify and "certification" not in done:
            from advkit.evaluation.certification import sandwich
            self.log(f"certifying every image ({certify['method']}) ...")
            yield sandwich(self.model, self.x.to(self.device), self.y.to(self.device),
                           self.threat, self.db.per_sample_rows(self.run_id),
                           certify["method"], steps=certify["steps"])
        wanted = self.config.get("binarization", 0)
        if wanted and "binarization" not in done:
            if self.suite.kind != "budgeted" or not self.threat.bounded:
                yield checks_lib.Check("binarization", "skip", "The binarization test needs a "
                                       "budgeted suite and a finite eps.")
                return
            from advkit.evaluation.binarization import binarization_test
            some = torch.tensor(correct[:wanted], dtype=torch.long)
            yield binarization_test(probed, self.x[some].to(self.device),
                                    self.y[some].to(self.device), self.threat, self.suite,
                                    samples=wanted, seed=self.config["seed"])


# --- reading a run back ---------------------------------------------------------------------


def read_report(db: Store, run_id: int, finish: bool = False) -> EvaluationReport:
    """The :class:`EvaluationReport` of a stored run (``finish``: mark it done).

    A run that has not finished reads back as such: ``status`` says so, images no stage
    has settled yet are ``unknown`` (never robust), robust accuracy is given as bounds,
    and the run is not reliable.
    """
    run = db.run(run_id)
    config = run["config"]
    suite = Suite.from_dict(config["suite"])
    threat = ThreatModel(config["threat"]["norm"], config["threat"]["eps"],
                         tuple(config["threat"]["bounds"]))
    rows = db.per_sample_rows(run_id)
    n = max(len(rows), 1)
    unknown = sum(r["status"] == "unknown" for r in rows)
    robust_known = sum(r["status"] == "robust" for r in rows)
    bounds = (robust_known / n, (robust_known + unknown) / n)
    robust = bounds[0] if unknown == 0 else None
    labelled = [r for r in rows if r["label"] is not None]
    clean = (sum(r["clean_pred"] == r["label"] for r in labelled) / n
             if len(labelled) == len(rows) else None)
    if finish and unknown:
        raise RuntimeError(f"run {run_id}: {unknown} images unsettled after every stage ran; "
                           "this is a bug in advkit, please report it")
    status = "done" if finish else db.state(run_id)
    if status == "done" and unknown:   # a store marked done by mistake: say what it holds
        status = "unfinished"
    attacked: dict[int, set[int]] = {}
    last_prediction: dict[int, int] = {}  # outcomes come in stage order: the last stage's
    for stage, o in db.outcomes(run_id):
        attacked.setdefault(stage, set()).add(o.idx)
        last_prediction[o.idx] = o.prediction
    rejection = None
    if config.get("rejects"):
        standing = [r["idx"] for r in rows if r["status"] == "robust"]
        detected = sum(last_prediction.get(i) == REJECT for i in standing)
        rejection = {"false_rejection": sum(r["clean_pred"] == REJECT for r in labelled) / n,
                     "detected": None if unknown else detected / n,
                     "correct_accepted": None if unknown else (len(standing) - detected) / n}
    chunk_rows = db.chunks(run_id)
    stages = []
    names = [s.name for s in suite.stages]
    for i, spec in enumerate(suite.stages, start=1):
        parts = [c for c in chunk_rows if c.stage == i]
        upto = {"clean", *names[:i]}
        alive = settled = 0
        for r in labelled:
            if suite.kind == "minimal":
                broken = (r["broken_by"] in upto and r["norm"] is not None
                          and r["norm"] <= threat.eps * (1 + 1e-9))
            else:
                broken = r["broken_by"] in upto
            standing = not broken and all(r["idx"] in attacked.get(s, ()) for s in
                                          range(1, i + 1))
            alive += standing
            settled += broken or standing
        seconds = sum(c.seconds for c in parts)
        stages.append({
            "stage": spec.name, "attack": spec.attack_class.__name__,
            "attacked": sum(c.n for c in parts),
            "broken": sum(1 for r in rows if r["broken_by"] == spec.name),
            # None until every image's fate after this stage is known
            "robust_acc_after": alive / n if settled == len(rows) else None,
            "seconds": seconds,
            "forward_passes": sum(c.forward for c in parts),
            "backward_passes": sum(c.backward for c in parts),
        })
    classes = sorted({r["label"] for r in labelled})
    per_class = []
    for c in classes:
        members = [r for r in labelled if r["label"] == c]
        open_ = sum(r["status"] == "unknown" for r in members)
        per_class.append({"class": c, "n": len(members),
                          "clean_acc": sum(r["clean_pred"] == c for r in members) / len(members),
                          "robust_acc": (None if open_ else
                                         sum(r["status"] == "robust" for r in members)
                                         / len(members)),
                          "unknown": open_})
    checks = [checks_lib.Check(**c) for c in db.checks(run_id)]
    report = EvaluationReport(
        run_id=run_id, store=str(db.path), suite=suite.name, kind=suite.kind, threat=threat,
        n=len(rows), clean_accuracy=clean, robust_accuracy=robust, stages=stages,
        per_sample=rows, per_class=per_class, checks=checks,
        curves=_curves(rows, suite, threat, clean, bounds[1], checks, status == "done"),
        seconds=sum(c.seconds for c in chunk_rows), config=config,
        environment=run["environment"], status=status, unknown=unknown,
        robust_accuracy_bounds=bounds, rejection=rejection)
    if finish and run["status"] != "done":
        db.finish_run(run_id, report.summary())
    return report


def _curves(rows: Sequence[dict], suite: Suite, threat: ThreatModel, clean: float | None,
            robust: float, checks: Sequence[checks_lib.Check], finished: bool = True) -> dict:
    """``robust``: the robust accuracy, or its upper bound for an unfinished run, whose
    curve (unknown images counted as standing) is an upper bound too, and named so."""
    curves: dict[str, list[tuple[float, float]]] = {}
    n = max(len(rows), 1)
    tail = "" if finished else ", unfinished: an upper bound"
    if suite.kind == "minimal":
        norms = sorted(r["norm"] for r in rows if r["broken_by"] and r["norm"] is not None)
        top = max([threat.eps if threat.bounded else 0.0] + norms[-1:]) or 1.0
        grid = [top * i / 24 for i in range(25)]
        curves[f"{suite.name} suite (smallest norm per image{tail})"] = [
            (e, sum(1 for r in rows if not (r["broken_by"] and r["norm"] is not None
                                            and r["norm"] <= e)) / n) for e in grid]
    elif clean is not None:
        name = f"{suite.name} suite" + (f" ({tail[2:]})" if tail else "")
        curves[name] = [(0.0, clean), (threat.eps, robust)]
    for c in checks:
        if c.name == "eps_monotone" and "points" in c.details:
            # The unbounded point (the whole box) lives in the checks table: on the plot it
            # would squash every other point against the left edge.
            pts = [(0.0, 1.0)] + [tuple(p) for p in c.details["points"][:len(
                checks_lib.EPS_FACTORS)]]
            curves[f"APGD-CE probe ({c.details['samples']} correct images)"] = pts
        if c.name == "certification" and "curves" in c.details:
            # The sandwich: verified <= robust (attacks) <= clean, at every eps.
            for key, pts in c.details["curves"].items():
                name = f"{key}, per image" if key != "clean" else "clean"
                if key.startswith("robust") and suite.kind == "budgeted":
                    # A budgeted attack's perturbations sit at eps: below it this curve
                    # only bounds robust accuracy from above, loosely.
                    name = "robust (attacks at eps; below eps an upper bound), per image"
                curves[name] = [tuple(p) for p in pts]
    return curves
