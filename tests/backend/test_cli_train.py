"""End-to-end: `road-sslkd train --preset tiny` through the real CLI as a subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import CLI, errors, run_cli
from road_sslkd.data import LabelledSet, Pair, road_prior
from road_sslkd.evaluate import evaluate_model, predict_raster, torch_infer
from road_sslkd.pipeline import STAGE_NAMES
from road_sslkd.runs import RunDir
from road_sslkd.targets import decision_threshold
from road_sslkd.trainer import build_context


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    """One real `road-sslkd train --preset tiny` subprocess, shared by the tests of this module."""
    run = tmp_path_factory.mktemp("train") / "run"
    code, events, stderr = run_cli("train", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(run))
    assert code == 0, stderr[-2000:]
    return run, events


def test_train_tiny_writes_verified_student(tiny_run):
    run, events = tiny_run
    kinds = {e["event"] for e in events}
    assert {"progress", "metric", "artifact", "done"} <= kinds
    assert not errors(events)
    stages = {e["stage"] for e in events if e["event"] == "progress"}
    assert {"teacher_a", "teacher_b", "teachers_ssl", "student_sslkd", "export"} <= stages
    for name in ("student.onnx", "metrics.json", "report.md", "config.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    for name in ("teacher_a", "teacher_b", "teacher_a_ssl", "teacher_b_ssl", "student_sslkd"):
        assert 0.0 <= metrics[name]["iou"] <= 1.0
        assert metrics[name]["params"] > 0
    assert metrics["student_sslkd"]["mpx_per_s"] > 0
    assert "student_sslkd" in (run / "report.md").read_text()
    # Training also ships the INT8 student, unless it lost a point of IoU against fp32.
    check = {e["name"]: e["value"] for e in events if e["event"] == "metric" and e["stage"] == "int8_check"}
    kept = (run / "student.int8.onnx").is_file()
    assert kept == (check["iou_fp32"] - check["iou_int8"] < 0.01)
    assert kept == ("mpx_per_s_int8" in metrics["student_sslkd"])
    assert events[-1]["student_int8"] == (str(run / "student.int8.onnx") if kept else None)

    # The ONNX student matches the trained torch student (probabilities).
    model = RunDir.open(run).load_model("student_sslkd").eval()
    session = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    decoded = {key: json.loads(value) for key, value in meta.items()}  # as Deepness reads each key
    assert decoded["model_type"] == "Segmentor" and decoded["class_names"] == {"0": "road"}
    assert json.loads(meta["tile_size"]) == json.loads(meta["tiles_size"]) == 64
    assert len(json.loads(meta["standardization_mean"])) == 3
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 128)).astype(np.float32)
    got = session.run(None, {"image": x})[0]
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert got.shape == (2, 1, 96, 128)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_evaluate_and_export_commands(tiny_run, tiny_dataset, run_main, tmp_path):
    run, _ = tiny_run
    code, events = run_main("evaluate", str(run), "--data", str(tiny_dataset), "--models", "teacher_a,student_sslkd")
    assert code == 0
    done = events[-1]
    stored = json.loads((run / "metrics.json").read_text())["models"]
    assert done["results"]["student_sslkd"]["iou"] == pytest.approx(stored["student_sslkd"]["iou"])
    target = tmp_path / "teacher.onnx"
    code, events = run_main("export", str(run), "--model", "teacher_a_ssl", "--out", str(target))
    assert code == 0 and target.is_file()
    meta = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["road_sslkd_model"]) == "teacher_a_ssl"
    code, events = run_main("export", str(run), "--model", "teacher_a_ssl", "--out", str(target))
    assert code == 2 and "--overwrite" in errors(events)[0]["hint"]

    # A run whose data moved (or stayed on another machine) still exports, saying what the model lacks.
    moved = tmp_path / "moved_run"
    shutil.copytree(run, moved, copy_function=os.link)
    stored_run = json.loads((moved / "config.json").read_text())
    stored_run["dataset"]["labelled"][0]["image"] = str(tmp_path / "gone.tif")
    (moved / "config.json").unlink()  # a hard link to the source run's: written anew, not through it
    (moved / "config.json").write_text(json.dumps(stored_run))
    code, events = run_main("export", str(moved), "--out", str(tmp_path / "moved.onnx"))
    assert code == 0 and (tmp_path / "moved.onnx").is_file()
    assert any("gone.tif is not there" in e["message"] for e in events if e["event"] == "warning")


def test_evaluate_tta_scores_the_mean_over_the_eight_views(tiny_run, run_main, tmp_path):
    """`evaluate --tta`: a mirrored raster gets the mirrored probabilities, which a network alone does not give."""
    import rasterio

    run = RunDir.open(tiny_run[0])
    pair = run.dataset.test[0]
    tile = run.config.tile  # one tile, no padding: the views of both rasters are the same arrays
    pairs = []
    for name, mirror in (("plain", False), ("mirrored", True)):
        paths = []
        for kind, source in (("image", pair.image), ("mask", pair.label)):
            with rasterio.open(source) as src:
                pixels = src.read()[:, :tile, :tile]
                profile = dict(driver="GTiff", width=tile, height=tile, count=src.count, dtype=pixels.dtype)
            path = tmp_path / f"{name}_{kind}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(pixels[..., ::-1] if mirror else pixels)
            paths.append(path)
        pairs.append(Pair(*paths))
    items = LabelledSet(pairs, run.config.bands, run.config.label_width).items
    model = run.load_model("teacher_b_ssl")

    def probabilities(tta: bool) -> list[np.ndarray]:
        seen = {}
        evaluate_model(model, items, run.normalizer, tile, run.config.overlap, torch.device("cpu"),
                       observe=lambda index, prob, road, known: seen.setdefault(index, prob.copy()), tta=tta)
        return [seen[0], seen[1][:, ::-1]]

    plain, mirrored = probabilities(tta=False)
    assert np.abs(plain - mirrored).max() > 1e-3
    plain, mirrored = probabilities(tta=True)
    np.testing.assert_allclose(plain, mirrored, atol=1e-5)
    code, events = run_main("evaluate", str(run.path), "--models", "teacher_b_ssl", "--tta",
                            "--test", f"{pairs[0].image}:{pairs[0].label}")
    assert code == 0, errors(events)
    assert 0.0 <= events[-1]["results"]["teacher_b_ssl"]["iou"] <= 1.0


def test_models_ship_at_one_half_or_at_the_threshold_that_calls_the_labelled_road_share_road(tiny_run):
    run, _ = tiny_run
    rd = RunDir.open(run)
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    meta = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(meta.custom_metadata_map["seg_thresh"]) == metrics["student_sslkd"]["threshold"] == 0.5
    ctx = build_context(rd, torch.device("cpu"))
    ctx = replace(ctx, config=replace(ctx.config, align_decision=True))
    prior = road_prior(ctx.labelled.labels)
    for name in ("teacher_a", "teacher_b_ssl", "student_sslkd"):
        assert metrics[name]["threshold"] == 0.5  # align_decision is off by default
        threshold = decision_threshold(ctx, rd.load_model(name))
        assert 0.0 < threshold < 1.0
        # On the model's own uint8 maps of the pool, at its threshold it calls at most the labelled share road;
        # one step lower, more.
        infer = torch_infer(rd.load_model(name), ctx.device)  # float32, the run's tiles: as evaluated
        stored = []
        for raster in ctx.unlabelled.rasters:
            prob, valid = predict_raster(infer, raster, ctx.normalizer, rd.config.tile, rd.config.overlap)
            stored.append(np.where(valid, np.round(prob * 255), 0).ravel())
        stored = np.concatenate(stored)
        step = round(threshold * 255)
        assert np.mean(stored >= step) <= prior + 1e-9 < np.mean(stored >= step - 1)


def _wait_for_step(proc: subprocess.Popen, stage: str, min_step: int) -> list[dict]:
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if event["event"] == "progress" and event["stage"] == stage and event["step"] >= min_step:
            return seen
    raise AssertionError(f"training ended before {stage} step {min_step}: {seen[-3:]}")


def test_sigterm_checkpoints_and_resume_finishes(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(run), "--steps-scale", "8",
            "--stages", "teacher_a,teacher_b"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, "teacher_b", 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = [json.loads(line) for line in out.splitlines()][-1]
    assert last["event"] == "error" and last["cancelled"] is True
    assert (run / "checkpoints" / "teacher_b.pt").is_file()
    assert (run / "models" / "teacher_a.pt").is_file()
    assert not (run / "models" / "teacher_b.pt").exists()
    stamp = (run / "models" / "teacher_a.pt").stat().st_mtime
    stale = run / "targets" / "teacher_b" / "left_by_an_earlier_teacher_b.npy"  # as a deleted model would leave
    stale.parent.mkdir(parents=True)
    np.save(stale, np.zeros((2, 2), np.uint8))
    stopped = RunDir.open(run)
    assert "setup_seconds" in stopped.metrics()["models"]["teacher_b"]  # written before its training began
    stopped.update_metrics("teacher_b", {"setup_seconds": 100.0})  # as a first start that cached maps would leave

    time.sleep(0.01)
    code, events, stderr = run_cli("train", "--resume", str(run))
    assert code == 0, stderr[-2000:]
    steps = [e["step"] for e in events if e["event"] == "progress" and e["stage"] == "teacher_b"]
    assert steps and steps[0] > 4  # continued, not restarted
    assert "teacher_a" not in {e.get("stage") for e in events if e["event"] == "progress"}
    assert (run / "models" / "teacher_a.pt").stat().st_mtime == stamp
    assert (run / "models" / "teacher_b.pt").is_file()
    assert not (run / "checkpoints" / "teacher_b.pt").exists()
    assert not stale.exists()  # maps cached from another teacher_b would be stale
    assert RunDir.open(run).metrics()["models"]["teacher_b"]["setup_seconds"] >= 100.0  # both starts' setup


def test_a_run_in_training_is_not_trained_twice(tiny_run, tmp_path):
    """A resume while another process trains the run (the dock's Open run, Processing) would overwrite its
    checkpoints: refused. The lock dies with its process, even a killed one."""
    run = shutil.copytree(tiny_run[0], tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from road_sslkd.runs import training_lock\n"
         "with training_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(300)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, events, _ = run_cli("train", "--resume", str(run))
        assert code == 2 and "is being trained by another process" in errors(events)[0]["message"]
    finally:
        holder.kill()  # as a crash would end it: no clean-up runs
        holder.wait()
    code, _, stderr = run_cli("train", "--resume", str(run))
    assert code == 0, stderr[-2000:]


def test_cross_model_stage_learning_rate_scale(tiny_run, tiny_dataset, run_main, tmp_path):
    """teachers_ssl_lr_scale sets the cross-model stage's peak learning rate: at 0 no weight moves."""
    def moved(run: RunDir, name: str) -> bool:
        before, after = run.load_model(name).state_dict(), run.load_model(f"{name}_ssl").state_dict()
        weights = [k for k in before if k.endswith("weight")]
        assert weights
        return any(not torch.equal(before[k], after[k]) for k in weights)

    config = tmp_path / "frozen.json"
    config.write_text(json.dumps({"teachers_ssl_lr_scale": 0.0}))
    code, events = run_main("train", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(tmp_path / "run"),
                            "--config", str(config), "--stages", "teacher_a,teacher_b,teachers_ssl")
    assert code == 0, errors(events)
    frozen, default = RunDir.open(tmp_path / "run"), RunDir.open(tiny_run[0])
    assert not moved(frozen, "teacher_a") and not moved(frozen, "teacher_b")
    assert moved(default, "teacher_a") and moved(default, "teacher_b")


@pytest.mark.parametrize("targets, learns", [("partner", True), ("mean", False)])
def test_cross_model_targets_partner_or_mean(tiny_run, targets, learns):
    """Teachers that disagree everywhere (a says road, b background) teach each other with the partner's map;
    their mean is 0.5 everywhere, whose confidence weight is 0, so with it nothing is learnt from the pool."""
    from road_sslkd.teachers import CrossModelStage

    run = RunDir.open(tiny_run[0])
    run.config = replace(run.config, teachers_ssl_targets=targets)
    stage = CrossModelStage(build_context(run, torch.device("cpu")))
    lab, unl = stage.ctx.labelled.sample(2), stage.unlabelled.sample(2)
    unl["targets"][:, 0], unl["targets"][:, 1] = 1.0, 0.0
    assert (stage.losses(lab, unl)["loss_cross"] > 0).item() == learns


def test_cached_teacher_features_are_those_of_the_teacher_in_eval_mode(tiny_run):
    """What L_feat matches is the teacher as it predicts: batch norm with its running statistics."""
    from road_sslkd.targets import _raster_features, teacher_features

    run = RunDir.open(tiny_run[0])
    ctx = build_context(run, torch.device("cpu"))
    name, raster = f"teacher_{run.config.student_teachers[0]}_ssl", ctx.unlabelled.rasters[0]
    stride, cached = teacher_features(ctx, name, [raster])
    model = run.load_model(name).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # train mode would differ
    channels, _ = model.feature_shape(0, ctx.in_channels)
    np.testing.assert_array_equal(cached[0], _raster_features(model, raster, ctx, channels, stride))


def test_a_baseline_added_later_leaves_the_runs_student(tiny_run, run_main, tmp_path):
    """`--resume RUN --stages ...,student_supervised` trains the baseline; student.onnx stays the SSLKD student."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    shutil.rmtree(run / "targets")  # deleted to save disk once the run finished
    stages = "teachers_ssl,student_sslkd,student_supervised"
    code, events = run_main("train", "--resume", str(run), "--stages", stages, "--device", "cpu")
    assert code == 0, errors(events)
    assert (run / "models" / "student_supervised.pt").is_file()
    # finished stages are skipped before they are built, so their teachers' outputs are not cached again
    assert not (run / "targets").exists()
    session = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["road_sslkd_model"]) == "student_sslkd"
    # the device given on resume stays the run's: the dock's Resume passes none
    assert RunDir.open(run).config.device == "cpu"
    code, events = run_main("train", "--resume", str(run))
    assert code == 0, errors(events)
    assert RunDir.open(run).config.device == "cpu"


def test_a_run_written_before_a_setting_keeps_its_earlier_behaviour(tiny_run, tmp_path):
    stored = json.loads((tiny_run[0] / "config.json").read_text())
    assert stored["config"].pop("teacher_tta") is True  # today's defaults
    assert stored["config"].pop("align_decision") is False
    assert stored["config"].pop("teachers_ssl_targets") == "mean"
    assert stored["config"]["steps"].pop("pretrain") == 4
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(stored))
    old = RunDir.open(tmp_path / "old").config
    assert old.teacher_tta is False  # its students learnt from one pass
    assert old.align_decision is True  # its models were scored at their aligned thresholds
    assert old.teachers_ssl_targets == "partner"  # its teachers learnt from each other's maps
    assert old.to_json() == {**stored["config"], "teacher_tta": False, "align_decision": True,
                             "teachers_ssl_targets": "partner",
                             "steps": {**stored["config"]["steps"], "pretrain": 4}}  # a bench still reuses it


def test_bench_training_times_every_stage_of_a_run_and_leaves_its_models(tiny_run, run_main, tmp_path):
    run, _ = tiny_run
    before = {p.name: p.read_bytes() for p in (run / "models").iterdir()}
    metrics = (run / "metrics.json").read_text()
    out = tmp_path / "stages.md"
    code, events = run_main("bench-training", "--run", str(run), "--out", str(out))
    assert code == 0, errors(events)
    seconds = next(e for e in events if e["event"] == "done")["stages"]
    assert list(seconds) == list(STAGE_NAMES) and all(s > 0 for s in seconds.values())
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    # the tiny preset's steps per stage: 6 per teacher and student, 4 for the cross-model stage
    assert {r[0].strip(): int(r[3]) for r in rows} == {n: 4 if n == "teachers_ssl" else 6 for n in STAGE_NAMES}
    assert all(float(r[2]) > 0 for r in rows)  # CPU seconds
    assert {p.name: p.read_bytes() for p in (run / "models").iterdir()} == before
    assert (run / "metrics.json").read_text() == metrics
    code, events = run_main("bench-training", "--run", str(tmp_path), "--out", str(tmp_path / "x.md"))
    assert code != 0 and not (tmp_path / "x.md").exists()
    partial = tmp_path / "partial"  # a run whose KD student has no teacher to learn from
    shutil.copytree(run, partial, copy_function=os.link)
    (partial / "models" / "teacher_b.pt").unlink()
    code, events = run_main("bench-training", "--run", str(partial), "--stages", "student_kd", "--out",
                            str(tmp_path / "y.md"))
    assert code != 0 and "teacher_b" in errors(events)[0]["message"]


def test_ablation_retrains_only_the_student(tiny_run, run_main, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "ablation"
    variants = ["default", "no feature distillation", "teacher pair", "25% of the unlabelled data"]
    code, events = run_main("ablate", str(run), "--out", str(out), "--variants", ",".join(variants),
                            "--steps", "2", "--holdout", "1")
    assert code == 0, errors(events)
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == variants
    assert all(0.0 <= r["val_iou"] <= 1.0 for r in rows)
    assert "| teacher pair |" in (out / "ablation.md").read_text()
    # The teachers' outputs are computed once into the shared cache, for the two SSL teachers only.
    assert {p.relative_to(out / "targets").parts[0] for p in (out / "targets").rglob("*.npy")} == {
        "teacher_a_ssl", "teacher_b_ssl"}
    pair = json.loads((out / "teacher_pair" / "config.json").read_text())
    assert pair["config"]["student_teachers"] == ["a", "b"] and pair["config"]["stages"] == ["student_sslkd"]
    fewer = json.loads((out / "25__of_the_unlabelled_data" / "config.json").read_text())
    assert len(fewer["dataset"]["unlabelled"]) == 1  # a quarter of the 2 synthetic unlabelled scenes, at least 1
    default = out / "default" / "models"
    assert (default / "student_sslkd.pt").exists() and not (default / "teacher_a.pt").exists()


def test_ablation_can_distil_from_the_supervised_warmup_teachers(tiny_run, run_main, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny_run[0], source, copy_function=os.link)
    (source / "models" / "teacher_b.pt").unlink()
    variants = "default,supervised warm-up teachers"
    code, events = run_main("ablate", str(source), "--out", str(tmp_path / "gone"), "--variants", variants,
                            "--steps", "2", "--holdout", "1")
    assert code == 2 and "teacher_b (for 'supervised warm-up teachers')" in errors(events)[0]["message"]
    assert not (tmp_path / "gone").exists(), "checked before any variant trains"

    out = tmp_path / "ablation"
    code, events = run_main("ablate", str(tiny_run[0]), "--out", str(out), "--variants", variants,
                            "--steps", "2", "--holdout", "1")
    assert code == 0, errors(events)
    warm = RunDir.open(out / "supervised_warm_up_teachers")
    assert warm.config.sslkd_teachers == "warmup" and warm.has_model("teacher_b")
    assert not warm.has_model("teacher_b_ssl")
    cached = {p.relative_to(out / "targets").parts[0] for p in (out / "targets").rglob("*.npy")}
    assert cached == {"teacher_b", "teacher_b_ssl"}  # the tiny preset's students learn from teacher b


def test_ablation_students_train_as_long_as_the_source_run_by_default(tiny_run, run_main, tmp_path):
    out = tmp_path / "ablation"
    code, events = run_main("ablate", str(tiny_run[0]), "--out", str(out), "--variants", "default", "--holdout", "1")
    assert code == 0, errors(events)
    stored = json.loads((out / "default" / "config.json").read_text())["config"]
    assert stored["steps"]["student"] == RunDir.open(tiny_run[0]).config.stage_steps("student") == 6
    # The same --out with other steps would put both lengths in one table: refused, nothing retrained.
    code, events = run_main("ablate", str(tiny_run[0]), "--out", str(out), "--variants", "default", "--holdout", "1",
                            "--steps", "2")
    assert code == 2 and "trained with other settings" in errors(events)[0]["message"]
    code, events = run_main("ablate", str(tiny_run[0]), "--out", str(out), "--variants", "")
    assert code == 2 and "--variants is empty" in errors(events)[0]["message"]


def test_students_can_match_several_decoder_layers_of_their_teacher(tiny_dataset, run_main, tmp_path):
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"student_teachers": ["a"], "feature_layers": [0, 2]}))
    code, events = run_main("train", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(tmp_path / "run"),
                            "--config", str(config), "--stages", "teacher_a,student_kd")
    assert code == 0, errors(events)
    cache = tmp_path / "run" / "targets" / "teacher_a"
    image = np.load(next((cache / "features").glob("*.npy")))
    coarse = np.load(next((cache / "features_2").glob("*.npy")))  # tiny-unet's layer 2 is 4x coarser
    assert coarse.shape[-2:] == (-(-image.shape[-2] // 4), -(-image.shape[-1] // 4))
    feat = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "loss_feat"]
    assert feat and all(np.isfinite(feat)) and all(v > 0 for v in feat)


def test_ablation_can_validate_on_the_test_pairs_of_a_validation_fold(tiny_run, run_main, tmp_path):
    out = tmp_path / "ablation"
    code, events = run_main("ablate", str(tiny_run[0]), "--out", str(out), "--variants", "default",
                            "--validate-on", "fold", "--steps", "2")
    assert code == 0, errors(events)
    source = RunDir.open(tiny_run[0])
    variant = RunDir.open(out / "default")
    held = len(source.dataset.test)
    assert variant.config.holdout == held
    assert variant.dataset.labelled[:held] == source.dataset.test  # validated on, never trained on
    assert variant.dataset.labelled[held:] == source.dataset.labelled and not variant.dataset.test
    assert any(e["event"] == "warning" and "validation fold" in e["message"] for e in events)
    code, events = run_main("ablate", str(tiny_run[0]), "--out", str(tmp_path / "layers"), "--variants",
                            "feature layer 2 (1/4 resolution)", "--steps", "2", "--holdout", "1")
    assert code != 0 and "tiny-fpn has no decoder feature layer 2" in errors(events)[0]["message"]


def test_int8_export_is_kept_only_within_one_iou_point(tiny_run, run_main, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "student.onnx"
    code, events = run_main("export", str(run), "--out", str(out), "--int8")
    assert code == 0, errors(events)
    ious = {e["name"]: e["value"] for e in events if e["event"] == "metric"}
    assert set(ious) == {"iou_fp32", "iou_int8"}
    kept = (tmp_path / "student.int8.onnx").exists()
    assert kept == (ious["iou_fp32"] - ious["iou_int8"] < 0.01)
    discarded = [e for e in events if e["event"] == "warning" and "INT8 copy discarded" in e["message"]]
    assert bool(discarded) == (not kept)
    if kept:
        session = ort.InferenceSession(str(tmp_path / "student.int8.onnx"), providers=["CPUExecutionProvider"])
        assert json.loads(session.get_modelmeta().custom_metadata_map["road_sslkd_quantized"]).startswith("int8")


def test_int8_export_calibrates_on_rasters_whose_sides_are_not_multiples_of_32(tiny_run, run_main, tmp_path):
    """SYNTHETIC 100 px scenes (coarser imagery gives small rasters): calibration tiles are padded like inference."""
    from road_sslkd.data import DatasetSpec
    from road_sslkd.demo_data import write_demo_dataset
    from road_sslkd.export import _calibration_tiles

    write_demo_dataset(tmp_path / "odd", labelled=1, unlabelled=1, test=1, size=100)
    stored = json.loads((tiny_run[0] / "config.json").read_text())
    stored["dataset"] = DatasetSpec.from_split(tmp_path / "odd").to_json()
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0] / "models", run / "models")
    (run / "config.json").write_text(json.dumps(stored))
    # LinkNet decoders (the cpu preset's student) add skips and fail on sides not divisible by 32.
    assert {tile.shape for tile in _calibration_tiles(RunDir.open(run))} == {(3, 256, 256)}
    code, events = run_main("export", str(run), "--out", str(tmp_path / "student.onnx"), "--int8")
    assert code == 0, errors(events)
    assert {e["name"] for e in events if e["event"] == "metric"} == {"iou_fp32", "iou_int8"}


def test_the_self_training_gate_holds_the_baselines_unsupervised_terms_only_when_asked(tiny_dataset, run_main,
                                                                                        tmp_path):
    weights = {}
    for gate in (False, True):
        config = tmp_path / f"gate_{gate}.json"
        config.write_text(json.dumps({"ssl_gate": gate}))
        code, events = run_main("train", "--data", str(tiny_dataset), "--preset", "tiny", "--out",
                                str(tmp_path / f"run_{gate}"), "--config", str(config), "--stages", "student_ssl")
        assert code == 0, errors(events)
        weights[gate] = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "unsup_weight"]
    assert len(weights[False]) == len(weights[True]) == 3
    assert 0 < weights[False][0] < weights[False][-1] == 1.0  # the plain ramp starts at once
    # a student from random initialisation cannot beat the all-road prediction in its first two steps
    assert weights[True][0] == 0.0
