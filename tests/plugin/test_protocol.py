"""The subprocess protocol as pure functions: argument lists, environment, events, exit codes, results."""

import json
import os

from road_sslkd_plugin.core.protocol import (
    TrainRequest,
    classify_exit,
    clean_environment,
    format_eta,
    overall_fraction,
    pair_arg,
    parse_event_line,
    resume_args,
)
from road_sslkd_plugin.core.results import RunFolder, comparison, report_for_panel, result_rows


def test_train_arguments_are_a_list_with_every_option():
    request = TrainRequest(
        run_dir="/runs/a b",
        labelled=[("C:\\data\\img 1.tif", "C:\\data\\roads.gpkg"), ("/d/i2.tif", "/d/m2.tif")],
        unlabelled=["/d/u1.tif"],
        test=[("/d/t.tif", "/d/tm.tif")],
        preset="cpu",
        label_width=6.0,
        steps_scale=0.5,
        device="cuda",
        seed=3,
        config="/c.json",
        stages=["teacher_a", "student_sslkd"],
        weights="none",
        bands="1,2,3",
        extra_args=["--verbose-thing"],
    )
    assert request.to_args() == [
        "train",
        "--out",
        "/runs/a b",
        "--preset",
        "cpu",
        "--labelled",
        "C:\\data\\img 1.tif::C:\\data\\roads.gpkg",
        "/d/i2.tif::/d/m2.tif",
        "--unlabelled",
        "/d/u1.tif",
        "--test",
        "/d/t.tif::/d/tm.tif",
        "--label-width",
        "6",
        "--steps-scale",
        "0.5",
        "--device",
        "cuda",
        "--seed",
        "3",
        "--config",
        "/c.json",
        "--stages",
        "teacher_a,student_sslkd",
        "--weights",
        "none",
        "--bands",
        "1,2,3",
        "--verbose-thing",
    ]


def test_defaults_add_no_options():
    args = TrainRequest(run_dir="/r", labelled=[("/i.tif", "/m.tif")]).to_args()
    assert args == ["train", "--out", "/r", "--preset", "tiny", "--labelled", "/i.tif::/m.tif"]
    assert resume_args("/r") == ["train", "--resume", "/r"]


def test_pairs_with_colons_in_their_paths_stay_whole():
    """The backend splits a pair at "::" before anything else: a ":" inside a path must not split it."""
    request = TrainRequest(run_dir="/r", labelled=[("/scans/2024:05/a.tif", "/labels/a:roads.gpkg")],
                           test=[("C:\\t:1.tif", "D:\\m.tif")])
    args = request.to_args()
    assert args[args.index("--labelled") + 1] == "/scans/2024:05/a.tif::/labels/a:roads.gpkg"
    assert args[args.index("--test") + 1] == "C:\\t:1.tif::D:\\m.tif"
    assert pair_arg(("x:y.tif", "m.tif")).split("::", 1) == ["x:y.tif", "m.tif"]


def test_clean_environment_drops_qgis_python():
    env = {
        "PATH": os.pathsep.join(["/opt/qgis/python/bin", "/usr/bin", "/opt/qgis/python/Scripts"]),
        "PYTHONPATH": "/opt/qgis/python/lib",
        "PYTHONHOME": "/opt/qgis/python",
        "QGIS_PREFIX_PATH": "/opt/qgis",
        "PROJ_LIB": "/opt/qgis/share/proj",
        "GDAL_DATA": "/opt/qgis/share/gdal",
        "SOME_TOOL": "/opt/qgis/python/tool",
        "HOME": "/home/me",
        "LANG": "C.UTF-8",
    }
    clean = clean_environment(env, ["/opt/qgis/python"])
    assert clean["PATH"] == "/usr/bin"
    for gone in ("PYTHONPATH", "PYTHONHOME", "QGIS_PREFIX_PATH", "PROJ_LIB", "GDAL_DATA", "SOME_TOOL"):
        assert gone not in clean
    assert clean["HOME"] == "/home/me" and clean["LANG"] == "C.UTF-8"
    assert clean["PYTHONUNBUFFERED"] == "1" and clean["PYTHONNOUSERSITE"] == "1"


