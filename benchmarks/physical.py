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
3. **RP2** (Eykholt et al. 2018): one sticker fitted over ``--rp2-train`` training pictures
   of the object class (``--rp2-object``) for the target, its mask found by the L1 pass
   (pixels, or 4x4 squares) or given (a centred square of the same area), judged on the
   test pictures of that class under 100 fresh transformations (seed 12345); the unstuck
   pictures and a random sticker in the found mask are the floors. Then RP2 as an attack,
   one sticker per image, on ``--rp2-images`` test images (target: the next class). ART
   1.20 has no RP2 (no RobustPhysicalPerturbations in ``art.attacks.evasion``); its
   nearest relative, ``GRAPHITEWhiteboxPyTorch`` (Feng et al. 2022), is another method
   and imports cv2: the section says so instead of a row.

The full run (estimated ~15 min on one thread: EOT ~7, RP2 ~4-6 at ~2,000 image
gradients a second on the mnist-standard preset; do not run it beside a timing benchmark):

    OMP_NUM_THREADS=1 python benchmarks/physical.py

A smoke run (~1 min):

    OMP_NUM_THREADS=1 python benchmarks/physical.py --limit 60 --eps 0.2 --eot-steps 2 \
        --samples 2 --areas 0.1 --patch-steps 2 --train-images 64 --art-lr 5.0 \
        --rp2-steps 4 --rp2-l1-steps 2 --rp2-samples 2 --rp2-train 16 --rp2-images 4 \
        --out /tmp/RESULTS.md

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
from advkit.attacks import EOT, PGD, RP2, AdversarialPatch  # noqa: E402
from advkit.attacks.eot import RandomTransforms, success_under_transforms  # noqa: E402
from advkit.attacks.patch import patch_side  # noqa: E402
from advkit.attacks.rp2 import RP2Result  # noqa: E402
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


def rp2_rows(args, model, x, y, log) -> tuple[list[dict], list[dict]]:
    """RP2 fitted over training pictures of one class (several masks, two floors), then
    RP2 as a per-image attack."""
    x_all, y_all = advkit.data.load("mnist", split="train", limit=max(args.train_images, 6000))
    pictures = x_all[y_all == args.rp2_object][:args.rp2_train]
    held_out = x[y == args.rp2_object]
    labels = torch.full((len(held_out),), args.rp2_object)
    goal = torch.full_like(labels, args.target)
    common = {"steps": args.rp2_steps, "l1_steps": args.rp2_l1_steps,
              "samples": args.rp2_samples, "seed": 0}
    fitted_rows: list[dict] = []

    def judge(attack, fitted) -> float:
        return attack.success(model, held_out, labels, fitted, n=100, seed=12345)

    base = success_under_transforms(model, held_out, labels, goal, n=100, seed=12345)
    fitted_rows.append({"who": "unstuck pictures (floor)", "mask": 0,
                        "success": float(base.mean()), "gradients": 0, "seconds": 0.0})
    for area in args.rp2_areas:
        side = patch_side(area, 28, 28)
        square = torch.zeros(28, 28, dtype=torch.bool)
        top = (28 - side) // 2
        square[top:top + side, top:top + side] = True
        for label, attack in (
                (f"RP2, found mask ({area:g} of the image, pixels)",
                 RP2(mask_area=area, **common)),
                (f"RP2, found mask ({area:g} of the image, 4x4 squares)",
                 RP2(mask_area=area, block=4, **common)),
                (f"RP2, given mask (centred {side}x{side} square)",
                 RP2(mask=square, **common))):
            fitted = attack.fit(model, pictures, args.target)
            fitted_rows.append({"who": label, "mask": int(fitted.mask.sum()),
                                "success": judge(attack, fitted),
                                "gradients": fitted.backward_passes,
                                "seconds": fitted.seconds})
            log(f"RP2 {label}: {fitted_rows[-1]['success']:.1%} ({fitted.seconds:.1f} s)")
            if "pixels" in label:
                noise = torch.rand(fitted.delta.shape,
                                   generator=torch.Generator().manual_seed(0)) * 2 - 1
                random = RP2Result(delta=noise * fitted.mask, mask=fitted.mask,
                                   target=args.target)
                fitted_rows.append({"who": "random sticker in that mask (floor)",
                                    "mask": int(fitted.mask.sum()),
                                    "success": judge(attack, random), "gradients": 0,
                                    "seconds": 0.0})
    xs, ys = x[:args.rp2_images], y[:args.rp2_images]
    targets = (ys + 1) % 10
    t0 = time.perf_counter()
    result = RP2(mask_area=args.rp2_areas[0], eval_seed=12345, **common)(
        model, xs, ys, targets=targets)
    seconds = time.perf_counter() - t0
    floor = success_under_transforms(model, xs, ys, targets, n=100, seed=12345)
    norms = result.norms[result.success]
    attack_rows = [{"who": "unstuck images (floor)", "n": len(xs), "plain": 0.0,
                    "fresh": float(floor.mean()), "l2": float("nan"), "seconds": 0.0},
                   {"who": f"RP2 per image (found mask, {args.rp2_areas[0]:g})",
                    "n": len(xs), "plain": float(result.success.float().mean()),
                    "fresh": float(result.extras["transform_success"].mean()),
                    "l2": float(norms.median()) if len(norms) else float("nan"),
                    "seconds": seconds}]
    log(f"RP2 per image: fresh {attack_rows[-1]['fresh']:.1%} ({seconds:.1f} s)")
    return fitted_rows, attack_rows


