"""``advkit demo``: the main job on the embedded default, offline.

Train (or load the cached) small MNIST CNN, attack 1,000 test images with FGSM
and PGD over several eps, and write a self-contained HTML report with the
robust-accuracy-versus-eps plot and a gallery of adversarial digits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advkit import data
from advkit._files import atomic_write
from advkit.attacks import FGSM, PGD, AttackResult
from advkit.environment import describe
from advkit.evaluation import accuracy, run_attack, table_rows
from advkit.models import checkpoint, trained_path
from advkit.report import gallery_items, write_html_report, write_json_report
from advkit.threat import ThreatModel
from advkit.training import TrainConfig, config_record, train

#: The demo's model: three epochs of small_cnn, ~99% test accuracy in about a minute.
DEMO_CONFIG = TrainConfig(arch="small_cnn", dataset="mnist", epochs=3, seed=0)
DEMO_EPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
GALLERY_EPS = 0.2


def demo_model(*, retrain: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> nn.Module:
    """The demo's trained small_cnn: cached in the model directory, trained if missing."""
    path = trained_path("small_cnn-mnist")
    if path.is_file() and not retrain:
        try:
            meta = checkpoint.read_metadata(path)
            if meta.get("config") == config_record(DEMO_CONFIG):
                log(f"using the cached model {path}")
                return checkpoint.load_checkpoint(path)
            log(f"{path} was trained with another configuration; training the demo model")
        except ValueError as err:
            log(f"ignoring an unreadable cached model ({err}); training anew")
    log("training small_cnn on MNIST (3 epochs, about a minute on 2 CPU cores)")
    # The run folder is keyed by the configuration: a changed config never resumes an
    # old run (the trainer would refuse it), and an interrupted one resumes.
    key = hashlib.sha256(json.dumps(config_record(DEMO_CONFIG), sort_keys=True).encode())
    run_dir = path.parent / "runs" / f"demo-small_cnn-mnist-{key.hexdigest()[:8]}"
    result = train(DEMO_CONFIG, run_dir, resume=not retrain, progress=progress, log=log)
    atomic_write(path, result.checkpoint.read_bytes())
    return result.model


def run_demo(out_dir: str | Path = "advkit-output/demo", *, limit: int = 1000,
             retrain: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; return its summary (rows, curves, report path)."""
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    model = demo_model(retrain=retrain, progress=progress, log=log)
    x, y = data.load("mnist", split="test", limit=limit)
    clean = accuracy(model, x, y)
    log(f"clean accuracy on {x.shape[0]} test images: {clean:.2%}")
    results: dict[str, list[AttackResult]] = {"FGSM": [], "PGD": []}
    for eps in DEMO_EPS:
        threat = ThreatModel("linf", eps)
        for name, attack in (("FGSM", FGSM(threat)), ("PGD", PGD(threat, steps=40))):
            results[name].append(run_attack(attack, model, x, y, progress=progress))
    rows = table_rows([r for name in results for r in results[name]], clean)
    curves = {f"{name} (Linf)": [(0.0, clean)] + [(r.threat.eps, r.robust_accuracy)
                                                  for r in rs] for name, rs in results.items()}
    gallery_result = next(r for r in results["PGD"] if r.threat.eps == GALLERY_EPS)
    gallery = gallery_items(model, x, gallery_result, data.class_names("mnist"))
    env = {**describe(), "model": "small_cnn (advkit zoo)",
           "model fingerprint": checkpoint.fingerprint(model),
           "data": f"MNIST test[:{x.shape[0]}]", "seed": 0,
           "attacks": "FGSM; PGD 40 steps, step 2.5*eps/40, random start"}
    notes = [
        f"Clean accuracy {clean:.2%} on {x.shape[0]} MNIST test images.",
        "Success is re-checked with a fresh forward pass after every attack.",
        f"Gallery: PGD at Linf eps={GALLERY_EPS}; perturbations amplified for visibility.",
    ]
    title = "advkit demo: adversarial examples against an MNIST CNN"
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = ["attack", "norm", "eps", "robust_acc", "success_rate", "median_norm", "images_per_s"]
    report = write_html_report(out_dir / "report.html", title=title,
                               summary=[{k: row[k] for k in shown} for row in rows],
                               curves=curves, gallery=gallery, environment=env, notes=notes)
    write_json_report(out_dir / "report.json", title=title, summary=rows, curves=curves,
                      gallery=gallery, environment=env, notes=notes)
    return {"n": int(x.shape[0]), "clean_accuracy": clean, "results": rows, "curves": curves,
            "report": str(report), "json": str(out_dir / "report.json")}
