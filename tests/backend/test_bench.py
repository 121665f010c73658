"""`road-sslkd bench` on the tiny preset: report.json has DESIGN.md's keys, figures exist, runs resume."""

import json
import shutil

from conftest import errors
from road_sslkd import precision
from road_sslkd.bench import claims

REQUIRED = {"iou", "iou_std", "f1", "precision", "recall", "relaxed_f1", "params", "gflops", "mpx_per_s",
            "setup_seconds", "train_seconds"}
MODELS = {"student_supervised", "student_ssl", "teacher_a", "teacher_b", "teacher_a_ssl", "teacher_b_ssl",
          "student_kd", "student_sslkd"}


def test_bench_report_keys_and_figures(run_main, tiny_dataset, tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    # The two seeds train at once in child processes (`train --resume`), each logging into its run folder.
    code, events = run_main("bench", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out),
                            "--work", str(work), "--seeds", "0,1", "--jobs", "2")
    assert code == 0, events[-1]
    assert [e["step"] for e in events if e["event"] == "progress" and e["stage"] == "bench"] == [1, 2]
    # The parent (this process) decides the CPU precision once; every stage of every child trains in it.
    bf16 = precision.cpu_bf16_pays()
    for seed in (0, 1):
        stages = [line for line in (work / f"seed_{seed}" / "train.log").read_text().splitlines()
                  if " steps on cpu" in line]
        assert len(stages) == 7 and all(("bfloat16" in line) == bf16 for line in stages), stages
        child = [json.loads(line) for line in (work / f"seed_{seed}" / "train.jsonl").read_text().splitlines()]
        assert child[-1]["event"] == "done" and (work / f"seed_{seed}" / "student.onnx").is_file()
        # Prior alignment: pseudo-label thresholds follow the labelled road fraction, not a fixed 0.5.
        metrics = {(e["stage"], e["name"]): e["value"] for e in child if e["event"] == "metric"}
        for key in (("student_ssl", "pseudo_threshold"), ("student_sslkd", "prior_threshold_unlabelled"),
                    ("student_sslkd", "prior_threshold_labelled"), ("student_kd", "prior_threshold_labelled")):
            assert 0 < metrics[key] < 1 and metrics[key] != 0.5, key
        assert 0 <= metrics[("student_ssl", "unsup_weight")] <= 1  # the weight of its unsupervised terms (logged)
    report = json.loads((out / "report.json").read_text())
    assert {"dataset", "preset", "seeds", "command", "models"} <= set(report)
    assert report["seeds"] == [0, 1] and report["preset"] == "tiny"
    assert set(report["models"]) == MODELS
    for name, values in report["models"].items():
        assert REQUIRED <= set(values), name
        assert 0 <= values["iou"] <= 1 and values["iou_std"] >= 0
        assert len(values["iou_seeds"]) == 2 and abs(sum(values["iou_seeds"]) / 2 - values["iou"]) < 1e-9
    assert report["models"]["teacher_a"]["params"] > report["models"]["student_sslkd"]["params"]
    for figure in report["figures"]:
        assert (out / figure).stat().st_size > 10_000
    markdown = (out / "report.md").read_text()
    assert "road-sslkd bench" in markdown and f"It ran for {report['wall_seconds'] / 60:.0f} min wall" in markdown
    # Training time per seed from its stages (the cross-model stage counted once), as the runs recorded it.
    for seed, minutes in zip((0, 1), report["training_minutes"]):
        run = json.loads((work / f"seed_{seed}" / "metrics.json").read_text())["models"]
        stages = sum(m["setup_seconds"] + m["train_seconds"] for n, m in run.items() if n != "teacher_b_ssl")
        assert minutes == round(stages / 60, 1) > 0 and f"seed {seed} {minutes:.0f} min" in markdown
    seed_1 = report["models"]["student_sslkd"]["iou_seeds"][1]
    assert any(line.startswith("| student_sslkd |") and line.endswith(f"| {100 * seed_1:.1f} |")
               for line in markdown.splitlines())
    # Every claim of the SSLKD student is checked in the report, met or not, from the table's own numbers.
    claims = [line for line in markdown.splitlines() if line.startswith("| SSLKD") or line.startswith("| param")]
    assert len(claims) == 4 and all(line.endswith("| met |") or line.endswith("| NOT met |") for line in claims)
    m = report["models"]
    gap = 100 * (m["student_sslkd"]["iou"] - m["student_supervised"]["iou"])
    assert f"{gap:+.1f} IoU points" in markdown

    # A second start refuses to replace the report, and with --overwrite reuses the finished runs.
    code, events = run_main("bench", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out),
                            "--work", str(work), "--seeds", "0,1")
    assert code == 2 and "--overwrite" in events[-1]["hint"]
    code, events = run_main("bench", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out),
                            "--work", str(work), "--seeds", "0,1", "--overwrite")
    assert code == 0
    assert not [e for e in events if e["event"] == "progress" and e["stage"] in ("teacher_a", "evaluate")]
    again_report = json.loads((out / "report.json").read_text())
    assert again_report["wall_seconds"] < report["wall_seconds"]  # nothing retrained, only measured
    assert again_report["training_minutes"] == report["training_minutes"]  # the first start's training counts
    again = again_report["models"]
    for name, values in report["models"].items():
        assert again[name]["iou"] == values["iou"] and again[name]["precision"] == values["precision"], name

    # A model deleted by hand is trained again and measured again; the others keep their measurements.
    (work / "seed_1" / "models" / "student_sslkd.pt").unlink()
    code, events = run_main("bench", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out),
                            "--work", str(work), "--seeds", "0,1", "--overwrite")
    assert code == 0
    evaluated = [e["model"] for e in events if e["event"] == "progress" and e["stage"] == "evaluate" and e["step"] == 0]
    assert evaluated == ["student_sslkd"]

    # Seeds trained on other rasters are never reported as this dataset's (same settings, a copy elsewhere).
    copy = shutil.copytree(tiny_dataset, tmp_path / "copy")
    code, events = run_main("bench", "--data", str(copy), "--preset", "tiny", "--out", str(out),
                            "--work", str(work), "--seeds", "0,1", "--overwrite")
    assert code == 2 and "holds a run with other data" in errors(events)[0]["message"]


