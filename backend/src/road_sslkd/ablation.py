"""`road-sslkd ablate`: what drives the SSLKD student, measured on validation images, never on the test split.

Every variant retrains only the SSLKD student, from the teachers of a finished run (a benchmark seed),
with one setting changed. The student of every variant trains on the labelled set minus
``--holdout`` images, which it never sees, and is scored on them (whole images, road IoU). The teachers of a
benchmark seed saw those images in their own training, which inflates the scores, most for variants that
copy the teachers closely (docs/method.md, "Ablation"); a source trained with the same ``holdout`` setting
avoids that, and so does a source trained on a validation fold (scripts/validation_folds.py: held-out
labelled images as its test pairs) with ``--validate-on fold``, which scores the variants on those pairs
instead. Students train as long as the source's unless ``--steps`` is given: shorter ones rank settings
in another regime (their teacher far ahead of them). Each variant is an ordinary run folder under OUT_DIR
(resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import events
from .pipeline import teachers_of, train
from .runs import RunDir, install_stop_handlers

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no pseudo-labels": {"w_unsup": 0.0},
    "no probability distillation": {"w_prob": 0.0},
    "teacher pair": {"student_teachers": ["a", "b"]},
    "supervised warm-up teachers": {"sslkd_teachers": "warmup"},
    "single teacher a": {"student_teachers": ["a"]},
    "25% of the unlabelled data": {"unlabelled_fraction": 0.25},
    "no prior alignment": {"align_prior": False},
    "pseudo-labels thresholded (0.9)": {"confidence": "threshold"},
    "pseudo-labels unweighted": {"confidence": "none"},
    "temperature 1": {"temperature": 1.0},
    "temperature 4": {"temperature": 4.0},
    "no feature distillation": {"w_feat": 0.0},
    "feature layer 1 (1/2 resolution)": {"feature_layers": [1]},
    "feature layer 2 (1/4 resolution)": {"feature_layers": [2]},
    "feature layers 0-2": {"feature_layers": [0, 1, 2]},
    # Both ways: a source run written before the setting existed has one-pass targets as its default.
    "one-pass targets": {"teacher_tta": False},
    "test-time augmented targets": {"teacher_tta": True},
}
"""Variant name -> overrides of the run's config ("unlabelled_fraction" keeps the first part of the pool)."""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


VALIDATE_ON = ("holdout", "fold")