def _art_rp2_note() -> str:
    import importlib.util

    import art.attacks.evasion as evasion
    if hasattr(evasion, "RobustPhysicalPerturbations"):
        return "ART has a RobustPhysicalPerturbations class now: add its row."
    cv2 = "installed" if importlib.util.find_spec("cv2") else "not installed here"
    return ("ART has no RP2 (no RobustPhysicalPerturbations in `art.attacks.evasion`); its "
            "nearest relative, `GRAPHITEWhiteboxPyTorch` (Feng et al. 2022: a mask shrunk by "
            f"patch removal, EOT), is another method and imports cv2 ({cv2}): no ART row.")


def section(args, eot, patches, patch_model, started, rp2=None) -> str:
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
        *(_rp2_lines(args, patch_model, *rp2) if rp2 is not None else []),
        end,
    ]
    return "\n".join(lines) + "\n"


def _rp2_lines(args, patch_model, fitted, per_image) -> list[str]:
    return [
        "",
        f"**RP2** (Eykholt et al. 2018), model {patch_model}: one sticker fitted over "
        f"{args.rp2_train} MNIST training {args.rp2_object}s for target {args.target} "
        f"({args.rp2_l1_steps} L1 steps when the mask is found, then {args.rp2_steps} L2 "
        f"steps; {args.rp2_samples} transformations per picture per step, 32 pictures a "
        f"step), judged on the {args.rp2_object}s of test[:{args.limit}] under 100 fresh "
        "transformations each (seed 12345, `RandomTransforms()`). " + _art_rp2_note(),
        "",
        "| sticker | mask pixels | targeted success (fresh) | image gradients | seconds |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['who']} | {r['mask']} | {r['success']:.1%} | {r['gradients']:,} | "
          f"{r['seconds']:.1f} |" for r in fitted],
        "",
        f"RP2 as an attack, one sticker per image, test[:{args.rp2_images}], target the "
        "next class: fooled as crafted, and the mean share of 100 fresh transformations "
        "sent to the target.",
        "",
        "| attack | images | targeted (plain) | fresh | median L2 | seconds |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['who']} | {r['n']} | {r['plain']:.1%} | {r['fresh']:.1%} | "
          f"{r['l2']:.2f} | {r['seconds']:.1f} |" for r in per_image],
    ]


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
    parser.add_argument("--rp2-object", type=int, default=7, help="RP2's object class")
    parser.add_argument("--rp2-train", type=int, default=100,
                        help="training pictures of the object RP2 is fitted over")
    parser.add_argument("--rp2-areas", type=float, nargs="+", default=[0.1])
    parser.add_argument("--rp2-steps", type=int, default=200)
    parser.add_argument("--rp2-l1-steps", type=int, default=100)
    parser.add_argument("--rp2-samples", type=int, default=8)
    parser.add_argument("--rp2-images", type=int, default=100,
                        help="test images of RP2 as a per-image attack")
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
    rp2 = rp2_rows(args, nets[patch_model], x, y, log)
    write_section(args.out, SECTION, section(args, eot, patches, patch_model, started, rp2),
                  SCRIPT)
    print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
