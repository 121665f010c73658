"""Road SSLKD QGIS plugin: train a small road-segmentation student from a few labels and much imagery.

Nothing heavy is imported here or in ``plugin``: QGIS must start even when numpy, onnxruntime or the
training backend are missing. The plugin never imports torch; training runs in the backend's own venv.
"""


def classFactory(iface):  # noqa: ANN001, ANN201, N802 - QGIS's entry point name and signature
    from .plugin import RoadSSLKDPlugin

    return RoadSSLKDPlugin(iface)