def ablate(source: RunDir, out: Path, names: list[str], holdout: int, steps: int, device: str,
           command: str = "", validate_on: str = "holdout") -> list[dict]:
    """Train the variants' students; ablation.json and ablation.md are rewritten after each variant.

    ``validate_on`` "holdout": the first ``holdout`` labelled pairs; "fold": the source's test pairs, which
    must be held-out labelled images (a validation fold), never a real test split.
    """
    labelled = source.dataset.labelled
    if validate_on == "fold":
        if not source.dataset.test:
            raise events.UserError(f"{source.path} has no test pairs to validate on",
                                   "give a run trained on a validation fold (scripts/validation_folds.py)")
        labelled, holdout = source.dataset.test + labelled, len(source.dataset.test)
        events.warning(f"scoring the variants on the {holdout} test pairs of {source.path}: this is only right "
                       "when they are held-out labelled images of a validation fold")
    configs = {}
    for name in names:
        overrides = dict(VARIANTS[name])
        fraction = overrides.pop("unlabelled_fraction", 1.0)
        configs[name] = (fraction, replace(source.config, stages=["student_sslkd"], holdout=holdout, val_every=steps,
                                           steps={**source.config.steps, "student": steps}, steps_scale=1.0,
                                           **overrides))
    needed = {t: n for n, (_, cfg) in configs.items() for t in teachers_of(cfg, "student_sslkd")}
    missing = [f"{t} (for '{n}')" for t, n in needed.items() if not source.has_model(t)]
    if missing:
        raise events.UserError(f"{source.path} has no {', '.join(missing)}",
                               "give a run whose teacher stages finished, or leave those variants out")
    shared_targets = out / "targets"
    shared_targets.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (fraction, cfg) in configs.items():
        spec = replace(source.dataset, test=[], labelled=labelled,
                       unlabelled=source.dataset.unlabelled[: max(1, round(fraction * len(source.dataset.unlabelled)))])
        path = out / _slug(name)
        if (path / "config.json").exists():
            run = RunDir.open(path)
            # Resumed only when started the same way: a variant of other --holdout/--steps would join this table.
            if run.config.to_json() != cfg.to_json() or run.dataset.to_json() != spec.to_json():
                raise events.UserError(f"{path} holds the variant '{name}' trained with other settings or images",
                                       "pass another --out, or the --holdout, --steps and source it was run with")
        else:
            run = RunDir.create(path, cfg, spec)
        for teacher in teachers_of(cfg, "student_sslkd"):
            if not run.has_model(teacher):
                run.model_path(teacher).parent.mkdir(exist_ok=True)
                try:
                    os.link(source.model_path(teacher), run.model_path(teacher))  # no copy of a large teacher
                except OSError:  # --out on another file system, or one without hard links
                    shutil.copy2(source.model_path(teacher), run.model_path(teacher))
        if not (path / "targets").exists():
            (path / "targets").symlink_to(shared_targets.resolve())  # teachers' outputs are computed once
        run.normalizer = source.normalizer
        run.save()
        train(run, device, command, export=False)
        val = run.curves()["student_sslkd"]["val_iou"][-1][1]
        rows.append({"variant": name, "overrides": VARIANTS[name], "val_iou": val,
                     "train_seconds": run.metrics()["models"]["student_sslkd"]["train_seconds"]})
        events.metric("val_iou", val, stage=name)
        (out / "ablation.json").write_text(json.dumps(rows, indent=2))
        (out / "ablation.md").write_text(f"# SSLKD student ablation\n\nCommand: `{command}`\n\n{table(rows)}\n")
    return rows


def table(rows: list[dict]) -> str:
    base = next((r["val_iou"] for r in rows if r["variant"] == "default"), None)
    lines = ["| Variant | Validation IoU | Δ vs default | Train s |", "|---|---:|---:|---:|"]
    for r in rows:
        delta = "" if base is None or r["variant"] == "default" else f"{100 * (r['val_iou'] - base):+.1f}"
        lines.append(f"| {r['variant']} | {100 * r['val_iou']:.1f} | {delta} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ablate", help="retrain the SSLKD student with one setting changed per variant")
    p.add_argument("source", type=Path, help="a finished run (e.g. a benchmark seed) with teacher_*_ssl")
    p.add_argument("--out", type=Path, required=True, help="folder for the variants' runs and ablation.md")
    p.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}".replace("%", "%%"))
    p.add_argument("--holdout", type=int, default=2, help="labelled images kept for validation (default 2)")
    p.add_argument("--validate-on", choices=VALIDATE_ON, default="holdout",
                   help="holdout: the first --holdout labelled images; fold: the test pairs of a source trained "
                   "on a validation fold (scripts/validation_folds.py), which its teachers never saw")
    p.add_argument("--steps", type=int, help="student steps per variant (default: the source run's, as long as "
                   "its benchmark trains them; shorter students rank settings differently, docs/method.md)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    install_stop_handlers()
    if args.variants is not None and not args.variants.strip():
        raise events.UserError("--variants is empty", f"leave it out for every variant, or choose from: "
                               f"{', '.join(VARIANTS)}")
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise events.UserError(f"unknown variant(s): {', '.join(unknown)}", f"choose from: {', '.join(VARIANTS)}")
    source = RunDir.open(args.source)
    steps = args.steps or source.config.stage_steps("student")
    ablate(source, args.out, names, args.holdout, steps, args.device, args.command_line, args.validate_on)
    events.artifact("ablation", args.out / "ablation.md")
