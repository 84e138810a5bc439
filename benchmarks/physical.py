"""Physical-world attacks: EOT's robustness to fresh transformations, and the adversarial
patch beside ART's.

    python benchmarks/physical.py                        # the RESULTS.md figure
    python benchmarks/physical.py --limit 100 --patch-steps 20 --out /tmp/RESULTS.md  # a look

1. **EOT** (Athalye et al. 2018) against PGD with the same eps, steps and step size, on
   the MNIST standard and PGD-trained presets (``~/.cache/advkit/recipes``; the test CNN
   when a preset is missing): per image the fraction of 100 fresh random transformations
   (rotation, shift, zoom, brightness; ``success_under_transforms``, a seed neither attack
   crafted with) under which the example is still misclassified, and the seconds.
   ART's EOT transformations for PyTorch (``EoTImageRotationPyTorch``) import torchvision,
   which this machine does not have; the section says so instead of a row.
2. **Adversarial patch** (Brown et al. 2017): advkit's ``AdversarialPatch`` and ART's
   ``AdversarialPatchNumpy`` (ART's PyTorch patch imports torchvision too), fitted on the
   same training images for the same target with the same number of image gradients,
   no rotation or scaling, then judged on held-out test images not of the target at 10
   random positions each. ART's patch is a disc (its circular mask) and ours a square: the
   disc's diameter is chosen so that both cover the same area. Each library's patch is
   placed by its own code (ART's ``apply_patch``, advkit's ``success``), both uniformly
   over the places it fits. A random patch of the same size is the floor.

Forward and backward passes on small CNNs only: a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import _device_name, _source_state, load_model  # noqa: E402
from evaluate import markers, write_section  # noqa: E402
from kept import now  # noqa: E402

import advkit  # noqa: E402
from advkit.attacks import EOT, PGD, AdversarialPatch  # noqa: E402
from advkit.attacks.eot import RandomTransforms, success_under_transforms  # noqa: E402
from advkit.attacks.patch import patch_side  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402

RUNS = Path.home() / ".cache" / "advkit" / "recipes"
SECTION = "physical"
SCRIPT = "physical.py"


def models(log) -> dict[str, nn.Module]:
    out = {}
    for name in ("mnist-standard", "mnist-pgd"):
        path = RUNS / name / "model.safetensors"
        if path.is_file():
            out[name] = advkit.models.load(str(path)).eval()
        else:
            log(f"no {name} preset at {path} (python benchmarks/defenses.py --preset mnist "
                f"--defenses {name.split('-')[1]}); skipped")
    if not out:
        out["small_cnn (test CNN)"] = load_model("small_cnn", torch.device("cpu"), log).eval()
    return out


def eot_rows(args, nets, x, y, log) -> list[dict]:
    rows = []
    transforms = RandomTransforms()
    for name, model in nets.items():
        with torch.no_grad():
            keep = model(x).argmax(1) == y
        xs, ys = x[keep], y[keep]
        # The transformations alone misclassify some clean images: the floor of the column.
        rate = success_under_transforms(model, xs, ys, transforms=transforms, n=100, seed=12345)
        rows.append({"model": name, "eps": 0.0, "attack": "none (clean images)", "n": len(xs),
                     "plain": 0.0, "fresh": float(rate.mean()),
                     "half": float((rate >= 0.5).float().mean()), "seconds": 0.0})
        for eps in args.eps:
            threat = ThreatModel("linf", eps)
            step = 2.5 * eps / args.eot_steps
            for label, attack in (
                    ("PGD", PGD(threat, steps=args.eot_steps, step_size=step, seed=0)),
                    (f"EOT ({args.samples} samples/step)",
                     EOT(threat, steps=args.eot_steps, step_size=step, samples=args.samples,
                         transforms=transforms, eval_transforms=0, seed=0))):
                t0 = time.perf_counter()
                result = attack(model, xs, ys)
                seconds = time.perf_counter() - t0
                rate = success_under_transforms(model, result.x_adv, ys, transforms=transforms,
                                                n=100, seed=12345)
                rows.append({"model": name, "eps": eps, "attack": label, "n": len(xs),
                             "plain": float(result.success.float().mean()),
                             "fresh": float(rate.mean()),
                             "half": float((rate >= 0.5).float().mean()),
                             "seconds": seconds})
                log(f"EOT table: {name} eps {eps} {label}: fooled {rows[-1]['plain']:.1%}, "
                    f"fresh transforms {rows[-1]['fresh']:.1%} ({seconds:.1f} s)")
    return rows


def art_patch(model, x_train, target, side, gradients, lr, seed):
    from art.attacks.evasion import AdversarialPatchNumpy
    from art.estimators.classification import PyTorchClassifier
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(),
                                   input_shape=tuple(x_train.shape[1:]), nb_classes=10,
                                   clip_values=(0.0, 1.0), device_type="cpu")
    # ART 1.20's AdversarialPatchNumpy accepts only a Python float as the patch's initial
    # value, and the classifier's float32 clip values give it a numpy.float32
    # (AttributeError 'patch'); float64 ones give it a float subclass, then everything
    # goes back to float32 (the model's dtype).
    classifier._clip_values = np.array([0.0, 1.0], dtype=np.float64)
    h = x_train.shape[-1]
    # ART pastes a disc (its circular mask) whose diameter is scale * side of the image:
    # the same area as advkit's side x side square.
    scale = side * math.sqrt(4 / math.pi) / h
    per_iter = min(len(x_train), 320)
    attack = AdversarialPatchNumpy(classifier, target=target, rotation_max=0.0,
                                   scale_min=scale, scale_max=scale, learning_rate=lr,
                                   max_iter=max(1, gradients // per_iter), batch_size=32,
                                   verbose=False)
    classifier._clip_values = np.array([0.0, 1.0], dtype=np.float32)
    attack.patch = attack.patch.astype(np.float32)
    np.random.seed(seed)
    xs = x_train[:per_iter].numpy()
    t0 = time.perf_counter()
    patch, _ = attack.generate(xs, y=np.full(len(xs), target))
    return attack, patch, scale, time.perf_counter() - t0


def art_success(attack, patch, scale, model, x, y, target, positions, seed) -> float:
    keep = y != target
    xs = x[keep].numpy()
    np.random.seed(seed)
    hits = 0
    for _ in range(positions):
        patched = torch.from_numpy(attack.apply_patch(xs, scale=scale, patch_external=patch))
        with torch.no_grad():
            hits += int((model(patched.float()).argmax(1) == target).sum())
    return hits / (len(xs) * positions)


def patch_rows(args, model, x_train, x, y, log) -> list[dict]:
    rows = []
    for area in args.areas:
        side = patch_side(area, 28, 28)
        gradients = args.patch_steps * 32
        ours = AdversarialPatch(args.target, area=area, steps=args.patch_steps, batch_size=32,
                                lr=0.1, seed=0)
        fitted = ours.fit(model, x_train)
        rows.append({"area": area, "side": side, "who": "advkit AdversarialPatch (lr 0.1)",
                     "success": ours.success(model, x, y, fitted, positions=10, seed=1),
                     "gradients": fitted.backward_passes, "seconds": fitted.seconds})
        log(f"patch {area}: advkit {rows[-1]['success']:.1%} ({fitted.seconds:.1f} s)")
        random = torch.rand(fitted.patch.shape,
                            generator=torch.Generator().manual_seed(0))
        rows.append({"area": area, "side": side, "who": "random patch (floor)",
                     "success": ours.success(model, x, y, random, positions=10, seed=1),
                     "gradients": 0, "seconds": 0.0})
        for lr in args.art_lr:
            try:
                attack, patch, scale, seconds = art_patch(model, x_train, args.target, side,
                                                          gradients, lr, seed=0)
            except ImportError as err:
                log(f"ART's patch did not import: {err}")
                break
            rows.append({"area": area, "side": side,
                         "who": f"ART AdversarialPatchNumpy (lr {lr:g}, disc)",
                         "success": art_success(attack, patch, scale, model, x, y,
                                                args.target, 10, seed=1),
                         "gradients": attack.max_iter * min(len(x_train), 320),
                         "seconds": seconds})
            log(f"patch {area}: ART lr {lr:g} {rows[-1]['success']:.1%} ({seconds:.1f} s)")
    return rows


def section(args, eot, patches, patch_model, started) -> str:
    begin, end = markers(SECTION, SCRIPT)
    import art
    lines = [
        begin,
        "## Physical-world attacks: EOT under fresh transformations, the adversarial patch "
        "beside ART's",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {now()}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, ART "
        f"{art.__version__}, advkit {advkit.__version__}, source {args.source}",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{args.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "",
        f"**EOT against PGD**, MNIST test[:{args.limit}] correctly classified, Linf, "
        f"{args.eot_steps} steps of 2.5 eps / steps each, EOT with {args.samples} "
        "transformations per image per step (`RandomTransforms()`: rotation +-15 degrees, "
        "shift +-10%, zoom 0.9-1.1, brightness +-0.1). fooled: misclassified as crafted; "
        "fresh: mean share of 100 fresh transformations (seed 12345, used by neither attack) "
        "still misclassified; >= half: images fooled under at least half of them. ART's "
        "EOT for PyTorch (`EoTImageRotationPyTorch`) imports torchvision, which is not "
        "installed here (no usable build for this torch), so it has no row.",
        "",
        "| model | eps | attack | images | fooled | fresh | >= half | seconds |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
        *[f"| {r['model']} | {r['eps']:g} | {r['attack']} | {r['n']} | {r['plain']:.1%} | "
          f"{r['fresh']:.1%} | {r['half']:.1%} | {r['seconds']:.1f} |" for r in eot],
        "",
        f"**Adversarial patch**, model {patch_model}, target class {args.target}, fitted on "
        f"MNIST train[:{len(args.x_train)}] (advkit: {args.patch_steps} Adam steps of 32 "
        "random images; ART: full passes over 320 of them, as many image gradients), judged "
        f"on the test[:{args.limit}] images not of class {args.target}, 10 random positions "
        "each. ART's default learning rate is 5.0 (for [0, 255] images); the rows give the "
        "rates tried.",
        "",
        "| area | patch | attack | targeted success | image gradients | seconds |",
        "|---:|---|---|---:|---:|---:|",
        *[f"| {r['area']:g} | {r['side']}x{r['side']} square or a disc of that area | "
          f"{r['who']} | {r['success']:.1%} | {r['gradients']:,} | {r['seconds']:.1f} |"
          for r in patches],
        end,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="test images")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--eot-steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--areas", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--patch-steps", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--art-lr", type=float, nargs="+", default=[5.0, 0.05])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.patch_steps < 1 or args.train_images < 32:
        parser.error("need --limit >= 1, --patch-steps >= 1, --train-images >= 32")
    torch.set_num_threads(args.threads)
    args.source, args.load_before = _source_state(), os.getloadavg()[0]
    started = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    x, y = advkit.data.load("mnist", split="test", limit=args.limit)
    args.x_train, _ = advkit.data.load("mnist", split="train", limit=args.train_images)
    nets = models(log)
    eot = eot_rows(args, nets, x, y, log)
    patch_model = next(iter(nets))
    patches = patch_rows(args, nets[patch_model], args.x_train, x, y, log)
    write_section(args.out, SECTION, section(args, eot, patches, patch_model, started), SCRIPT)
    print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
