"""Reading rasters by window, nodata, vector road labels, normalisation, crops, pair parsing."""

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
import torch
from rasterio.transform import from_origin

from road_sslkd import data
from road_sslkd.data import CropSampler, Label, Normalizer, Pair, Raster, parse_pair, road_prior
from road_sslkd.targets import prior_threshold


def _write(path, array, nodata=None, crs="EPSG:32633", res=0.5, origin=(500000, 5000000)):
    array = array if array.ndim == 3 else array[None]
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                       count=array.shape[0], dtype=array.dtype, crs=crs, nodata=nodata, photometric="minisblack",
                       transform=from_origin(*origin, res, res)) as dst:
        dst.write(array)
    return path


def _write_lines(path, lines, crs, **fields):
    pyogrio.raw.write(path, geometry=shapely.to_wkb(np.array(lines)), field_data=list(fields.values()),
                      fields=list(fields), geometry_type="LineString", crs=crs, driver="GPKG")
    return path


def test_windowed_reads_equal_cached_reads(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (4, 70, 90), dtype=np.uint8)
    path = _write(tmp_path / "img.tif", pixels)
    cached = Raster(path, [3, 1])
    monkeypatch.setattr(data, "CACHE_PIXELS", 10)
    streamed = Raster(path, [3, 1])
    assert streamed._cache is None and cached._cache is not None
    a, va = cached.read(5, 7, 30, 40)
    b, vb = streamed.read(5, 7, 30, 40)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0] * 255, pixels[2, 5:35, 7:47].astype(np.float32))
    assert va.all() and vb.all()


def test_uint16_and_nodata(tmp_path):
    pixels = np.full((3, 20, 20), 1000, np.uint16)
    pixels[:, :5, :] = 0
    raster = Raster(_write(tmp_path / "img.tif", pixels, nodata=0), [1, 2, 3])
    image, valid = raster.read(0, 0, 20, 20)
    assert not valid[:5].any() and valid[5:].all()
    assert image[0, 10, 10] == pytest.approx(1000 / 255)


def test_vector_lines_are_rasterised_with_width(tmp_path):
    image = _write(tmp_path / "img.tif", np.zeros((3, 100, 100), np.uint8))
    # A horizontal road through the middle row (y = 5000000 - 25 m), 5 m wide = 10 px at 0.5 m.
    line = shapely.LineString([(500000, 4999975), (500050, 4999975)])
    gpkg = _write_lines(tmp_path / "roads.gpkg", [line], "EPSG:32633")
    pair = Pair(image, gpkg)
    assert pair.is_vector
    label = Label(pair, Raster(image, [1, 2, 3]), width=5.0)
    mask = label.read(0, 0, 100, 100)
    rows = np.where(mask.any(axis=1))[0]
    assert rows.min() == 45 and rows.max() == 54  # 10 rows around row 50
    assert mask[50].all()


def test_vector_labels_in_another_crs_are_reprojected(tmp_path):
    image = _write(tmp_path / "img.tif", np.zeros((3, 100, 100), np.uint8))
    from rasterio.warp import transform

    xs, ys = transform("EPSG:32633", "EPSG:4326", [500000, 500050], [4999975, 4999975])
    gpkg = _write_lines(tmp_path / "roads_wgs84.gpkg", [shapely.LineString(list(zip(xs, ys)))], "EPSG:4326")
    mask = Label(Pair(image, gpkg), Raster(image, [1, 2, 3]), width=5.0).read(0, 0, 100, 100)
    assert mask[50, 5:95].all() and not mask[30].any()