def test_bench_pretrains_once_for_every_network(run_main, tiny_dataset, tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    code, events = run_main("bench", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out),
                            "--work", str(work), "--pretrain")
    assert code == 0, errors(events)
    folder = (work / "pretrained").resolve()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["weights"] == str(folder)
    assert json.loads((work / "seed_0" / "config.json").read_text())["config"]["weights"] == str(folder)
    record = json.loads((folder / "pretrain.json").read_text())
    assert report["pretraining"]["steps"] == record["settings"]["steps"] == 4
    assert record["command"] == report["command"] and "--pretrain" in record["command"]
    # The labelled and unlabelled images are pretrained on, never the test split's.
    split = json.loads((tiny_dataset / "split.json").read_text())
    seen = {str((tiny_dataset / p).resolve()) for p in [x["image"] for x in split["labelled"]] + split["unlabelled"]}
    assert set(record["settings"]["rasters"]) == seen
    assert not seen & {str((tiny_dataset / x["image"]).resolve()) for x in split["test"]}
    assert "encoders pretrained on the labelled and unlabelled images" in (out / "report.md").read_text()

    code, events = run_main("bench", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out),
                            "--work", str(work), "--pretrain", "--weights", "none", "--overwrite")
    assert code == 2 and "--weights" in errors(events)[0]["message"]


def test_bench_takes_seeds_not_seed(run_main, tiny_dataset, tmp_path):
    code, events = run_main("bench", "--data", str(tiny_dataset), "--seed", "3", "--out", str(tmp_path / "report"))
    assert code == 2 and errors(events)[0]["hint"] == "pass --seeds 3"
    assert not (tmp_path / "report").exists()
    for seeds, message in (("0,0", "repeats a seed"), ("0,a", "is not a list of whole numbers")):
        code, events = run_main("bench", "--data", str(tiny_dataset), "--seeds", seeds, "--preset", "tiny",
                                "--out", str(tmp_path / "report"), "--work", str(tmp_path / "work"))
        assert code == 2 and message in errors(events)[0]["message"]
    assert not (tmp_path / "work").exists()


def test_bench_replaces_no_report_file_without_overwrite(run_main, tiny_dataset, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "curves.png").write_bytes(b"mine")
    code, events = run_main("bench", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out),
                            "--work", str(tmp_path / "work"))
    assert code == 2 and "curves.png exists" in errors(events)[0]["message"]
    assert (out / "curves.png").read_bytes() == b"mine" and not (tmp_path / "work").exists()


def test_one_seed_cannot_meet_the_spread_rule():
    def model(iou: float, params: float = 1.0) -> dict:
        return {"iou": iou, "iou_seeds": [iou], "params": params, "mpx_per_s": 1.0}

    m = {"student_sslkd": model(0.70, 0.1), "student_ssl": model(0.60, 0.1), "student_supervised": model(0.60, 0.1),
         "teacher_a_ssl": model(0.70), "teacher_b_ssl": model(0.65)}
    row = next(line for line in claims(m) if "UniMatch" in line)
    assert "+10.0 IoU points (one seed: spread not measured)" in row and row.endswith("| NOT met |")
    m["student_sslkd"]["iou_seeds"] = m["student_ssl"]["iou_seeds"] = [0.7, 0.7]
    assert next(line for line in claims(m) if "UniMatch" in line).endswith("| met |")
