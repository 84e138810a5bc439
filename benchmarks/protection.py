"""The protection experiment: proactive base models crossed with reactive defenses, each
attacked non-adaptively and adaptively.

    python benchmarks/protection.py --preset mnist --bases standard --threads 1
    python benchmarks/protection.py --preset fashion-mnist --bases standard pgd trades
    python benchmarks/protection.py --preset mnist --defenses none lid --limit 100

Base models are the shipped training presets' runs (``advkit.training`` presets, trained
exactly as ``advkit train --defense NAME --preset PRESET`` and benchmarks/defenses.py do, in
``--runs/PRESET-NAME``). A base whose run is not finished is skipped with a note: this
script never starts an adversarial training (MagNet's small autoencoder is the one model
it trains itself, about a minute, in ``--runs/PRESET-magnet_ae``).

Each base model is wrapped in each reactive defense (an :class:`advkit.defenses.Protected`
pipeline): none, input transforms (bit depth, median, JPEG, total-variation minimisation,
MagNet's reformer with its detector) and detectors (feature squeezing, LID, Mahalanobis, a
binary detector network), and, where ART is installed, ART's versions of the transforms
(``art-*``) beside ours. Detectors fit on training images: ``--fit`` clean ones and, for
those that learn from adversarial images (LID, Mahalanobis, the binary detector),
``--fit-adv`` PGD images (20 steps at the preset's eps) of other training images; each
threshold flags 5% of held-out clean training images. Every pipeline is then measured on
the first ``--limit`` test images (``advkit.defenses.measure``) against FGSM, PGD (40
steps) and C&W Linf crafted on the base model alone (the attacker ignores the defense),
and against the adaptive suite (``get_suite("adaptive", pipeline)``: APGD-CE and APGD-DLR
through the transforms' BPDA approximations, then the detector-aware orthogonal-PGD
stages). Rows are cached per (base, defense, attack) in ``protection.json`` of the base's
run folder, keyed by the weights' fingerprint and every setting: a rerun that adds one
defense measures only that one. The section ``Protection, PRESET`` of RESULTS.md is
rewritten, and an HTML report (``--html``) with the tables and a plot of robust accuracy,
non-adaptive against adaptive, per defense.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import _device_name, _source_state  # noqa: E402
from evaluate import markers, write_section  # noqa: E402

import advkit  # noqa: E402
from advkit._files import atomic_write  # noqa: E402
from advkit.attacks import PGD, Square  # noqa: E402
from advkit.defenses import (  # noqa: E402
    JPEG,
    LID,
    REJECT,
    Adaptive,
    BinaryDetector,
    BitDepth,
    FeatureSqueezing,
    MagNetDetector,
    Mahalanobis,
    MedianSmoothing,
    Protected,
    Reformer,
    TotalVariation,
    Transform,
)
from advkit.defenses.measure import (  # noqa: E402
    OBLIVIOUS_ATTACKS,
    SOTA_ROBUST_ACCURACY,
    adaptive_examples,
    measure_protection,
    oblivious_examples,
)
from advkit.evaluation.suites import (  # noqa: E402
    ADAPTIVE_EOT,
    DETECTOR_STAGES,
    SQUARE_QUERIES,
)
from advkit.models import read_metadata  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402
from advkit.training import PRESETS, get_preset, resolve, train_defense  # noqa: E402

DEFAULT_RUNS = Path.home() / ".cache" / "advkit" / "recipes"
BASES = ("standard", "pgd", "trades")
OURS = ("none", "bitdepth", "median", "jpeg", "tvm", "magnet", "squeeze", "lid", "mahalanobis",
        "binary")
ART = ("art-bitdepth", "art-median", "art-jpeg", "art-tvm", "art-binary")
#: "adaptive+square": the adaptive suite, then Square (1,000 queries, no gradients) on the
#: images it did not get past the pipeline: for a detector-only pipeline the first
#: gradient-free attack (the suite has none), for one with transforms a second Square run
#: (another seed) after the suite's own; where it lowers the figure, the suite had not
#: converged (on the MNIST PGD-trained preset it did, by 1.5-4.5 points behind median,
#: JPEG and TVM attacked through BPDA with the identity).
ATTACKS = (*OBLIVIOUS_ATTACKS, "adaptive", "adaptive+square")
#: Defenses too slow for the whole run, and the test images they are measured on instead
#: (the first ones of --limit): ART's TotalVarMin solves an L-BFGS-B problem per image and
#: call, 0.9 s per MNIST image on one busy CPU thread, so one pass over 200 images takes 3
#: minutes and the adaptive suite (hundreds of passes) hours. They get the non-adaptive
#: attacks only, unless --slow (then every attack, on all --limit images).
SLOW = {"art-tvm": 50}
SLOW_ADAPTIVE = tuple(SLOW)
#: How each defense is configured, per preset (recorded in the section and the cache key).
#: MNIST follows the papers' MNIST settings where they exist (Xu et al.: 1-bit squeezing, a
#: 2x2 median for feature squeezing; our median transform takes odd windows only, so 3x3);
#: Fashion-MNIST keeps 4 bits (1 bit erases most garments' texture).
SETTINGS = {
    "mnist": {"bits": 1, "squeeze_bits": 1, "median": 3, "jpeg": 75, "tv_weight": 0.1},
    "fashion-mnist": {"bits": 4, "squeeze_bits": 4, "median": 3, "jpeg": 75, "tv_weight": 0.1},
}
AUTOENCODER = {"train_limit": 20000, "epochs": 3, "batch_size": 32, "lr": 0.03, "noise": 0.1,
               "seed": 0}


def describe(defense: str, s: dict) -> str:
    """The defense's configuration in words (the section's table and the cache key)."""
    return {
        "none": "the base model alone",
        "bitdepth": f"BitDepth({s['bits']}); BPDA identity",
        "median": f"MedianSmoothing({s['median']}); BPDA identity",
        "jpeg": f"JPEG(quality={s['jpeg']}) via Pillow; BPDA differentiable-jpeg",
        "tvm": f"TotalVariation(weight={s['tv_weight']}, steps=20, keep=1); differentiable",
        "magnet": "Reformer(magnet_ae) + MagNetDetector(error, l1); differentiable",
        "squeeze": f"FeatureSqueezing(bits={s['squeeze_bits']}, median=2)",
        "lid": "LID(k=20, batch=200, references=2), every ReLU and the logits",
        "mahalanobis": "Mahalanobis(every ReLU, ledoit_wolf, noise 0), logistic ensemble",
        "binary": "BinaryDetector(input, width 16, 10 epochs)",
        "art-bitdepth": f"ART FeatureSqueezing(bit_depth={s['bits']}); BPDA identity",
        "art-median": f"ART SpatialSmoothing(window_size={s['median']}); BPDA identity",
        "art-jpeg": f"ART JpegCompression(quality={s['jpeg']}); BPDA differentiable-jpeg",
        "art-tvm": "ART TotalVarMin(prob=1, lamb=0.5, L-BFGS-B, 10 iterations); BPDA identity",
        "art-binary": "ART BinaryInputDetector(our network, width 16), ART's fit, 10 epochs",
    }[defense]


class ArtTransform(Transform):
    """An ART preprocessor as an advkit transform (numpy round trip on the CPU), attacked
    through BPDA with the identity, as ours are."""

    adaptive = Adaptive("bpda", "identity")

    def __init__(self, preprocessor: object) -> None:
        super().__init__()
        self.preprocessor = preprocessor
        self._last: tuple[bytes, Tensor] | None = None

    def _transform(self, x: Tensor) -> Tensor:
        # The benchmark passes the same batch several times (predict, metrics): the last
        # result is kept (ART's transforms here are deterministic).
        data = x.detach().cpu().numpy()
        if self._last is None or self._last[0] != data.tobytes():
            out, _ = self.preprocessor(data)
            self._last = (data.tobytes(), torch.from_numpy(out).clamp(0, 1))
        return self._last[1].to(device=x.device, dtype=x.dtype)


class ArtJpeg(ArtTransform):
    """ART's JPEG attacked as ours is: BPDA through advkit's differentiable JPEG, so the two
    rows differ in the forward pass only."""

    adaptive = Adaptive("bpda", "differentiable-jpeg")

    def __init__(self, preprocessor: object, quality: int) -> None:
        super().__init__(preprocessor)
        self.ours = JPEG(quality)

    def approximation(self, x: Tensor) -> Tensor:
        return self.ours.approximation(x)


def art_transform(defense: str, s: dict) -> Transform:
    from art.defences import preprocessor as pre

    clip = (0.0, 1.0)
    made = {
        "art-bitdepth": lambda: pre.FeatureSqueezing(clip_values=clip, bit_depth=s["bits"]),
        "art-median": lambda: pre.SpatialSmoothing(window_size=s["median"],
                                                   channels_first=True, clip_values=clip),
        "art-jpeg": lambda: pre.JpegCompression(clip_values=clip, quality=s["jpeg"],
                                                channels_first=True),
        "art-tvm": lambda: pre.TotalVarMin(prob=1.0, norm=2, lamb=0.5, solver="L-BFGS-B",
                                           max_iter=10, clip_values=clip, verbose=False),
    }[defense]()
    return ArtJpeg(made, s["jpeg"]) if defense == "art-jpeg" else ArtTransform(made)


class ArtBinary(BinaryDetector):
    """ART's BinaryInputDetector (Metzen et al. on the input) beside ours: the same detector
    network, trained by ART (``PyTorchClassifier.fit``: Adam, cross-entropy over two
    classes, no class weights, batches of 64, 10 epochs) instead of by advkit's loop. Its
    score is the network's "adversarial" logit, so the adaptive suite differentiates it as
    it does ours."""

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor | None, x_adv: Tensor | None) -> None:
        import numpy as np
        from art.defences.detector.evasion import BinaryInputDetector
        from art.estimators.classification import PyTorchClassifier

        from advkit.defenses.binary_detector import _network

        assert x_adv is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network = _network(x[:1000], self.width)
        # ART's classifiers are multi-class: a constant 0 beside the logit makes its
        # two-class cross-entropy the binary cross-entropy of the logit.
        two = nn.Sequential(network, _ZeroBeside())
        classifier = PyTorchClassifier(
            model=two, loss=nn.CrossEntropyLoss(),
            optimizer=torch.optim.Adam(two.parameters(), lr=self.lr),
            input_shape=tuple(x.shape[1:]), nb_classes=2, clip_values=(0.0, 1.0),
            device_type="cpu")
        inputs = torch.cat([x, x_adv]).numpy()
        labels = np.eye(2, dtype=np.float32)[np.r_[np.zeros(len(x), int), np.ones(len(x_adv), int)]]
        BinaryInputDetector(classifier).fit(inputs, labels, batch_size=self.train_batch_size,
                                            nb_epochs=self.epochs)
        self._network = network.eval().requires_grad_(False)


class _ZeroBeside(nn.Module):
    def forward(self, z: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(z), z], dim=1)


def relu_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]


def build(defense: str, model: nn.Module, s: dict, autoencoder: Callable[[], nn.Module],
          ) -> Protected:
    """The (unfitted) pipeline of ``defense`` around ``model``."""
    if defense == "none":
        return Protected(model)
    if defense.startswith("art-") and defense != "art-binary":
        return Protected(model, [art_transform(defense, s)])
    transforms = {"bitdepth": lambda: BitDepth(s["bits"]),
                  "median": lambda: MedianSmoothing(s["median"]),
                  "jpeg": lambda: JPEG(s["jpeg"]),
                  "tvm": lambda: TotalVariation(weight=s["tv_weight"], steps=20)}
    if defense in transforms:
        return Protected(model, [transforms[defense]()])
    if defense == "magnet":
        ae = autoencoder()
        return Protected(model, [Reformer(ae)], [MagNetDetector(ae)])
    detector = {"squeeze": lambda: FeatureSqueezing(bits=s["squeeze_bits"], median=2),
                "art-binary": lambda: ArtBinary(),
                "lid": lambda: LID(),
                "mahalanobis": lambda: Mahalanobis(layers=relu_layers(model)),
                "binary": lambda: BinaryDetector()}[defense]()
    return Protected(model, detectors=[detector])


def run_finished(run_dir: Path, settings: dict) -> tuple[bool, str]:
    """Whether the training run in ``run_dir`` finished (all epochs, or stopped early)."""
    checkpoint = run_dir / "model.safetensors"
    if not checkpoint.is_file():
        return False, f"no checkpoint in {run_dir}"
    try:
        meta = read_metadata(checkpoint)
        history = meta.get("history", "[]")
        history = ast.literal_eval(history) if isinstance(history, str) else history
    except Exception as err:  # a checkpoint being written now
        return False, f"{checkpoint} unreadable now ({err})"
    if meta.get("stopped"):
        return True, ""
    epochs = int(settings.get("epochs", 0))
    if len(history) < epochs:
        return False, f"{len(history)} of {epochs} epochs trained so far"
    return True, ""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Cache:
    """Rows per (base, defense, attack) in the base run's protection.json, each under a key
    of everything that decides it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.rows = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            self.rows = {}

    def get(self, key: dict) -> dict | None:
        return self.rows.get(json.dumps(key, sort_keys=True))

    def put(self, key: dict, row: dict) -> None:
        self.rows[json.dumps(key, sort_keys=True)] = row
        atomic_write(self.path, json.dumps(self.rows, indent=1))