def test_road_widths_over_a_geographic_image_are_metres(tmp_path):
    # 100 x 100 px of 1e-5 degrees at 45 N: a pixel is 1.11 m high, so a 6 m wide road covers 5 to 6 rows
    # (6 degrees would cover the whole image).
    image = _write(tmp_path / "img.tif", np.zeros((3, 100, 100), np.uint8), crs="EPSG:4326", res=1e-5,
                   origin=(15.0, 45.0))
    y = 45.0 - 50.5e-5  # the centre of row 50
    gpkg = _write_lines(tmp_path / "roads.gpkg", [shapely.LineString([(15.0, y), (15.001, y)])], "EPSG:4326")
    mask = Label(Pair(image, gpkg), Raster(image, [1, 2, 3]), width=6.0).read(0, 0, 100, 100)
    rows = np.where(mask.any(axis=1))[0]
    assert mask[50].all() and 5 <= len(rows) <= 6 and rows.min() >= 47 and rows.max() <= 53


def test_a_width_field_holding_text_is_named(tmp_path):
    image = _write(tmp_path / "img.tif", np.zeros((3, 100, 100), np.uint8))
    line = shapely.LineString([(500000, 4999975), (500050, 4999975)])
    gpkg = _write_lines(tmp_path / "roads.gpkg", [line, line], "EPSG:32633",
                        Width=np.array(["5 m", "4"], dtype=object))
    with pytest.raises(data.UserError, match="road width field 'Width' .* holds '5 m', not a number") as error:
        Label(Pair(image, gpkg), Raster(image, [1, 2, 3]), width=5.0)
    assert "plain numbers" in error.value.hint


def test_normaliser_and_crops(tmp_path):
    rng = np.random.default_rng(1)
    image = _write(tmp_path / "img.tif", rng.integers(0, 255, (3, 50, 40), dtype=np.uint8))
    mask = _write(tmp_path / "mask.tif", (rng.random((50, 40)) > 0.7).astype(np.uint8) * 255)
    raster = Raster(image, [1, 2, 3])
    label = Label(Pair(image, mask), raster, 1.0)
    norm = Normalizer.fit([raster])
    pixels, _ = raster.read(0, 0, 50, 40)
    standardised = norm(pixels)
    assert np.abs(standardised.mean(axis=(1, 2))).max() < 0.05
    sampler = CropSampler([raster], [label], crop=64, normalizer=norm, seed=0)
    batch = sampler.sample(3)
    assert batch["image"].shape == (3, 3, 64, 64)
    # A crop larger than the raster is padded and the padding marked invalid.
    assert batch["valid"][:, :50, :40].all() and not batch["valid"][:, 50:, :].any()
    assert set(np.unique(batch["label"].numpy())) <= {0.0, 1.0}


def test_teacher_targets_are_cropped_with_the_image(tmp_path):
    rng = np.random.default_rng(2)
    image = _write(tmp_path / "img.tif", rng.integers(0, 255, (3, 80, 70), dtype=np.uint8))
    truth = (rng.random((80, 70)) > 0.7).astype(np.uint8)
    raster = Raster(image, [1, 2, 3])
    label = Label(Pair(image, _write(tmp_path / "mask.tif", truth)), raster, 1.0)
    plain = CropSampler([raster], [label], crop=32, normalizer=Normalizer.fit([raster]), seed=5)
    # Two "teachers": one that reproduces the labels exactly, one that is their negative.
    sampler = plain.with_targets([[truth * 255], [(1 - truth) * 255]])
    batch, same = sampler.sample(4), plain.sample(4)
    assert torch.equal(batch["image"], same["image"])  # same seed, same crops as the sampler it came from
    assert batch["targets"].shape == (4, 2, 32, 32)
    assert torch.equal(batch["targets"][:, 0], batch["label"])
    assert torch.equal(batch["targets"][:, 1], 1 - batch["label"])


def test_road_prior_weighs_masks_by_area(tmp_path):
    small, large = np.zeros((10, 10), np.uint8), np.zeros((20, 20), np.uint8)
    small[:5], large[:2] = 1, 1  # 50 % and 10 % road
    labels = []
    for name, mask in (("small", small), ("large", large)):
        image = _write(tmp_path / f"{name}.tif", np.zeros((3, *mask.shape), np.uint8))
        labels.append(Label(Pair(image, _write(tmp_path / f"{name}_mask.tif", mask)), Raster(image, [1, 2, 3]), 1.0))
    assert road_prior(labels) == pytest.approx((50 + 40) / 500)


