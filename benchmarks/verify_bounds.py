"""advkit's IBP and CROWN margin bounds beside auto_LiRPA's: same models, inputs, eps.

For each zoo model (a ReLU MLP and the stride-2 CNN: no max pooling, whose CROWN
relaxations differ between the two libraries by design) and each norm, both libraries bound
the margins ``z_y - z_j`` (the specification folded into the last layer on both sides) on
the first MNIST test images; the table gives the largest relative difference and the
median time of several runs on one thread.

auto_LiRPA 0.3 (the last release on PyPI, 2022) declares torch<1.13 and imports on torch
2.13 and numpy 2 only with three shims, applied here and nowhere else (see
``_import_auto_lirpa``). Its IBP/CROWN treat an L2 ball after a Sub/Div node (our
Normalize layer) as the point itself (unsound bounds: shown by ``--show-l2-normalize``),
so the L2 rows use each model without its Normalize layer, on both sides, and a box
(-100, 100) that never binds (auto_LiRPA ignores the box for L2).

    OMP_NUM_THREADS=1 flock /tmp/advkit-heavy.lock python benchmarks/verify_bounds.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import shlex
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import _device_name, _source_state  # noqa: E402
from evaluate import write_section  # noqa: E402

from advkit import data  # noqa: E402
from advkit.models import zoo  # noqa: E402
from advkit.threat import ThreatModel  # noqa: E402
from advkit.verify.bounds import (  # noqa: E402
    InputSet,
    backward_lower,
    ibp_lower,
    interval_bounds,
    layer_bounds,
    network,
)
from advkit.verify.certify import _spec  # noqa: E402

SECTION = "bounds vs auto_LiRPA"
#: (model, norm, eps, images): small eps so that some margins are certified.
CASES = [("mlp", "linf", 0.002, 20), ("mlp", "l2", 0.05, 20),
         ("stride_cnn", "linf", 0.001, 5), ("stride_cnn", "l2", 0.02, 5)]


def _import_auto_lirpa() -> types.ModuleType:
    """auto_LiRPA 0.3 on torch 2.13 / numpy 2: three names it imports have moved."""
    shim = types.ModuleType("numpy.lib.arraysetops")  # removed in numpy 2.0
    shim.isin = np.isin
    sys.modules.setdefault("numpy.lib.arraysetops", shim)
    import torch.onnx.symbolic_helper as helper
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    from torch.onnx._internal.torchscript_exporter.symbolic_helper import _node_get

    # torch.onnx used to install Node.__getitem__ and expose _set_opset_version; the
    # TorchScript exporter still has both under _internal.
    torch._C.Node.__getitem__ = _node_get
    helper._set_opset_version = lambda v: setattr(GLOBALS, "export_onnx_opset_version", v)
    warnings.filterwarnings("ignore", module="auto_LiRPA")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import auto_LiRPA

    return auto_LiRPA


def _model(name: str, norm: str) -> nn.Module:
    torch.manual_seed(0)  # no trained weights are cached for these two: a seeded init
    model = zoo.create(name)
    if norm != "linf":
        model = nn.Sequential(*list(model)[1:]).eval()  # without Normalize, both sides
    return model


def _median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|a|, |b|, 1e-3): relative, but not blown up by margins near 0."""
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1e-3)
    return float(((a - b).abs() / scale).max())


def measure_case(lirpa: types.ModuleType, name: str, norm: str, eps: float, x: torch.Tensor,
                 y: torch.Tensor, repeats: int) -> list[dict]:
    """One model, norm and eps: IBP and CROWN on both sides, bounds compared, timed."""
    from auto_LiRPA.perturbations import PerturbationLpNorm

    model = _model(name, norm)
    box = (0.0, 1.0) if norm == "linf" else (-100.0, 100.0)
    threat = ThreatModel(norm, eps, box)
    spec = _spec(y, 10, x.dtype)[:, :9]  # the nine margins
    net = network(model, x)
    region = InputSet.from_threat(x, threat)

    def ours_ibp():
        with torch.no_grad():
            return ibp_lower(net, region, interval_bounds(net, region), spec)

    def ours_crown(intersect: bool):
        with torch.no_grad():
            bounds = layer_bounds(net, region, "crown", intersect_ibp=intersect)
            return backward_lower(net, region, bounds, spec)

    bounded = lirpa.BoundedModule(model, torch.zeros_like(x[:1]), device="cpu",
                                  bound_opts={"conv_mode": "matrix"})
    ptb = (PerturbationLpNorm(norm=np.inf, eps=eps, x_L=region.lower, x_U=region.upper)
           if norm == "linf" else PerturbationLpNorm(norm=2, eps=eps))
    tensor = lirpa.BoundedTensor(x, ptb)

    def theirs(method: str):
        with torch.no_grad():
            return bounded.compute_bounds(x=(tensor,), method=method, C=spec,
                                          bound_upper=False)[0]

    rows = []
    for method in ("IBP", "CROWN"):
        if method == "IBP":
            t_ours, ours = _median_time(ours_ibp, repeats)
        else:
            t_ours, ours = _median_time(lambda: ours_crown(False), repeats)
        t_theirs, ref = _median_time(lambda m=method: theirs(m), repeats)
        row = {"model": name, "norm": norm, "eps": eps, "images": len(x), "method": method,
               "rel": _relative(ours, ref), "abs": float((ours - ref).abs().max()),
               "ours_s": t_ours, "theirs_s": t_theirs,
               "ours_verified": int((ours > 0).all(1).sum()),
               "theirs_verified": int((ref > 0).all(1).sum()),
               "tighter": float((ours - ref).max()), "looser": float((ref - ours).max())}
        if method == "CROWN":
            t_default, default = _median_time(lambda: ours_crown(True), repeats)
            row["default_s"] = t_default
            row["default_verified"] = int((default > 0).all(1).sum())
        rows.append(row)
        print(row, flush=True)
    return rows


