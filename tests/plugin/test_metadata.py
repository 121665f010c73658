"""metadata.txt is what QGIS's plugin manager reads: complete, and in step with the backend's version."""

import configparser
import re

from conftest import REPO
from road_sslkd_plugin.core.backend import plugin_version


def read_metadata():
    parser = configparser.ConfigParser()
    parser.read(REPO / "metadata.txt", encoding="utf-8")
    return parser["general"]


def test_metadata_has_what_qgis_needs():
    meta = read_metadata()
    required = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
                "tracker", "homepage", "tags", "category", "icon", "changelog")  # plugins.qgis.org's uploader
    for key in required:
        assert meta.get(key), key
    assert meta["name"] == "Road SSLKD"
    assert meta["qgisMinimumVersion"] == "3.22"
    assert meta["hasProcessingProvider"] == "yes"
    assert (REPO / "resources" / meta["icon"].split("/", 1)[1]).is_file()


def test_plugin_and_backend_versions_are_equal():
    backend = (REPO / "backend" / "src" / "road_sslkd" / "__init__.py").read_text(encoding="utf-8")
    backend_version = re.search(r'^__version__ = "([^"]+)"', backend, re.MULTILINE).group(1)
    assert read_metadata()["version"] == backend_version, "bump metadata.txt and road_sslkd.__version__ together"
    assert plugin_version() == backend_version  # what the dock compares with the installed backend