def test_clean_environment_keeps_system_prefixes_on_path():
    clean = clean_environment({"PATH": "/usr/bin:/bin"}, None)
    assert "/usr/bin" in clean["PATH"].split(os.pathsep)


def test_event_lines():
    assert parse_event_line('{"event": "progress", "stage": "teacher_a", "step": 1, "total": 6}\n') == {
        "event": "progress",
        "stage": "teacher_a",
        "step": 1,
        "total": 6,
    }
    assert parse_event_line("") is None
    assert parse_event_line("Traceback (most recent call last):") is None
    assert parse_event_line('{"no_event": 1}') is None
    assert parse_event_line("{broken") is None


def test_exit_codes_read_as_the_contract_says():
    done = classify_exit(0, False, False, done_event={"event": "done"}, run_dir="/r")
    assert done.ok and done.status == "done"
    user = classify_exit(2, False, False, {"message": "no labelled pair", "hint": "add --labelled"})
    assert user.status == "user_error" and user.message == "no labelled pair" and user.hint == "add --labelled"
    cancelled = classify_exit(143, False, True, {"message": "stopped", "cancelled": True}, run_dir="/r")
    assert cancelled.status == "cancelled" and cancelled.resumable
    oom = classify_exit(9, True, False, stderr_tail=["loading"])
    assert oom.status == "killed" and "out of memory" in oom.message and "smaller preset" in oom.hint
    crash = classify_exit(1, False, False, {"message": "ValueError: x"}, stderr_tail=["Traceback", "ValueError: x"])
    assert crash.status == "crash" and "exit code 1" in crash.details() and "Traceback" in crash.details()
    signal = classify_exit(11, True, False)
    assert signal.status == "crash" and "signal 11" in signal.message


def test_progress_and_eta_texts():
    assert overall_fraction("teacher_a", 0, 10) == 0.0
    assert 0.0 < overall_fraction("teacher_b", 5, 10) < overall_fraction("teachers_ssl", 0, 10)
    assert overall_fraction("unknown", 1, 2) is None
    assert format_eta(None) == ""
    assert format_eta(42) == "42 s left"
    assert format_eta(125) == "2 min 05 s left"
    assert format_eta(3 * 3600 + 60) == "3 h 01 min left"


def test_results_rows_and_run_folder(tmp_path):
    metrics = {
        "models": {
            "student_sslkd": {"iou": 0.5, "f1": 0.66, "params": 2_238_473, "mpx_per_s": 3.47},
            "teacher_a": {"iou": 0.6, "f1": 0.75, "params": 11_259_177},
            "my_extra": {"iou": None},
        }
    }
    rows = result_rows(metrics)
    assert [row.key for row in rows] == ["teacher_a", "student_sslkd", "my_extra"]
    assert rows[1].cells() == ["Student SSLKD", "50.0", "66.0", "2.2 M", "3.5"]
    assert rows[0].cells()[-1] == "–" and rows[2].cells()[1] == "–"
    assert comparison(rows).startswith("5.0× fewer parameters")

    folder = RunFolder(str(tmp_path / "run"))
    assert not folder.holds_run() and not folder.finished()
    (tmp_path / "run").mkdir()
    assert not folder.holds_run()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "run" / "student.onnx").write_bytes(b"x")
    assert folder.holds_run() and folder.finished() and folder.onnx.endswith("student.onnx")
    (tmp_path / "run" / "student.int8.onnx").write_bytes(b"x")  # kept by training: the faster one is used
    assert folder.onnx.endswith("student.int8.onnx")


def test_report_for_panel_drops_tables():
    text = "# Run\n\nIntro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nAfter"
    shown = report_for_panel(text)
    assert "| a |" not in shown and "Intro" in shown and "After" in shown and "Report button" in shown
