"""The SYNTHETIC demo dataset generator: layout, georeferencing, labels, determinism, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize

from road_sslkd import events
from road_sslkd.demo_data import write_demo_dataset

COUNTS = {"labelled": 2, "unlabelled": 2, "test": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "data"
    split = write_demo_dataset(folder, **COUNTS, size=160, seed=7)
    assert split == folder / "split.json"
    return folder


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(), {"crs": ds.crs, "transform": ds.transform, "shape": (ds.height, ds.width),
                           "tags": ds.tags(), "bounds": ds.bounds, "dtype": ds.dtypes[0]}


def _pixels(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): _read(p)[0].tobytes() for p in sorted(folder.glob("*/*.tif"))}


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_files_and_split(dataset):
    split = json.loads((dataset / "split.json").read_text())
    assert "SYNTHETIC" in split["about"] and split["synthetic"] is True and split["seed"] == 7
    assert [len(split[k]) for k in COUNTS] == list(COUNTS.values())
    for entry in split["labelled"] + split["test"]:
        assert set(entry) == {"image", "mask"}
        assert (dataset / entry["image"]).is_file() and (dataset / entry["mask"]).is_file()
    # Unlabelled scenes are plain image paths and have no mask file at all.
    for image in split["unlabelled"]:
        assert isinstance(image, str) and (dataset / image).is_file()
        assert not (dataset / "masks" / Path(image).name).exists()
    masks = {e["mask"] for e in split["labelled"] + split["test"]}
    assert {p.relative_to(dataset).as_posix() for p in (dataset / "masks").iterdir()} == masks
    gpkgs = {f"roads/{Path(e['image']).stem}.gpkg" for e in split["labelled"]}
    assert {v["roads"] for v in split["vector_labels"]} == gpkgs
    assert {p.relative_to(dataset).as_posix() for p in (dataset / "roads").glob("*.gpkg")} == gpkgs
    readme = (dataset / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "seed 7" in readme


def test_images_and_masks_share_grid(dataset):
    split = json.loads((dataset / "split.json").read_text())
    bounds = []
    for image in [e["image"] for e in split["labelled"] + split["test"]] + split["unlabelled"]:
        rgb, info = _read(dataset / image)
        assert rgb.shape == (3, 160, 160) and info["dtype"] == "uint8"
        assert info["crs"].to_epsg() == 32633 and info["crs"].is_projected
        assert (info["transform"].a, info["transform"].e) == (0.5, -0.5)
        assert info["tags"]["SYNTHETIC"] == "yes"
        assert rgb.std() > 10  # a textured scene, not a flat fill
        bounds.append(info["bounds"])
    for entry in split["labelled"] + split["test"]:
        _, img = _read(dataset / entry["image"])
        mask, info = _read(dataset / entry["mask"])
        assert mask.shape[0] == 1 and info["dtype"] == "uint8"
        assert (info["crs"], info["transform"], info["shape"]) == (img["crs"], img["transform"], img["shape"])
    # Scenes sit at different places: no two footprints overlap.
    for i, a in enumerate(bounds):
        for b in bounds[i + 1:]:
            assert a.right <= b.left or b.right <= a.left or a.top <= b.bottom or b.top <= a.bottom


def test_masks_are_binary_with_sane_road_fraction(dataset):
    split = json.loads((dataset / "split.json").read_text())
    for entry in split["labelled"] + split["test"]:
        mask, _ = _read(dataset / entry["mask"])
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.05 <= (mask > 0).mean() <= 0.3


def test_centrelines_match_mask(dataset):
    import pyogrio
    import shapely

    split = json.loads((dataset / "split.json").read_text())
    mask_of = {e["image"]: e["mask"] for e in split["labelled"]}
    for entry in split["vector_labels"]:
        path = dataset / entry["roads"]
        info = pyogrio.read_info(path, layer="roads")
        assert info["geometry_type"] == "LineString" and "width_m" in list(info["fields"])
        assert info["crs"] == "EPSG:32633" and info["features"] > 0
        _meta, _fids, wkb, fields = pyogrio.raw.read(path, layer="roads", columns=["width_m"])
        lines, widths = shapely.from_wkb(wkb), fields[0]
        assert (widths >= 1.0).all() and (widths <= 6.5).all()  # about 3-12 px at 0.5 m
        mask, grid = _read(dataset / mask_of[entry["image"]])
        surface = shapely.buffer(lines, widths / 2)
        burnt = rasterize(list(surface), out_shape=grid["shape"], transform=grid["transform"]) > 0
        road = mask[0] > 0
        assert (burnt & road).sum() / burnt.sum() > 0.95  # buffered lines lie on road pixels
        assert (burnt & road).sum() / road.sum() > 0.95  # and explain the whole mask


def test_deterministic_per_seed(tmp_path):
    kwargs = {"labelled": 1, "unlabelled": 1, "test": 1, "size": 96}
    write_demo_dataset(tmp_path / "a", seed=5, **kwargs)
    write_demo_dataset(tmp_path / "b", seed=5, **kwargs)
    write_demo_dataset(tmp_path / "c", seed=6, **kwargs)
    a, b, c = (_pixels(tmp_path / x) for x in "abc")
    assert len(a) == 5 and a == b
    assert all(a[k] != c[k] for k in a)


def test_refuses_non_empty_folder_and_overwrite_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(events.UserError) as exc:
        write_demo_dataset(tmp_path, labelled=1, unlabelled=0, test=0, size=64)
    assert str(tmp_path) in exc.value.message and "--overwrite" in exc.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    write_demo_dataset(tmp_path, labelled=2, unlabelled=1, test=1, size=64, overwrite=True)
    assert len(list((tmp_path / "images").iterdir())) == 4
    # A smaller rerun removes the scenes it wrote before, and nothing else.
    write_demo_dataset(tmp_path, labelled=1, unlabelled=0, test=0, size=64, overwrite=True)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["scene_000.tif"]
    assert [p.name for p in (tmp_path / "roads").iterdir()] == ["scene_000.gpkg"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(events.UserError):
        write_demo_dataset(tmp_path / "x", size=32)
    with pytest.raises(events.UserError):
        write_demo_dataset(tmp_path / "y", labelled=0, unlabelled=0, test=0)


def _json_lines(stdout: str) -> list[dict]:
    lines = [json.loads(line) for line in stdout.splitlines()]  # fails on any non-JSON line
    assert lines and all("event" in e for e in lines)
    return lines


def test_register_runs_as_subprocess_without_torch(tmp_path):
    """`demo-data` through its own `register` in a bare parser; the generator must not pull in torch."""
    script = (
        "import argparse, sys\n"
        "from road_sslkd import demo_data, events\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='command', required=True)\n"
        "demo_data.register(sub)\n"
        "args = p.parse_args(sys.argv[1:]); events.setup_logging(); args.func(args)\n"
        "assert 'torch' not in sys.modules, 'demo_data imported torch'\n"
    )
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-c", script, "demo-data", str(out), "--labelled", "1", "--unlabelled", "1",
         "--test", "1", "--size", "64", "--seed", "2"],
        capture_output=True, text=True, timeout=120, env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    lines = _json_lines(proc.stdout)
    assert {"progress", "artifact", "done"} <= {e["event"] for e in lines}
    artifact = next(e for e in lines if e["event"] == "artifact")
    assert artifact["kind"] == "dataset" and Path(artifact["path"]) == out / "split.json"
    assert lines[-1]["event"] == "done" and Path(lines[-1]["split"]) == out / "split.json"


def test_real_cli(tmp_path, capsys):
    """`road-sslkd demo-data DIR` as the plugin runs it: JSON lines only on stdout, exit 0; then exit 2."""
    exe = Path(sys.executable).parent / "road-sslkd"
    out = tmp_path / "demo"
    args = [str(exe), "demo-data", str(out), "--labelled", "1", "--unlabelled", "0", "--test", "1",
            "--size", "64"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert _json_lines(proc.stdout)[-1]["event"] == "done"
    assert json.loads((out / "split.json").read_text())["labelled"]

    from road_sslkd import cli

    # The same folder again, in-process: not empty, so a user error (exit 2) with a hint.
    capsys.readouterr()
    assert cli.main(args[1:]) == 2
    error = _json_lines(capsys.readouterr().out)[-1]
    assert error["event"] == "error" and "--overwrite" in error["hint"]
