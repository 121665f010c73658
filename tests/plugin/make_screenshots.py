"""Render the README screenshots of the dock: a real tiny training on generated data, grabbed offscreen.

    QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python tests/plugin/make_screenshots.py docs/images

Writes dock_data.png (inputs), dock_training.png (during the student stage) and dock_results.png (after).
Not a test (pytest does not collect it); it needs the backend venv and takes a few minutes on a CPU.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer  # noqa: E402

SIZE = (440, 820)


def main(out_dir: str) -> int:
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="road_sslkd_shots_"))
    app = QgsApplication([], True, str(work / "profile"))  # a throwaway profile: no user settings touched
    app.initQgis()
    from road_sslkd_plugin.core.layers import Pair
    from road_sslkd_plugin.ui.dock import TAB_DATA, TAB_RESULTS, TAB_RUN, RoadSSLKDDock

    data = work / "data"
    cli = REPO / ".venv-backend" / "bin" / "road-sslkd"
    subprocess.run(
        [
            str(cli),
            "demo-data",
            str(data),
            "--labelled",
            "2",
            "--unlabelled",
            "4",
            "--test",
            "1",
            "--size",
            "192",
            "--seed",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    project = QgsProject.instance()
    layers = {}
    for tif in sorted((data / "images").glob("*.tif")):
        layers[tif.stem] = QgsRasterLayer(str(tif), tif.stem.replace("_", " "), "gdal")
    for tif in sorted((data / "masks").glob("*.tif")):
        layers[tif.stem + "_mask"] = QgsRasterLayer(str(tif), tif.stem.replace("_", " ") + " mask", "gdal")
    for gpkg in sorted((data / "roads").glob("*.gpkg")):
        layers[gpkg.stem + "_roads"] = QgsVectorLayer(
            f"{gpkg}|layername=roads", gpkg.stem.replace("_", " ") + " roads", "ogr"
        )
    project.addMapLayers(list(layers.values()))

    dock = RoadSSLKDDock()
    dock.labelled.set_pairs(
        [Pair(layers["scene_000"], layers["scene_000_roads"]), Pair(layers["scene_001"], layers["scene_001_mask"])]
    )
    dock.test_pairs.set_pairs([Pair(layers["scene_006"], layers["scene_006_mask"])])
    dock.test_box.setCollapsed(False)
    dock.select_unlabelled(True)
    dock.label_width.setValue(6.0)
    dock.output_folder.setFilePath(str(work / "runs"))
    dock.run_name.setText("demo-run")
    dock.steps_scale.setValue(3.0)  # longer than the tests' runs, so the chart has curves to show
    dock.resize(*SIZE)
    dock.show()
    dock.tabs.setCurrentIndex(TAB_DATA)
    _settle(app)
    dock.grab().save(str(out / "dock_data.png"))

    shot = {"taken": False}

    def maybe_grab(event: dict) -> None:
        if (
            not shot["taken"]
            and event.get("event") == "progress"
            and event.get("stage") == "student_sslkd"
            and event.get("total")
            and event.get("step", 0) >= 0.6 * event["total"]
        ):
            dock.tabs.setCurrentIndex(TAB_RUN)
            _settle(app)
            dock.grab().save(str(out / "dock_training.png"))
            shot["taken"] = True

    dock.runner.backend_event.connect(maybe_grab)
    if not dock.start():
        print(dock.notice.text.text(), file=sys.stderr)
        return 1
    while dock.runner.is_running():
        app.processEvents()
        time.sleep(0.05)
    outcome = dock.last_outcome
    if outcome is None or not outcome.ok:
        print(outcome.message if outcome else "no outcome", outcome.details() if outcome else "", file=sys.stderr)
        return 1
    dock.tabs.setCurrentIndex(TAB_RESULTS)
    _settle(app)
    dock.grab().save(str(out / "dock_results.png"))
    dock.shutdown()
    print(f"wrote {', '.join(p.name for p in sorted(out.glob('dock_*.png')))} to {out}")
    return 0


def _settle(app: QgsApplication) -> None:
    for _ in range(10):
        app.processEvents()
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "docs" / "images")))