def measure_base(args: argparse.Namespace, base: str, log: Callable[[str], None]) -> list[dict]:
    preset = get_preset(args.preset)
    s = SETTINGS[args.preset]
    settings = resolve(base, args.preset, {"seed": args.seed})
    run_dir = args.runs / f"{args.preset}-{base}"
    result = train_defense(base, settings, run_dir, progress=False, log=log)
    model = result.model.eval()
    fingerprint = read_metadata(result.checkpoint).get("fingerprint")
    threat = ThreatModel(preset.norm, preset.eps)
    reference = SOTA_ROBUST_ACCURACY.get((preset.dataset, preset.norm, preset.eps / 2))
    cache = Cache(run_dir / "protection.json")
    x, y = advkit.data.load(preset.dataset, split="test", limit=args.limit)

    memo: dict[str, object] = {}

    def fit_data() -> tuple[Tensor, Tensor, Tensor]:
        if "fit" not in memo:
            xt, yt = advkit.data.load(preset.dataset, split="train",
                                      limit=args.fit + args.fit_adv)
            t0 = time.perf_counter()
            adv = PGD(threat, steps=20, seed=args.seed)(model, xt[args.fit:],
                                                        yt[args.fit:]).x_adv
            log(f"{base}: PGD fit images ({args.fit_adv}) in {time.perf_counter() - t0:.0f} s")
            memo["fit"] = (xt[:args.fit], yt[:args.fit], adv)
        return memo["fit"]

    def oblivious() -> dict:
        if "oblivious" not in memo:
            memo["oblivious"] = oblivious_examples(model, x, y, threat, seed=args.seed)
            log(f"{base}: oblivious attacks crafted: " + ", ".join(
                f"{k} {v[1]:.0f} s" for k, v in memo["oblivious"].items()))
        return memo["oblivious"]

    def autoencoder() -> nn.Module:
        if "ae" not in memo:
            from advkit.defenses.magnet import train_autoencoder
            done = train_autoencoder(preset.dataset, args.runs / f"{args.preset}-magnet_ae",
                                     progress=False, log=log, **AUTOENCODER)
            memo["ae"] = done.model.eval()
            memo["ae_mse"] = done.history[-1].get("val_mse") if done.history else None
        return memo["ae"]

    rows = []
    for defense in args.defenses:
        config = describe(defense, s)
        key_of = lambda attack, d=defense, c=config: {  # noqa: E731
            "fingerprint": fingerprint, "defense": d, "config": c, "attack": attack,
            "limit": args.limit, "fit": args.fit, "fit_adv": args.fit_adv, "seed": args.seed,
            "norm": preset.norm, "eps": preset.eps, "reference": reference, "measure": 2,
            "n": SLOW.get(d, args.limit) if not args.slow else args.limit,
            # An adaptive row is only as good as the suite that made it: a changed suite
            # measures again.
            **({"stages": [st.to_dict() for st in DETECTOR_STAGES], "eot": ADAPTIVE_EOT,
                "square": SQUARE_QUERIES} if attack.startswith("adaptive") else {})}
        attacks = [a for a in args.attacks
                   if not (a.startswith("adaptive") and defense in SLOW_ADAPTIVE
                           and not args.slow)]
        todo = [a for a in attacks if cache.get(key_of(a)) is None]
        cached = [a for a in attacks if a not in todo]
        for a in cached:
            rows.append(cache.get(key_of(a)) | {"reused": True})
        if cached:
            log(f"{base} / {defense}: reusing {', '.join(cached)}")
        if not todo:
            continue
        n = SLOW.get(defense, args.limit) if not args.slow else args.limit
        xd, yd = x[:n], y[:n]
        pipeline = build(defense, model, s, autoencoder)
        t0 = time.perf_counter()
        if pipeline.detectors:
            x_fit, y_fit, adv_fit = fit_data()
            t0 = time.perf_counter()
            for d in pipeline.detectors:
                d.fit(model, x_fit, y_fit, fpr=0.05,
                      x_adv=adv_fit if getattr(d, "needs_adversarial", False)
                      or isinstance(d, Mahalanobis) else None)
        fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            pipeline.predict(xd)
        predict_ms = (time.perf_counter() - t0) / len(xd) * 1000
        adaptive_memo: list[tuple[Tensor, float]] = []

        def adaptive(pipeline: Protected = pipeline, memo: list = adaptive_memo,
                     xd: Tensor = xd, yd: Tensor = yd) -> tuple[Tensor, float]:
            if not memo:
                t0 = time.perf_counter()
                x_adv = adaptive_examples(pipeline, xd, yd, threat, seed=args.seed)
                memo.append((x_adv, time.perf_counter() - t0))
            return memo[0]

        for attack in todo:
            if attack == "adaptive":
                x_adv, seconds = adaptive()
            elif attack == "adaptive+square":
                x_adv, seconds = adaptive()
                x_adv = x_adv.clone()
                t0 = time.perf_counter()
                with torch.no_grad():  # still defended: right when clean, and rejected or right
                    adv_pred, clean_pred = pipeline.predict(x_adv), pipeline.predict(xd)
                left = torch.nonzero((clean_pred == yd) & ((adv_pred == yd) | (adv_pred == REJECT))
                                     ).flatten()
                if len(left):
                    found = Square(threat, n_queries=SQUARE_QUERIES, seed=args.seed)(
                        pipeline, xd[left], yd[left])
                    hit = left[found.success.cpu()]
                    x_adv[hit] = found.x_adv[found.success.cpu()]
                seconds += time.perf_counter() - t0
            else:
                x_adv, seconds = oblivious()[attack]
                x_adv = x_adv[:n]
            (measured,) = measure_protection(pipeline, xd, yd, {attack: x_adv},
                                             reference=reference)
            row = {"base": base, "defense": defense, "config": config,
                   **measured.to_dict(), "attack_seconds": seconds,
                   "fit_seconds": fit_seconds, "predict_ms_per_image": predict_ms,
                   "held_out_fpr": ", ".join(f"{d.held_out_fpr:.3f}"
                                             for d in pipeline.detectors) or None,
                   "measured": f"{_now()}, source {args.source}"}
            cache.put(key_of(attack), row)
            rows.append(row | {"reused": False})
            log(f"{base} / {defense} / {attack}: clean {row['clean_accuracy']:.1%}, FR "
                f"{row['false_rejection']:.1%}, robust {row['robust_accuracy']:.1%}, AUROC "
                f"{row['auroc']:.3f}, TPR {row['tpr']:.1%} ({seconds:.0f} s)")
    return rows


