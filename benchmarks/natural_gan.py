"""Natural adversarial examples (Zhao, Dua & Singh 2018) on MNIST and Fashion-MNIST: a GAN and
its inverter trained on this CPU, then the latent search against the standard preset.

    ADVKIT_DATA_DIR=/work/shared/data OMP_NUM_THREADS=2 python benchmarks/natural_gan.py \\
        --threads 2                                        # the RESULTS.md figure
    OMP_NUM_THREADS=1 python benchmarks/natural_gan.py --datasets mnist --epochs 1 \\
        --train-limit 800 --images 4 --samples 32 --out /tmp/RESULTS.md   # a smoke run

Per dataset:

1. **The GAN.** ``advkit.training.train_gan``: WGAN-GP generator and critic with the
   inverter (the authors' losses and weights: 5 critic and inverter steps per generator
   step, gradient penalty 10, latent weight 0.1, Adam 1e-4), at ``--width`` (the authors'
   64 costs ~3x the time of the default 32 on a CPU) for ``--epochs`` over the training
   set (``--batch-size`` images per generator step). Trained once and cached in
   ``~/.cache/advkit/natural-gan/`` (the trainer checkpoints every epoch: an interrupted
   run resumes, a finished one is reused).
2. **The search.** ``NaturalGAN`` with the hybrid shrinking search and the iterative
   stochastic search on the first ``--images`` test images the classifier gets right,
   against the dataset's standard preset (``~/.cache/advkit/recipes/{dataset}-standard``,
   trained by ``benchmarks/defenses.py``), seen through ``labels_only``.

The section reports per search: success, the mean latent distance ``||z* - I(x)||`` and the
mean pixel L2 ``||G(z*) - x||`` over the successes, beside the reconstruction's own L2
``||G(I(x)) - x||`` (the floor of any pixel distance here: the adversarial image lies on the
generator's manifold, ``x`` need not), queries per image and seconds; and how many
reconstructions ``G(I(x))`` the classifier already gets wrong (found at distance ~0: the
inverter's error, not the search's). The PNG gallery shows, per dataset, the originals,
their reconstructions and the hybrid search's natural adversarial examples with the labels
the classifier gives them.

Cost, measured with one thread on this machine's 2-core AMD EPYC while another job ran:
1.3-1.5 s per generator step at width 32 (4.2 s at 64), and ~2,500 candidates per second
through generator and classifier together. Estimated from those: the default 12 epochs
(1,800 steps) train in ~45 min per dataset on one thread (~30 min on two); the hybrid
search asks some thousands of candidates per image and the iterative one more (256 draws
per shell of 0.05 up to the distance found: 5,000 per unit of latent distance), so the
searches take ~5-20 min per dataset for 100 images, depending on the distances found.
Measured (2026-12-07): each GAN trained in ~41 min on one thread (the two datasets in
parallel, one per core), and the searches of both datasets took 552 s on two threads. Check the gallery's
G(I(x)) row: reconstructions that do not look like the originals mean the GAN needs more
epochs (a new cache folder: the epochs are part of the run's configuration).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import _device_name, _source_state  # noqa: E402
from evaluate import markers, write_section  # noqa: E402
from kept import now  # noqa: E402

import advkit  # noqa: E402
from advkit.attacks import NaturalGAN  # noqa: E402
from advkit.models import labels_only  # noqa: E402
from advkit.training import NaturalGANTraining, train_gan  # noqa: E402

CACHE = Path.home() / ".cache" / "advkit" / "natural-gan"
PRESETS = Path.home() / ".cache" / "advkit" / "recipes"
SECTION = "natural_gan"
SCRIPT = "natural_gan.py"
SEARCHES = ("hybrid", "iterative")
#: Per dataset, the class names the gallery writes under the images.
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "boot"],
}


def gan_settings(args: argparse.Namespace, dataset: str) -> dict:
    return {"dataset": dataset, "epochs": args.epochs, "batch_size": args.batch_size,
            "train_limit": args.train_limit, "z_dim": args.z_dim, "width": args.width,
            "lr": args.lr, "seed": args.seed}


def train(args: argparse.Namespace, dataset: str, log) -> tuple[torch.nn.Module, dict]:
    settings = gan_settings(args, dataset)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = args.cache / f"{dataset}-w{args.width}-z{args.z_dim}-{key}"
    log(f"{dataset}: the GAN in {run_dir}")
    result = train_gan(run_dir, recipe=NaturalGANTraining(), val_limit=1000,
                       progress=not args.quiet, log=log, **settings)
    info = {"run_dir": str(run_dir), "steps": int(result.model.steps),
            "seconds": result.seconds, "val_mse": result.history[-1]["val_mse"]}
    return result.model, info


def classifier(args: argparse.Namespace, dataset: str) -> tuple[torch.nn.Module, Path]:
    path = args.presets / f"{dataset}-standard" / "model.safetensors"
    if not path.is_file():
        raise SystemExit(f"no {dataset} standard model at {path}: train it with python "
                         f"benchmarks/defenses.py --preset {dataset} --defenses standard")
    return advkit.models.load(str(path)).eval(), path


def measure(args: argparse.Namespace, dataset: str, log) -> dict:
    gan, info = train(args, dataset, log)
    model, model_path = classifier(args, dataset)
    x, y = advkit.data.load(dataset, split="test", limit=args.pool)
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right][:args.images], y[right][:args.images]
    with torch.no_grad():
        reconstruction = gan(x)
        rec_labels = model(reconstruction).argmax(1)
    rec_wrong = int((rec_labels != y).sum())
    rec_l2 = (reconstruction - x).flatten(1).norm(dim=1)
    row = {"dataset": dataset, "gan": info, "model": str(model_path), "images": len(x),
           "reconstruction_wrong": rec_wrong, "reconstruction_l2": float(rec_l2.mean()),
           "searches": {}}
    threat = advkit.ThreatModel("l2", math.inf)
    for search in args.searches:
        attack = NaturalGAN(threat, gan, search=search, samples=args.samples, step=args.step,
                            max_radius=args.max_radius, seed=args.seed)
        result = attack(labels_only(model), x, y)
        ok = result.success
        # Where G(I(x)) is already misclassified the search stops at distance ~0: the
        # inverter's error. The starred means leave those images out.
        fair = ok & (rec_labels == y)
        latent = result.extras["latent_distance"]
        row["searches"][search] = {
            "success": result.success_rate,
            "latent": _mean(latent[ok]), "l2": _mean(result.norms[ok]),
            "latent_fair": _mean(latent[fair]), "l2_fair": _mean(result.norms[fair]),
            "queries": float(result.queries.float().mean()),
            "seconds": result.seconds,
        }
        s = row["searches"][search]
        log(f"{dataset} {search}: success {s['success']:.1%}, latent {s['latent']:.3f}, "
            f"L2 {s['l2']:.2f}, {s['queries']:.0f} queries/image, {s['seconds']:.0f} s")
        if search == args.searches[0]:
            row["gallery"] = (x[:args.gallery], reconstruction[:args.gallery],
                              result.x_adv[:args.gallery], y[:args.gallery],
                              rec_labels[:args.gallery], result.predictions[:args.gallery],
                              ok[:args.gallery])
    return row


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def gallery(rows: list[dict], path: Path) -> None:
    """Per dataset three rows: originals, reconstructions G(I(x)), natural adversarials;
    under each image the label the classifier gives it (x for a search that found none)."""
    from PIL import Image, ImageDraw

    scale, pad, text = 3, 4, 12
    side = 28 * scale
    columns = max(len(r["gallery"][0]) for r in rows)
    band = 3 * (side + text + pad) + 2 * pad + text
    sheet = Image.new("L", (columns * (side + pad) + pad + 60, band * len(rows)), 255)
    draw = ImageDraw.Draw(sheet)
    for r_index, row in enumerate(rows):
        x, rec, adv, y, rec_pred, pred, ok = row["gallery"]
        names = CLASS_NAMES.get(row["dataset"], [str(i) for i in range(10)])
        top = r_index * band + pad
        draw.text((pad, top), f"{row['dataset']}: original / G(I(x)) / natural adversarial",
                  fill=0)
        top += text
        for line, (images, labels) in enumerate(((x, y), (rec, rec_pred), (adv, pred))):
            y0 = top + line * (side + text + pad)
            for i in range(len(images)):
                pixels = (images[i, 0] * 255).round().byte().numpy()
                tile = Image.fromarray(pixels, mode="L").resize((side, side), Image.NEAREST)
                x0 = pad + 60 + i * (side + pad)
                sheet.paste(tile, (x0, y0))
                label = names[int(labels[i])] if line != 2 or ok[i] else "none"
                draw.text((x0, y0 + side), label, fill=0)
            draw.text((pad, y0 + side // 2), ("x", "G(I(x))", "adv")[line], fill=0)
    sheet.save(path)


def section(args: argparse.Namespace, rows: list[dict], started: float) -> str:
    begin, end = markers(SECTION, SCRIPT)
    lines = [
        begin,
        "## Natural adversarial examples (NaturalGAN, Zhao, Dua & Singh 2018)",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {now()}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, advkit "
        f"{advkit.__version__}, source {args.source}",
        f"- run time {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{args.load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        f"- GAN: `train_gan(epochs={args.epochs}, batch_size={args.batch_size}, "
        f"train_limit={args.train_limit}, z_dim={args.z_dim}, width={args.width}, "
        f"lr={args.lr}, seed={args.seed})` (WGAN-GP + inverter, the authors' losses and "
        f"weights), cached in `{args.cache}`",
        f"- search: `NaturalGAN(ThreatModel('l2', inf), gan, search=..., "
        f"samples={args.samples}, step={args.step}, max_radius={args.max_radius}, "
        f"seed={args.seed})` on the first {args.images} test images the dataset's standard "
        "preset classifies correctly, through `labels_only`; untargeted",
        "- latent: mean `||z* - I(x)||` over the successes; L2: mean pixel `||x_adv - x||` "
        "over the successes; G(I(x)) L2: the reconstruction's mean pixel distance (the "
        "floor of the adversarial's, which lies on the generator's manifold); G(I(x)) "
        "wrong: reconstructions the classifier already gets wrong (found at distance ~0, "
        "the inverter's error rather than the search's); latent\\*, L2\\*: the same means "
        "without those images",
        f"- gallery: `{args.png_name}` (per dataset: x, G(I(x)), the {args.searches[0]} "
        "search's adversarial, each with the classifier's label)",
        "",
        "| dataset | GAN steps | GAN s | held-out MSE G(I(x)) | G(I(x)) L2 | G(I(x)) wrong "
        "| search | success | latent | L2 | latent\\* | L2\\* | queries/image | s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        gan = row["gan"]
        for search, s in row["searches"].items():
            lines.append(
                f"| {row['dataset']} | {gan['steps']} | {gan['seconds']:.0f} | "
                f"{gan['val_mse']:.4f} | {row['reconstruction_l2']:.2f} | "
                f"{row['reconstruction_wrong']}/{row['images']} | {search} | "
                f"{100 * s['success']:.0f}% | {s['latent']:.3f} | {s['l2']:.2f} | "
                f"{s['latent_fair']:.3f} | {s['l2_fair']:.2f} | {s['queries']:.0f} | "
                f"{s['seconds']:.0f} |")
    lines.append(end)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"],
                        choices=["mnist", "fashion-mnist"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=400,
                        help="images per generator step (5 critic steps of a fifth)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--z-dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam's, for all three parts")
    parser.add_argument("--images", type=int, default=100, help="test images searched")
    parser.add_argument("--pool", type=int, default=1000,
                        help="test images the correctly classified ones are taken from")
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=SEARCHES)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--max-radius", type=float, default=10.0)
    parser.add_argument("--gallery", type=int, default=12, help="images per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--presets", type=Path, default=PRESETS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--png", type=Path, default=None,
                        help="the gallery (default: natural_gan.png beside --out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "images", "samples", "gallery", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    torch.set_num_threads(args.threads)
    args.png = args.png or args.out.parent / "natural_gan.png"
    args.png_name = args.png.name
    args.source, args.load_before = _source_state(), os.getloadavg()[0]
    started = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = [measure(args, dataset, log) for dataset in args.datasets]
    gallery(rows, args.png)
    write_section(args.out, SECTION, section(args, rows, started), SCRIPT)
    print(f"wrote the {SECTION} section of {args.out} and the gallery {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
