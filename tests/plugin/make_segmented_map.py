"""Render docs/images/segmented_map.png: a SYNTHETIC demo scene, and the same map with the segmented roads.

    QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python tests/plugin/make_segmented_map.py MODEL.onnx DATA_DIR OUT.png \
        [RESOLUTION_CM]

DATA_DIR is a ``road-sslkd demo-data`` folder; its first test scene is segmented with the plugin's own
core (``core/segment.py``, the code behind "Segment visible extent") and drawn with the plugin's QML
style, offscreen with QgsMapRendererParallelJob. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QRectF, QSize, Qt  # noqa: E402
from qgis.PyQt.QtGui import QColor, QFont, QImage, QPainter  # noqa: E402

PANEL = 480
MARGIN = 12
CAPTION = 30


def render(layers: list, extent, crs) -> QImage:
    settings = QgsMapSettings()
    settings.setLayers(layers)  # first on top
    settings.setDestinationCrs(crs)
    settings.setExtent(extent)
    settings.setOutputSize(QSize(PANEL, PANEL))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


def main(model_path: str, data_dir: str, out_path: str, resolution_cm: str = "") -> int:
    work = Path(tempfile.mkdtemp(prefix="road_sslkd_map_"))
    app = QgsApplication([], True, str(work / "profile"))
    app.initQgis()
    from road_sslkd_plugin.core import segment

    data = Path(data_dir)
    split = json.loads((data / "split.json").read_text())
    image_path = data / split["test"][0]["image"]
    image = QgsRasterLayer(str(image_path), "scene", "gdal")
    model = segment.load_model(model_path)
    # RESOLUTION_CM overrides the model's ground resolution, e.g. for a student trained on other imagery.
    window = segment.plan_window(image, None, None, float(resolution_cm) if resolution_cm else model.info.resolution_cm)
    bands = segment.read_bands(image.dataProvider(), window, segment.check_bands(image, model.info.bands))
    probability = segment.predict(model, bands)
    result = QgsRasterLayer(segment.write_geotiff(str(work / "roads.tif"), probability, window), "roads", "gdal")
    segment.style_layer(result)
    layers = [result, image]
    roads = data / "roads" / f"{image_path.stem}.gpkg"
    if roads.is_file():  # the synthetic ground truth as thin cyan centrelines, for comparison
        truth = QgsVectorLayer(f"{roads}|layername=roads", "truth", "ogr")
        if truth.isValid():
            truth.renderer().symbol().setColor(QColor(0, 220, 255))
            truth.renderer().symbol().setWidth(0.35)
            layers.insert(0, truth)
    extent = image.extent()
    left = render([image], extent, image.crs())
    right = render(layers, extent, image.crs())

    canvas = QImage(2 * PANEL + 3 * MARGIN, PANEL + CAPTION + 2 * MARGIN, QImage.Format.Format_ARGB32)
    canvas.fill(QColor("white"))
    painter = QPainter(canvas)
    painter.drawImage(MARGIN, MARGIN + CAPTION, left)
    painter.drawImage(2 * MARGIN + PANEL, MARGIN + CAPTION, right)
    font = QFont()
    font.setPixelSize(15)
    painter.setFont(font)
    painter.setPen(QColor("#1a202c"))
    flags = int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    painter.drawText(QRectF(MARGIN, MARGIN, PANEL, CAPTION), flags, "Synthetic scene (not real imagery)")
    painter.drawText(
        QRectF(2 * MARGIN + PANEL, MARGIN, PANEL, CAPTION),
        flags,
        "Road probability (yellow→red)" + (", true centrelines (cyan)" if len(layers) > 2 else ""),
    )
    painter.end()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    ok = canvas.save(out_path)
    del layers, image, result, left, right
    app.exitQgis()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