def pct(v: object) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"


def num(v: object, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def grouped(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        out.setdefault((r["base"], r["defense"]), {})[r["attack"]] = r
    return out


def section(args: argparse.Namespace, rows: list[dict], skipped: list[str], started: float,
            notes: list[str]) -> str:
    preset = get_preset(args.preset)
    begin, end = markers(args.preset, "protection.py")
    reference = SOTA_ROBUST_ACCURACY.get((preset.dataset, preset.norm, preset.eps / 2))
    reused = sorted({f"{r['base']}/{r['defense']}" for r in rows if r.get("reused")})
    versions = [f"torch {torch.__version__}", f"advkit {advkit.__version__}"]
    try:
        versions.append(f"ART {importlib.metadata.version('adversarial-robustness-toolbox')}")
    except importlib.metadata.PackageNotFoundError:
        pass
    lines = [
        begin,
        f"## Protection, {preset.description}: reactive defenses, non-adaptive and adaptive "
        f"attacks, {args.limit} test images",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {_now()}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- python {platform.python_version()}, {', '.join(versions)}; source {args.source}",
        f"- run time {time.perf_counter() - started:.0f} s (reused rows take none); 1-minute "
        f"load average {args.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        f"- data: {preset.dataset} test[:{args.limit}]" + (
            f" from ADVKIT_DATA_DIR={os.environ['ADVKIT_DATA_DIR']}"
            if os.environ.get("ADVKIT_DATA_DIR") else "")
        + f"; detectors fit on train[:{args.fit}] "
        f"clean and PGD-20 images of train[{args.fit}:{args.fit + args.fit_adv}], thresholds "
        f"at 5% FPR on a held-out fifth (all of them for detectors that learn nothing)",
        f"- threat: {preset.norm} eps {preset.eps}; Tramer's reference at eps/2 = "
        f"{preset.eps / 2:g}: {pct(reference)} (advkit.defenses.measure.SOTA_ROBUST_ACCURACY, "
        "sources there)",
        "- attacks: FGSM, PGD (40 steps), C&W Linf (capped at eps) crafted on the base model "
        "alone; adaptive = the `adaptive` suite against the pipeline: APGD-CE and APGD-DLR "
        "through each transform as it declares (BPDA with the identity for bit depth and "
        "median, BPDA through a differentiable JPEG, the TV solver and MagNet's reformer "
        "differentiated as they are), then the orthogonal-PGD stages where there are "
        f"detectors, then Square ({SQUARE_QUERIES} queries) where there are transforms, each "
        "stage on the images the earlier ones did not get past the pipeline; adaptive + "
        f"Square: a second Square run ({SQUARE_QUERIES} queries, another seed) on the images "
        "still defended, a check that the suite's figure has converged",
        "- clean: accepted and right; FR: clean images rejected; robust: right when clean "
        "and the adversarial image rejected or still right (a share of all images); det: "
        "the rejected part of robust; AUROC / TPR: detectors' combined score (max of score "
        "minus threshold), clean test images against the adversarial images that fool the "
        "base model on the raw image (as detection papers count them); TPR at the fitted "
        "thresholds; Tramer: robust accuracy at eps is the implied classifier's at eps/2, "
        "FLAG where it beats the reference; adaptive - none: the adaptive robust accuracy "
        "above the undefended base model's",
        "",
    ]
    for note in skipped + notes:
        lines.append(f"- **note**: {note}")
    if skipped or notes:
        lines.append("")
    if reused:
        lines += ["- rows reused from earlier runs (cached in the base run's protection.json, "
                  "same weights and settings; their dates are in the JSON): "
                  + ", ".join(reused), ""]
    groups = grouped(rows)
    lines += [
        "### Robust accuracy, non-adaptive against adaptive",
        "",
        "| base | defense | clean | FR | FGSM | PGD | C&W | adaptive | adaptive + Square | "
        "adaptive det | adaptive - none |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (base, defense), by in groups.items():
        first = next(iter(by.values()))
        none = groups.get((base, "none"), {}).get("adaptive")
        ad = by.get("adaptive")
        gain = (f"{ad['robust_accuracy'] - none['robust_accuracy']:+.1%}"
                if ad and none else "–")
        lines.append(
            f"| {base} | {defense} | {pct(first['clean_accuracy'])} | "
            f"{pct(first['false_rejection'])} | "
            + " | ".join(pct(by[a]["robust_accuracy"]) if a in by else "–"
                         for a in ATTACKS)
            + f" | {pct(ad['detected']) if ad else '–'} | {gain} |")
    lines += [
        "",
        "### Detection: AUROC / TPR at 5% FPR per attack, and Tramer's check",
        "",
        "| base | defense | held-out FPR | FGSM | PGD | C&W | adaptive | adaptive + Square | "
        "implied at eps/2 (worst non-adaptive) | Tramer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (base, defense), by in groups.items():
        first = next(iter(by.values()))
        if first.get("held_out_fpr") is None:
            continue
        cells = [f"{num(by[a]['auroc'], '.3f')} / {pct(by[a]['tpr'])}" if a in by else "–"
                 for a in ATTACKS]
        non_adaptive = [by[a] for a in OBLIVIOUS_ATTACKS if a in by]
        worst = min(non_adaptive, key=lambda r: r["robust_accuracy"]) if non_adaptive else None
        flags = [a for a in ATTACKS if a in by and by[a]["tramer_flag"]]
        lines.append(
            f"| {base} | {defense} | {first['held_out_fpr']} | " + " | ".join(cells)
            + f" | {pct(worst['implied_robust_accuracy_at_half_eps']) if worst else '–'} | "
            + ("FLAG (" + ", ".join(flags) + ")" if flags else "ok") + " |")
    lines += [
        "",
        "### Cost and configuration",
        "",
        "| base | defense | configuration | fit s | predict ms/image | adaptive s | "
        "adaptive + Square s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for (base, defense), by in groups.items():
        first = next(iter(by.values()))
        ad, sq = by.get("adaptive"), by.get("adaptive+square")
        lines.append(f"| {base} | {defense} | {first['config']} | {first['fit_seconds']:.1f} | "
                     f"{first['predict_ms_per_image']:.2f} | "
                     f"{num(ad['attack_seconds'], '.0f') if ad else '–'} | "
                     f"{num(sq['attack_seconds'], '.0f') if sq else '–'} |")
    oblivious = {a: r["attack_seconds"] for r in rows for a in OBLIVIOUS_ATTACKS
                 if r["attack"] == a and r["defense"] == "none"}
    if oblivious:
        lines += ["", "Crafting the non-adaptive attacks on the base model (once per base, "
                  "shared by every defense): " + ", ".join(
                      f"{a} {s:.0f} s" for a, s in oblivious.items()) + "."]
    lines.append(end)
    return "\n".join(lines) + "\n"


def plot_svg(rows: list[dict]) -> str:
    """Bars per (base, defense): robust accuracy against the worst non-adaptive attack and
    against the adaptive suite. Inline SVG."""
    import matplotlib
    from matplotlib.figure import Figure

    groups = grouped(rows)
    labels, worst, adaptive = [], [], []
    for (base, defense), by in groups.items():
        non = [by[a]["robust_accuracy"] for a in OBLIVIOUS_ATTACKS if a in by]
        labels.append(f"{base}/{defense}")
        worst.append(min(non) if non else float("nan"))
        last = by.get("adaptive+square", by.get("adaptive"))
        adaptive.append(last["robust_accuracy"] if last else float("nan"))
    figure = Figure(figsize=(max(6.0, 0.55 * len(labels) + 2), 4.2), layout="constrained")
    axes = figure.add_subplot()
    pos = range(len(labels))
    axes.bar([p - 0.2 for p in pos], worst, 0.4, label="worst non-adaptive (FGSM, PGD, C&W)",
             color="#4c78a8")
    axes.bar([p + 0.2 for p in pos], adaptive, 0.4, label="adaptive suite (+ Square)",
             color="#e45756")
    axes.set_xticks(list(pos), labels, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("robust accuracy")
    axes.set_ylim(0, 1.02)
    axes.legend(frameon=False)
    axes.grid(True, axis="y", color="#d0d4da", linewidth=0.8)
    axes.set_axisbelow(True)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "advkit"}):
        figure.savefig(buffer, format="svg",
                       metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    # As advkit.report's own plots: no prolog, no namespace URLs, scaled by its viewBox.
    svg = buffer.getvalue()
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg[svg.index("<svg"):])
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    return re.sub(r'\s+(width|height)="[^"]*pt"', "", svg, count=2)


def write_report(args: argparse.Namespace, rows: list[dict], notes: list[str]) -> Path:
    from advkit.report import write_html_report

    preset = get_preset(args.preset)
    # Row key -> column name; the report shows a column whose name ends in "acc" or "rate"
    # as a percentage, so every share of images is named so.
    columns = {"base": "base", "defense": "defense", "attack": "attack",
               "clean_accuracy": "clean_acc", "false_rejection": "false_rejection_rate",
               "robust_accuracy": "robust_acc", "detected": "detected_rate",
               "correct_accepted": "right_and_accepted_rate", "auroc": "auroc",
               "tpr": "true_positive_rate", "implied_robust_accuracy_at_half_eps":
               "implied_at_half_eps_acc", "tramer_flag": "tramer", "attack_seconds": "seconds"}
    summary = [{name: ("FLAG" if r[k] else "ok") if k == "tramer_flag" else r[k]
                for k, name in columns.items()} for r in rows]
    path = write_html_report(
        args.html, title=f"advkit protection experiment: {preset.description}",
        summary=summary, curves={}, gallery=[],
        environment={"command": " ".join(sys.argv), "date": _now(), "source": args.source,
                     "torch threads": torch.get_num_threads(), "limit": args.limit},
        notes=notes)
    figure = (f'<section id="curves"><h2>Robust accuracy: worst non-adaptive attack against '
              f'the adaptive suite</h2><figure class="plot">{plot_svg(rows)}<figcaption>Per '
              f'base model and defense, the share of {args.limit} test images still defended '
              f'(right when clean, and the adversarial image rejected or right).'
              f'</figcaption></figure></section>')
    text = path.read_text()
    text = re.sub(r'<section id="curves">.*?</section>', lambda _: figure, text, count=1,
                  flags=re.S)
    path.write_text(text)
    return path


def reference(args: argparse.Namespace) -> int:
    """Print each finished base model's robust accuracy at half the preset's eps (the
    standard suite, APGD-CE and APGD-DLR, on the first ``--reference`` test images)."""
    preset = get_preset(args.preset)
    threat = ThreatModel(preset.norm, preset.eps / 2)
    x, y = advkit.data.load(preset.dataset, split="test", limit=args.reference)
    where = _device_name(torch.device("cpu"))
    print(f"robust accuracy at {preset.norm} {threat.eps:g} (standard suite, {len(x)} test "
          f"images, {where}, {torch.get_num_threads()} thread(s), source {args.source}):")
    for base in args.bases:
        settings = resolve(base, args.preset, {"seed": args.seed})
        run_dir = args.runs / f"{args.preset}-{base}"
        finished, why = run_finished(run_dir, settings)
        if not finished:
            print(f"  {base}: skipped ({why})")
            continue
        model = train_defense(base, settings, run_dir, progress=False,
                             log=lambda _: None).model.eval()
        t0 = time.perf_counter()
        report = advkit.evaluate(model, x, y, threat, suite="standard", seed=args.seed,
                                 progress=False)
        print(f"  {base}: clean {report.clean_accuracy:.1%}, robust "
              f"{report.robust_accuracy:.1%} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


def exact_bitdepth(args: argparse.Namespace) -> int:
    """Attack bit-depth reduction without BPDA. The pipeline sees x' only through
    q(x') = round(x' * L) / L, and since rounding is monotone the quantised images an
    eps-ball reaches are exactly the box of levels [q(x - eps), q(x + eps)]: PGD on the bare
    classifier over that box (relaxed to continuous values, the margin loss, restarts),
    rounded to levels after every step, attacks the pipeline with exact gradients. Prints
    the robust accuracy left (clean right, never fooled) per base, on the first --limit
    test images."""
    preset = get_preset(args.preset)
    s = SETTINGS[args.preset]
    levels = 2 ** s["bits"] - 1
    x, y = advkit.data.load(preset.dataset, split="test", limit=args.limit)
    lo = torch.round((x - preset.eps).clamp(0, 1) * levels) / levels
    hi = torch.round((x + preset.eps).clamp(0, 1) * levels) / levels
    restarts, steps = 10, 200
    print(f"bit depth {s['bits']}, {preset.norm} eps {preset.eps}, exact box attack "
          f"({restarts} restarts x {steps} steps), {len(x)} test images, source {args.source}:")
    for base in args.bases:
        settings = resolve(base, args.preset, {"seed": args.seed})
        run_dir = args.runs / f"{args.preset}-{base}"
        if not run_finished(run_dir, settings)[0]:
            print(f"  {base}: skipped (run not finished)")
            continue
        model = train_defense(base, settings, run_dir, progress=False,
                              log=lambda _: None).model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            right = model(torch.round(x * levels) / levels).argmax(1) == y
        fooled = torch.zeros_like(right)
        generator = torch.Generator().manual_seed(args.seed)
        for restart in range(restarts):
            u = torch.rand(x.shape, generator=generator) if restart else torch.full_like(x, 0.5)
            z = lo + (hi - lo) * u
            for step in range(steps):
                z.requires_grad_(True)
                logits = model(z)
                true = logits.gather(1, y[:, None])[:, 0]
                other = logits.scatter(1, y[:, None], -math.inf).max(1).values
                (grad,) = torch.autograd.grad((other - true).sum(), z)
                with torch.no_grad():
                    size = 0.1 * (1 - step / steps) + 0.01
                    z = torch.minimum(torch.maximum(z + size * grad.sign(), lo), hi)
                    quantised = torch.round(z * levels) / levels
                    fooled |= model(quantised).argmax(1) != y
        robust = (right & ~fooled).float().mean()
        print(f"  {base}: robust {robust:.1%} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="mnist", help="mnist or fashion-mnist")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES,
                        help="base models (the preset's training recipes)")
    parser.add_argument("--defenses", nargs="+", default=None, choices=OURS + ART,
                        help="reactive defenses (default: all; ART's only where installed)")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--limit", type=int, default=200, help="test images evaluated")
    parser.add_argument("--fit", type=int, default=1000, help="clean training images "
                        "detectors fit on")
    parser.add_argument("--fit-adv", type=int, default=300, help="PGD training images for "
                        "detectors that learn from adversarial images")
    parser.add_argument("--slow", action="store_true", help="also the adaptive suite "
                        f"against {', '.join(SLOW_ADAPTIVE)} (minutes per image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS,
                        help="training runs live here (finished ones are reused)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--reference", type=int, default=0, metavar="N",
                        help="instead: each base model's robust accuracy at eps / 2 (the "
                        "standard suite, first N test images), the figure Tramer's check "
                        "needs where no published one was verified")
    parser.add_argument("--exact-bitdepth", action="store_true",
                        help="instead: attack bit depth exactly (PGD over the box of levels "
                        "the eps-ball reaches, no BPDA) and print the robust accuracy left")
    parser.add_argument("--html", type=Path, default=None,
                        help="the HTML report (default: protection-PRESET.html next to --out)")
    args = parser.parse_args(argv)
    notes: list[str] = []
    preset = get_preset(args.preset)
    args.preset = next(k for k, v in PRESETS.items() if v is preset)
    if not args.slow and "adaptive" in args.attacks and set(SLOW_ADAPTIVE) & set(
            args.defenses or ART):
        notes.append(f"{', '.join(SLOW)} (ART's TotalVarMin, about 0.9 s per image and "
                     "pass on one thread) is measured on the first "
                     + ", ".join(f"{n}" for n in SLOW.values()) + " test images and without "
                     "the adaptive suite (hundreds of passes); --slow runs everything on "
                     "all images")
    if args.html is None:
        args.html = args.out.parent / f"protection-{args.preset}.html"
    if args.defenses is None:
        args.defenses = list(OURS)
        try:
            import art  # noqa: F401
            args.defenses += list(ART)
        except ImportError:
            notes.append("ART is not installed: its transforms were left out "
                         "(scripts/install_bench.sh installs it)")
    args.load_before = os.getloadavg()[0]
    args.source = _source_state()
    torch.set_num_threads(args.threads)
    if args.reference:
        return reference(args)
    if args.exact_bitdepth:
        return exact_bitdepth(args)
    started = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []
    for base in args.bases:
        settings = resolve(base, args.preset, {"seed": args.seed})
        finished, why = run_finished(args.runs / f"{args.preset}-{base}", settings)
        if not finished:
            msg = (f"base `{base}` skipped: its training run is not finished ({why}); train it "
                   f"with `advkit train --defense {base} --preset {args.preset}` and rerun")
            print(msg, flush=True)
            skipped.append(msg)
            continue
        log = lambda m, b=base: print(f"[{b}] {m}", flush=True)  # noqa: E731
        rows += measure_base(args, base, log)
        write_section(args.out, args.preset, section(args, rows, skipped, started, notes),
                      "protection.py")
    write_section(args.out, args.preset, section(args, rows, skipped, started, notes),
                  "protection.py")
    if rows:
        print(f"wrote {write_report(args, rows, skipped + notes)}", flush=True)
    print(f"wrote the protection {args.preset} section of {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