def test_prior_threshold_of_the_teacher_ensemble():
    # Two teachers over two rasters (uint8 maps); the ensemble is their mean.
    a = [np.full((4, 5), 200, np.uint8), np.zeros((2, 5), np.uint8)]
    b = [np.full((4, 5), 100, np.uint8), np.full((2, 5), 255, np.uint8)]
    b[0][0] = 250  # the first row's ensemble is 225/255, the others' 150/255 and the second raster's 127.5/255
    assert prior_threshold([a, b], fraction=5 / 30) == pytest.approx(300 / 510)  # only row 0 lies above
    assert prior_threshold([a, b], fraction=20 / 30) == pytest.approx(255 / 510)
    assert prior_threshold([a], fraction=0.0) == pytest.approx(200 / 255)


def test_a_dataset_given_by_a_relative_folder_is_stored_with_absolute_paths(tiny_dataset, monkeypatch):
    monkeypatch.chdir(tiny_dataset.parent)
    stored = data.DatasetSpec.from_split(tiny_dataset.name).to_json()
    monkeypatch.chdir(tiny_dataset / "images")  # a later `train --resume` from elsewhere
    spec = data.DatasetSpec.from_json(stored)
    paths = [*spec.unlabelled, *(q.image for q in spec.labelled), *(q.label for q in [*spec.labelled, *spec.test])]
    assert len(paths) == 7 and all(p.is_absolute() and p.is_file() for p in paths)


def test_parse_pair_handles_windows_drives():
    assert parse_pair("a.tif:b.gpkg") == Pair(data.Path("a.tif"), data.Path("b.gpkg"))
    pair = parse_pair(r"C:\data\a.tif:D:\labels\b.tif")
    assert str(pair.image) == r"C:\data\a.tif" and str(pair.label) == r"D:\labels\b.tif"
    with pytest.raises(data.UserError):
        parse_pair("only-one-path.tif")


def test_width_field_of_road_lines_wins_over_default(tiny_dataset):
    image = tiny_dataset / "images" / "scene_000.tif"
    raster = Raster(image, [1, 2, 3])
    from_lines = Label(Pair(image, tiny_dataset / "roads" / "scene_000.gpkg"), raster, width=50.0)
    from_mask = Label(Pair(image, tiny_dataset / "masks" / "scene_000.tif"), raster, width=0)
    a, b = from_lines.read(0, 0, 96, 96) == 1, from_mask.read(0, 0, 96, 96) == 1
    assert (a & b).sum() / (a | b).sum() > 0.9  # a 50 m default would flood the scene


