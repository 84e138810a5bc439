"""The report of a stored evaluation run (``advkit report RUN``): summary, stages, checks,
per-class table, robust accuracy versus eps, a gallery and the environment, read from
the store alone (no model or data needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from advkit.models.access import REJECT
from advkit.report.html import GalleryItem, write_html_report, write_json_report


def _class_name(names: list[str] | None, index: int) -> str:
    if index == REJECT:
        return "rejected"
    return names[index] if names and 0 <= index < len(names) else str(index)


def unfinished_message(report, holder: int | None = None) -> str:
    """What an unfinished run's numbers mean, in words (the report's banner)."""
    run, store = report.run_id, report.store
    if holder is not None:
        head = f"UNFINISHED: process {holder} is still working on run {run}."
    else:
        head = (f"UNFINISHED: run {run} stopped before the end (killed, failed or interrupted); "
                f"continue it with `advkit evaluate --resume {run} --store {store}`.")
    if report.unknown == 0:
        return (f"{head} Every attack has run (robust accuracy {report.robust_accuracy:.1%}), "
                "but the masking checks have not finished: nothing vouches for the number yet.")
    low, high = report.robust_accuracy_bounds
    clean = ("" if report.clean_accuracy is not None else
             " The clean pass itself is incomplete, so clean accuracy is not known either.")
    return (f"{head} {report.unknown} of {report.n} images have not yet faced every attack: "
            "they count as unknown, never as robust. Robust accuracy lies between "
            f"{low:.1%} (every unknown image broken) and {high:.1%} (none broken): it is at "
            f"most {high:.1%}.{clean}")


#: Images listed in a report's certification table (the JSON twin has them all).
SANDWICH_ROWS = 50


def sandwich_rows(details: dict, per_sample: list[dict], names: list[str] | None,
                  limit: int = SANDWICH_ROWS) -> list[dict]:
    """Per image: the certified radius (a lower bound on the distance to the nearest
    adversarial example) beside the norm of the smallest one the attacks found (an upper
    bound), and where the truth lies between them."""
    rows = []
    for row, radius, found in zip(per_sample[:limit], details["radius"],
                                  details["attack_norm"], strict=False):
        correct = row["clean_pred"] == row["label"]
        # The search stops at eps: a radius equal to it means "at least eps".
        shown = (f">= {radius:g}" if radius >= details["eps"] else radius) if correct \
            else "misclassified"
        rows.append({"image": row["idx"], "label": _class_name(names, row["label"]),
                     "certified_radius": shown,
                     "smallest_found": "none" if found is None else found,
                     "robust_at_eps": "yes" if row["robust"] else "no"})
    return rows


def write_run_report(store: str | Path, run_id: int, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and its JSON twin beside it (``.json``); return both paths."""
    from advkit.evaluation import Store, read_report

    with Store(store, read_only=True) as db:
        report = read_report(db, run_id)
        images = db.images(run_id)
        holder = db.holder(run_id)
    names = None
    dataset = report.config.get("data", {}).get("dataset")
    if dataset:
        from advkit import data
        try:
            names = data.class_names(dataset)
        except ValueError:
            names = None
    status = {c.name: c.status for c in report.checks}
    notes = []
    failed = [c for c in report.checks if c.status == "fail"]
    if failed:
        notes.append("UNRELIABLE: " + "; ".join(f"check '{c.name}' failed: {c.message}"
                                                for c in failed))
    checks_off = not report.config.get("checks", True)
    if checks_off:
        notes.append("The masking checks were not run (--no-checks): nothing vouches for these "
                     "numbers.")
    elif not report.finished:
        notes.append("The masking checks run after every attack has; this run has not got "
                     f"there ({len(report.checks)} checks stored), so nothing vouches for these "
                     "numbers yet.")
    notes.append("Robust accuracy is the per-sample worst case over every stage; success is "
                 "re-checked with a fresh forward pass after every attack.")
    summary = {
        "run": report.run_id, "status": report.status, "suite": report.suite,
        "norm": report.threat.norm, "eps": report.threat.eps, "images": report.n,
        "clean_acc": report.clean_accuracy, "robust_acc": report.robust_accuracy,
    }
    if not report.finished:
        low, high = report.robust_accuracy_bounds
        summary.update(robust_acc_at_least=low, robust_acc_at_most=high, unknown=report.unknown)
    if report.rejection is not None:
        # A pipeline with detectors: robust accuracy splits into its two parts.
        summary.update(false_rejection_rate=report.rejection["false_rejection"],
                       detected_rate=report.rejection["detected"],
                       correct_accepted_rate=report.rejection["correct_accepted"])
        notes.append("The model is a pipeline with detectors: a rejected clean image counts "
                     "as a clean error; an adversarial image counts as defended if it is "
                     "rejected (detected) or accepted and still classified correctly.")
    summary.update(reliable="yes" if report.reliable else
                   "NO (see checks)" if failed else "NO (unfinished)", seconds=report.seconds)
    stages = [{"stage": s["stage"], "attack": s["attack"], "attacked": s["attacked"],
               "broken": s["broken"], "robust_acc": s["robust_acc_after"],
               "seconds": s["seconds"], "forward_passes": s["forward_passes"],
               "backward_passes": s["backward_passes"]} for s in report.stages]
    checks = [{"check": c.name, "status": c.status.upper(), "explanation": c.message}
              for c in report.checks] or [{
                  "check": "-", "status": "not run",
                  "explanation": "checks were switched off" if checks_off else
                  "not run yet: the run is unfinished"}]
    per_class = [{"class": _class_name(names, c["class"]), "images": c["n"],
                  "clean_acc": c["clean_acc"], "robust_acc": c["robust_acc"],
                  **({} if report.finished else {"unknown": c["unknown"]})}
                 for c in report.per_class]
    rows = {r["idx"]: r for r in report.per_sample}
    gallery = []
    stage_names = [s["stage"] for s in report.stages]
    for stage, idx, info, clean, adv in images[:12]:
        row = rows[idx]
        gallery.append(GalleryItem(
            clean=torch.from_numpy(clean.copy()), adversarial=torch.from_numpy(adv.copy()),
            label=_class_name(names, row["label"]),
            clean_pred=_class_name(names, row["clean_pred"]), clean_conf=row["clean_conf"],
            adv_pred=_class_name(names, info["adv_pred"]), adv_conf=info["adv_conf"],
            attack=f"{stage_names[stage - 1]} ({report.threat.norm})", norm=info["norm"]))
    environment = {**{k: str(v) for k, v in report.environment.items()},
                   "model": str(report.config.get("model", {}).get("spec", "(python object)")),
                   "model fingerprint": report.config["model_fingerprint"],
                   "data": str(report.config.get("data") or "(python tensors)"),
                   "data digest": report.config["data_digest"],
                   "seed": report.config["seed"], "batch size": report.config["batch_size"],
                   "store": report.store, "checks": ", ".join(f"{k}={v}" for k, v in
                                                               status.items()) or "none"}
    title = (f"advkit evaluation run {report.run_id}: {report.suite} suite, "
             f"{report.threat.norm} eps={report.threat.eps:g}"
             + (" [UNFINISHED]" if not report.finished else
                "" if report.reliable else " [UNRELIABLE]"))
    args = {"title": title, "summary": [summary], "curves": report.curves, "gallery": gallery,
            "environment": environment, "notes": notes,
            "banner": None if report.finished else unfinished_message(report, holder)}
    out = Path(out)
    tables = [("Stages", stages), ("Checks", checks), ("Per class", per_class)]
    certified = next((c for c in report.checks if c.name == "certification"
                      and "radius" in c.details), None)
    if certified is not None:
        tables.append((f"Certified radius beside the smallest perturbation found "
                       f"({certified.details['method']}, first {SANDWICH_ROWS} images)",
                       sandwich_rows(certified.details, report.per_sample, names)))
    card_file = report.config.get("model", {}).get("card")
    if card_file and Path(card_file).is_file():
        from advkit.card import card_rows, read_card
        tables.insert(0, ("Model card", card_rows(read_card(card_file))))
    html = write_html_report(out, **args, tables=tables)
    js = write_json_report(out.with_suffix(".json"), **args, tables=tables)
    return html, js
