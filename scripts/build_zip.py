"""Build dist/road_sslkd_plugin.zip for QGIS's "Install from ZIP".

The zip holds the plugin package with metadata.txt, LICENSE and resources/ inside it, and the backend's
source (pyproject.toml, README.md, src/) as road_sslkd_plugin/backend, so "Set up backend" can pip-install
it from there. Only files git tracks or would track (not ignored) enter it, and never caches or compiled
files, so a dirty checkout (venvs, runs, demo output, __pycache__) still gives a clean zip.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

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


# Never shipped even if someone commits them or git does not ignore them: QGIS would load stale bytecode,
# plugins.qgis.org refuses __pycache__, __MACOSX and .git, hidden files (.DS_Store) and pip's egg-info
# are clutter, and data does not belong in a plugin.
EXCLUDED_PARTS = {"__pycache__", "__MACOSX"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo", ".onnx", ".pt", ".pth", ".tif", ".tiff", ".zip"}


def tracked_files(root: Path) -> Optional[set[Path]]:
    """Files git tracks plus new files it does not ignore (so an uncommitted new module is not left out).

    None outside a git checkout (a source archive): then only the cache and data filters apply.
    """
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        out = subprocess.run(command, cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {root / name for name in out.decode().split("\0") if name}


def shippable(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    unwanted = any(p in EXCLUDED_PARTS or p.startswith(".") or p.endswith(".egg-info") for p in parts)
    return path.is_file() and not unwanted and path.suffix.lower() not in EXCLUDED_SUFFIXES


def build(target: Path, root: Path = ROOT) -> Path:
    """Write the plugin zip of the checkout ``root`` to ``target`` (via a temporary name: never half-written)."""
    tracked = tracked_files(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for source, dest in CONTENT:
            base = root / source
            candidates = base.rglob("*") if base.is_dir() else [base]
            files = sorted(p for p in candidates if (tracked is None or p in tracked) and shippable(p, root))
            if not files:
                sys.exit(f"nothing to ship under {source}: is it ignored by git?")
            for path in files:
                inner = Path(dest) / path.relative_to(base) if base.is_dir() else Path(dest)
                archive.write(path, str(Path(PACKAGE) / inner))
    tmp.replace(target)
    return target


if __name__ == "__main__":
    # Optional argument: where to write the zip (the install test builds into a temporary folder).
    print(build(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "dist" / f"{PACKAGE}.zip"))