def test_teacher_features_are_cropped_on_their_grid(tmp_path):
    # Band 1 holds each pixel's row, band 2 its column; the "teacher features" (stride 2) hold them halved.
    rows, cols = np.mgrid[0:80, 0:70]
    image = _write(tmp_path / "img.tif", np.stack([rows, cols, rows]).astype(np.uint8))
    raster = Raster(image, [1, 2, 3])
    norm = Normalizer.fit([raster])
    features = np.stack([rows[::2, ::2] // 2, cols[::2, ::2] // 2]).astype(np.int8)
    sampler = CropSampler([raster], None, crop=32, normalizer=norm, seed=3).with_targets(
        [[np.zeros((80, 70), np.uint8)]], [(2, [features])])
    batch = sampler.sample(6)
    assert batch["features_0"].shape == (6, 2, 16, 16)
    pixel = (batch["image"] * torch.tensor(norm.std)[:, None, None] + torch.tensor(norm.mean)[:, None, None]) * 255
    pixel = pixel.round()
    assert (pixel[:, 0, 0, 0] % 2 == 0).all() and (pixel[:, 1, 0, 0] % 2 == 0).all()  # crops start on the grid
    torch.testing.assert_close(batch["features_0"][:, 0] * 127, pixel[:, 0, ::2, ::2] // 2)
    torch.testing.assert_close(batch["features_0"][:, 1] * 127, pixel[:, 1, ::2, ::2] // 2)
    with pytest.raises(data.UserError, match="feature stride 3"):
        CropSampler([raster], None, crop=32, normalizer=norm, seed=3, features=[(3, [features])])


def test_decoder_feature_layers_step_back_through_the_decoder():
    from road_sslkd.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny-unet", weights="none").eval()
    assert [model.feature_shape(k, 3)[1] for k in (0, 1, 2)] == [1, 2, 4]  # each layer one step coarser
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, (last, coarse) = model.forward_features(x, layers=(0, 2))
        assert coarse.shape[-2:] == (16, 16)
        torch.testing.assert_close(logits, model.net.segmentation_head(last))  # layer 0 is what the head reads
        torch.testing.assert_close(logits, model(x))  # asking for more layers changes nothing else
    assert all(not block._forward_hooks for block in model.net.decoder.blocks)
    with pytest.raises(data.UserError, match="tiny-fpn has no decoder feature layer 1"):
        build_model("tiny-fpn", weights="none").feature_shape(1, 3)


def test_teacher_features_of_large_rasters_are_stitched_from_blocks(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from road_sslkd import targets
    from road_sslkd.models import build_model

    rng = np.random.default_rng(4)
    raster = Raster(_write(tmp_path / "img.tif", rng.integers(0, 255, (3, 200, 170), dtype=np.uint8)), [1, 2, 3])
    torch.manual_seed(0)
    model = build_model("tiny-fpn", weights="none").eval()
    ctx = SimpleNamespace(normalizer=Normalizer.fit([raster]), device=torch.device("cpu"), in_channels=3,
                          config=SimpleNamespace(amp=False))  # float32: blocks and whole raster compared exactly
    channels, stride = model.feature_shape(0, 3)
    whole = targets._raster_features(model, raster, ctx, channels, stride)
    monkeypatch.setattr(targets, "WHOLE_RASTER_PX", 64)  # 4 x 3 blocks, each with 64 px of context around it
    blocks = targets._raster_features(model, raster, ctx, channels, stride)
    assert whole.shape == blocks.shape == (channels, -(-200 // stride), -(-170 // stride))
    norms = np.linalg.norm(blocks.astype(np.float32) / 127, axis=0)
    assert np.allclose(norms, 1.0, atol=0.05)  # stored per-pixel normalised
    cosine = (whole.astype(np.float32) * blocks).sum(0) / 127**2
    assert np.median(cosine) > 0.99 and cosine.min() > 0.8


def test_teacher_maps_with_test_time_augmentation_do_not_depend_on_orientation(tmp_path):
    from types import SimpleNamespace

    from road_sslkd.models import build_model
    from road_sslkd.targets import teacher_maps

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (3, 96, 96), dtype=np.uint8)
    upright = Raster(_write(tmp_path / "upright.tif", pixels), [1, 2, 3])
    turned = Raster(_write(tmp_path / "turned.tif", np.ascontiguousarray(np.rot90(pixels, 1, (1, 2)))), [1, 2, 3])
    torch.manual_seed(0)
    model = build_model("tiny-fpn", weights="none").eval()
    run = SimpleNamespace(path=tmp_path / "run", load_model=lambda name: model)
    ctx = SimpleNamespace(run=run, device=torch.device("cpu"), normalizer=Normalizer.fit([upright]),
                          config=SimpleNamespace(tile=64, overlap=25, amp=False))  # float32: exact symmetry
    plain = teacher_maps(ctx, "teacher", [upright, turned])
    tta = teacher_maps(ctx, "teacher", [upright, turned], tta=True)
    folder = run.path / "targets" / "teacher"
    assert len(list(folder.glob("*.npy"))) == len(list((folder / "dihedral").glob("*.npy"))) == 2
    # One pass sees a rotated scene differently; the mean over the 8 views is the same map, rotated.
    assert np.abs(np.rot90(plain[0]).astype(int) - plain[1]).max() > 1
    assert np.abs(np.rot90(tta[0]).astype(int) - tta[1]).max() <= 1
