"""Small, exactly known inputs for the segmentation tests: a georeferenced raster and a pointwise ONNX model.

The model is ``sigmoid(GAIN * (band1 / 255 - 0.5))`` per pixel, built with the ``onnx`` package of the
backend venv (the plugin's venv has onnxruntime but not onnx). Because it is pointwise, tiling and
blending do not change it, so a test can recompute every output pixel from the input pixels: that checks
the georeferencing, resampling and nodata handling, not just "some values came out".
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
from osgeo import gdal, osr

from conftest import REPO

BACKEND_PYTHON = REPO / ".venv-backend" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
GAIN = 8.0
ORIGIN = (500_000.0, 5_000_000.0)  # UTM 33N
EPSG = 32633

MODEL_CODE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path, bands, meta, kind = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    gain = float(meta.pop("_gain"))
    weight = np.zeros((1, bands, 1, 1), np.float32)
    weight[0, 0] = gain
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["road_probability"]),
    ]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([-gain / 2], np.float32), "b")]
    out_shape = ["batch", 1, "height", "width"]
    if kind == "classifier":  # not a segmentation model: (N, 2) scores
        nodes.append(helper.make_node("ReduceMean", ["road_probability"], ["scores"], axes=[2, 3], keepdims=0))
        out, out_shape = "scores", ["batch", 1]
    else:
        out = "road_probability"
    graph = helper.make_graph(
        nodes, "pointwise_road", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                ["batch", bands, "height", "width"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, path)
""")


def make_model(
    path: Path,
    bands: int = 3,
    resolution_cm: Optional[float] = None,
    tile: int = 64,
    kind: str = "segmentor",
    training: Optional[dict] = None,
    threshold: float = 0.5,
) -> Path:
    """Write the pointwise road model (Deepness-style metadata: pixels / 255, mean 0, std 1, road threshold
    ``seg_thresh``); ``training`` is our provenance key ``road_sslkd_training`` as ``road-sslkd export`` writes
    it (bands, data type)."""
    meta = {
        "_gain": GAIN,
        "model_type": "Segmentor",
        "class_names": json.dumps({"0": "road"}),
        "tile_size": str(tile),
        "tiles_size": str(tile),
        "tiles_overlap": "25",
        "standardization_mean": json.dumps([0.0] * bands),
        "standardization_std": json.dumps([1.0] * bands),
        "seg_thresh": str(threshold),
        "road_sslkd_output": "probabilities",
    }
    if resolution_cm is not None:
        meta["resolution"] = str(resolution_cm)
    if training is not None:
        meta["road_sslkd_training"] = json.dumps(training)
    result = subprocess.run(
        [str(BACKEND_PYTHON), "-c", MODEL_CODE, str(path), str(bands), json.dumps(meta), kind],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return path


def expected_probability(band1: np.ndarray) -> np.ndarray:
    """What the model gives for raw band-1 values, as uint8 0-255."""
    x = band1.astype(np.float64) / 255.0
    return np.rint(255.0 / (1.0 + np.exp(-GAIN * (x - 0.5)))).astype(np.uint8)


def make_raster(
    path: Path,
    width: int = 120,
    height: int = 100,
    pixel: float = 0.5,
    bands: int = 3,
    nodata_corner: bool = True,
    transparency: Optional[str] = None,
    epsg: int = EPSG,
    origin: tuple[float, float] = ORIGIN,
) -> np.ndarray:
    """A SYNTHETIC uint8 raster (default EPSG:32633 at ``ORIGIN``): a bright diagonal "road" on a darker gradient.

    With ``nodata_corner`` the top-left 10 x 10 pixels are nodata (value 0, declared on every band). With
    ``transparency`` the left 10 columns are transparent instead: "alpha" adds an alpha band (0 there),
    "mask" a GDAL per-dataset mask inside the file. Returns the pixel values (bands, height, width).
    """
    rows, cols = np.mgrid[0:height, 0:width]
    ground = (40 + 60 * cols / width + 20 * rows / height).astype(np.uint8)
    road = np.abs(rows - cols * height / width) < 4
    band1 = np.where(road, 220, ground).astype(np.uint8)
    data = np.stack([band1] + [np.where(road, 200, ground // 2 + 10 * b).astype(np.uint8) for b in range(1, bands)])
    if nodata_corner:
        data[:, :10, :10] = 0
    alpha = transparency == "alpha"
    # GDAL would take a 4th byte band for alpha: MINISBLACK keeps every band imagery unless alpha is asked for.
    options = ["PHOTOMETRIC=RGB", "ALPHA=YES"] if alpha else ["PHOTOMETRIC=MINISBLACK"]
    gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES")  # the "mask" case: inside the file, no .msk beside it
    count = bands + 1 if alpha else bands
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), width, height, count, gdal.GDT_Byte, options)
    dataset.SetGeoTransform((origin[0], pixel, 0.0, origin[1], 0.0, -pixel))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    dataset.SetProjection(srs.ExportToWkt())
    dataset.SetMetadataItem("DESCRIPTION", "SYNTHETIC test raster, not real imagery")
    for index in range(bands):
        band = dataset.GetRasterBand(index + 1)
        band.WriteArray(data[index])
        if nodata_corner:
            band.SetNoDataValue(0)
    if transparency is not None:
        opaque = np.full((height, width), 255, np.uint8)
        opaque[:, :10] = 0
        if alpha:
            dataset.GetRasterBand(bands + 1).WriteArray(opaque)
        else:
            dataset.CreateMaskBand(gdal.GMF_PER_DATASET)
            dataset.GetRasterBand(1).GetMaskBand().WriteArray(opaque)
    dataset = None
    gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    return data
