"""Paths of the plugin's files in resources/ (inside the plugin zip, or at the checkout's root)."""

from __future__ import annotations

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent


def resource_path(name: str) -> str:
    """``resources/<name>``: the plugin zip bundles the folder; a checkout has it next to the plugin."""
    for base in (PLUGIN_DIR / "resources", PLUGIN_DIR.parent / "resources"):
        if (base / name).is_file():
            return str(base / name)
    return ""


def icon_path() -> str:
    return resource_path("icon.svg")


def segment_icon_path() -> str:
    return resource_path("segment_extent.svg")
