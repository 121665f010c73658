"""INT8 quantisation of ONNX students for CPUs (onnxruntime static quantisation, QDQ format).

Measured on the project's 2-core AVX2 CPU (docs/benchmarks/inference.md): static QDQ with per-channel
weights runs the MobileNetV2 students 1.3-2x as fast as fp32, while dynamic quantisation
(ConvInteger) is slower than fp32, so static it is.

Accuracy concern: activations are clipped to the ranges seen on the calibration tiles, and AVX2 CPUs
without VNNI multiply u8 x s8 with instructions that can saturate. Calibrate on real tiles of the user's
imagery where possible, and keep the INT8 model only if its IoU on the benchmark drops by less than a point
(``road-sslkd export --int8`` checks that).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from .engine import pad_to
from .onnx_runtime import ModelInfo, load_model

CALIBRATION_TILES = 8
CALIBRATION_SIZE = 256


def synthetic_tiles(bands: int, count: int = CALIBRATION_TILES, size: int = CALIBRATION_SIZE,
                    seed: int = 0) -> Iterator[np.ndarray]:
    """Raw uint8 tiles (C, size, size) that look vaguely like imagery: smooth patches, noise, bright lines.

    A fallback only: calibration ranges from real tiles of the target imagery are better.
    """
    rng = np.random.default_rng(seed)
    for _ in range(count):
        patches = rng.uniform(30, 220, (bands, 8, 8))
        tile = np.kron(patches, np.ones((size // 8, size // 8))) + rng.normal(0, 12, (bands, size, size))
        for _ in range(3):  # roads: straight bright bands
            row = rng.integers(0, size - 6)
            tile[:, row : row + 6] = rng.uniform(150, 255)
        yield np.clip(tile, 0, 255).astype(np.uint8)


class _Calibration(CalibrationDataReader):
    def __init__(self, tiles: Iterable[np.ndarray], info: ModelInfo, input_name: str) -> None:
        self.batches = ({input_name: info.normalise(tile)[None]} for tile in tiles)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        return next(self.batches, None)


def quantize_int8(src: Path, dst: Path, calibration: Optional[Iterable[np.ndarray]] = None) -> Path:
    """Write an INT8 copy of the ONNX model ``src`` to ``dst`` (metadata kept) and return ``dst``.

    ``calibration``: raw tiles (C, H, W) of the imagery, normalised here with the model's own metadata;
    synthetic tiles when None. A model of fixed input size gets them cut or padded to that size.
    """
    model = load_model(src, "cpu")
    tiles = calibration if calibration is not None else synthetic_tiles(model.info.bands)
    side = model.info.fixed_size
    if side:
        tiles = (pad_to(tile[:, :side, :side], side, side) for tile in tiles)
    with tempfile.TemporaryDirectory(dir=Path(dst).parent, prefix=".quantize-") as scratch:
        prepared, quantised = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
        # Symbolic shape inference cannot follow smp's dynamic-size resizes; ONNX's own inference suffices.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser warns once per integer-shape tensor it skips
        try:
            quantize_static(
                str(prepared), str(quantised), _Calibration(tiles, model.info, model.input_name),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            root.setLevel(level)
        proto = onnx.load(str(quantised))
        del proto.metadata_props[:]
        for entry in onnx.load(str(src), load_external_data=False).metadata_props:
            proto.metadata_props.add(key=entry.key, value=entry.value)
        proto.metadata_props.add(key="road_sslkd_quantized", value=json.dumps("int8 static QDQ, per-channel weights"))
        onnx.save(proto, str(quantised))
        os.replace(quantised, dst)
    return Path(dst)
