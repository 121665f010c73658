"""Build dist/road_sslkd_plugin.zip for QGIS's "Install from ZIP".

The zip holds the plugin package with metadata.txt, LICENSE and resources/ inside it, and the backend's
source (pyproject.toml, README.md, src/) as road_sslkd_plugin/backend, so "Set up backend" can pip-install
it from there. Caches, build leftovers and anything git ignores never enter the zip.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "road_sslkd_plugin"
# (source in the repository, destination inside the plugin folder)
CONTENT = [
    (PACKAGE, ""),
    ("metadata.txt", "metadata.txt"),
    ("LICENSE", "LICENSE"),
    ("resources", "resources"),
    ("backend/pyproject.toml", "backend/pyproject.toml"),
    ("backend/README.md", "backend/README.md"),
    ("backend/src", "backend/src"),
]


def tracked_files() -> set[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return {ROOT / name for name in out.decode().split("\0") if name}


def build(target: Path) -> Path:
    tracked = tracked_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for source, dest in CONTENT:
            base = ROOT / source
            files = sorted(p for p in (base.rglob("*") if base.is_dir() else [base]) if p in tracked)
            if not files:
                sys.exit(f"nothing tracked under {source}: commit it first")
            for path in files:
                inner = Path(dest) / path.relative_to(base) if base.is_dir() else Path(dest)
                archive.write(path, str(Path(PACKAGE) / inner))
    tmp.replace(target)
    return target


if __name__ == "__main__":
    print(build(ROOT / "dist" / f"{PACKAGE}.zip"))
