"""Road SSLKD backend: semi-supervised knowledge distillation for road segmentation.

This package's top level imports nothing heavy: `road_sslkd.engine` must stay importable
with numpy and onnxruntime alone, because the QGIS plugin runs it in-process.
"""

__version__ = "0.1.0"