def measure(args: argparse.Namespace) -> list[dict]:
    lirpa = _import_auto_lirpa()
    x_all, y_all = data.load("mnist", split="test", limit=max(c[3] for c in CASES))
    return [row for name, norm, eps, limit in CASES
            for row in measure_case(lirpa, name, norm, eps, x_all[:limit], y_all[:limit],
                                    args.repeats)]


def show_l2_normalize() -> None:
    """auto_LiRPA 0.3's first-layer bounds for an L2 ball behind a Normalize layer, beside
    the exact minimum ``w · x - eps ||w||_2``."""
    lirpa = _import_auto_lirpa()
    from auto_LiRPA.perturbations import PerturbationLpNorm

    from advkit.models.normalize import Normalize

    torch.manual_seed(0)
    lin = nn.Linear(16, 3)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), nn.Flatten(), lin).eval()
    x = torch.rand(1, 1, 4, 4)
    bounded = lirpa.BoundedModule(model, torch.zeros_like(x), device="cpu")
    lower = bounded.compute_bounds(
        x=(lirpa.BoundedTensor(x, PerturbationLpNorm(norm=2, eps=0.3)),), method="CROWN")[0]
    exact = model(x) - 0.3 * (lin.weight / 0.3081).norm(dim=1)
    print("auto_LiRPA lower:", lower[0].tolist())
    print("exact minimum:   ", exact[0].tolist())


def section(rows: list[dict], args: argparse.Namespace, started: float) -> str:
    versions = [f"torch {torch.__version__}", f"numpy {np.__version__}"]
    for dist in ("auto-LiRPA", "advkit"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    begin, end = (f"<!-- benchmarks/verify_bounds.py {SECTION}: {w} -->" for w in ("begin", "end"))
    lines = [
        begin,
        "## Bound propagation: advkit against auto_LiRPA (IBP and CROWN margin bounds)",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {_device_name(torch.device('cpu'))}; torch threads "
        f"{torch.get_num_threads()}",
        f"- python {platform.python_version()}; {', '.join(versions)}; advkit source "
        f"{args.source}",
        f"- run time {time.perf_counter() - started:.0f} s; times are the median of "
        f"{args.repeats} runs, one thread, the machine shared with other jobs",
        "- models: zoo `mlp` (784-100-100-10) and `stride_cnn` (conv32-4x4/2, conv64-4x4/2, "
        "fc512), seeded initialisations (torch.manual_seed(0); only small_cnn has cached "
        "trained weights, and its max pooling is relaxed differently by the two libraries); "
        "inputs: the first MNIST test images with their labels; the nine margins "
        "`z_y - z_j` as auto_LiRPA's C matrix",
        "- Linf rows: the full model (Normalize first), box [0, 1] on both sides. L2 rows: "
        "the model without its Normalize layer and a box (-100, 100) that never binds: "
        "auto_LiRPA 0.3 bounds an L2 ball behind a Sub/Div node as if it were the point "
        "(first-layer lower bounds above the exact minimum: unsound; "
        "`--show-l2-normalize`), and ignores the box for L2",
        "- advkit's CROWN in the comparison keeps CROWN's intermediate bounds on the "
        "neurons IBP leaves unstable (`intersect_ibp=False`, auto_LiRPA's sparse "
        "intermediate bounds); its default also keeps IBP's where tighter (last columns); "
        "auto_LiRPA runs with conv_mode='matrix' (its 'patches' mode fails an assertion "
        "on a convolution after the Normalize layer's Div)",
        "- rel: max |ours - theirs| / max(|ours|, |theirs|, 1e-3) over images and margins; "
        "tighter/looser: the largest amount by which ours is above/below theirs",
        "",
        "| model | norm | eps | images | method | rel | abs | ours tighter by | "
        "ours looser by | verified (ours / theirs) | advkit s | auto_LiRPA s | "
        "advkit default CROWN: verified, s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        extra = (f"{r['default_verified']}, {r['default_s']:.3f}" if "default_s" in r else "–")
        lines.append(
            f"| {r['model']} | {r['norm']} | {r['eps']} | {r['images']} | {r['method']} | "
            f"{r['rel']:.1e} | {r['abs']:.1e} | {max(r['tighter'], 0):.1e} | "
            f"{max(r['looser'], 0):.1e} | {r['ours_verified']} / {r['theirs_verified']} | "
            f"{r['ours_s']:.3f} | {r['theirs_s']:.3f} | {extra} |")
    lines.append(end)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-l2-normalize", action="store_true",
                        help="print auto_LiRPA's L2 bounds behind a Normalize layer beside "
                             "the exact minimum, and exit")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.show_l2_normalize:
        show_l2_normalize()
        return 0
    args.source = _source_state()
    started = time.perf_counter()
    rows = measure(args)
    write_section(args.out, SECTION, section(rows, args, started), "verify_bounds.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
