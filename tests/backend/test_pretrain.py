"""`road-sslkd pretrain`: inpainting-pretrained encoders that `train` starts from (synthetic scenes)."""

import json

import torch

from conftest import errors
from road_sslkd.models import build_model
from road_sslkd.pretrain import inpainting_loss, masked_view


def test_masked_view_hides_whole_patches():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64) + 5  # no pixel is 0 before masking
    hidden, mask = masked_view(images, patch=16, ratio=0.6)
    assert mask.shape == (4, 1, 64, 64)
    cells = mask[:, 0, ::16, ::16]
    assert torch.equal(mask[:, 0], cells.repeat_interleave(16, 1).repeat_interleave(16, 2))  # 16 px squares
    assert 0.3 < float(mask.mean()) < 0.9
    assert torch.equal(hidden == 0, mask.expand_as(hidden).bool())


def test_loss_counts_hidden_valid_pixels_only():
    images = torch.zeros(1, 3, 4, 4)
    prediction = torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    assert float(inpainting_loss(prediction, images, mask, valid)) == 1.0
    prediction[..., 2:, :] = 100  # visible pixels: not part of the loss
    assert float(inpainting_loss(prediction, images, mask, valid)) == 1.0
    valid[:] = False
    assert float(inpainting_loss(prediction, images, mask, valid)) == 0.0


def test_pretrained_encoders_feed_training(run_main, tmp_path, tiny_dataset):
    out = tmp_path / "weights"
    code, events = run_main("pretrain", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out))
    assert code == 0, errors(events)
    record = json.loads((out / "pretrain.json").read_text())
    # The tiny preset's teachers share resnet18; its student is mobilenet_v2: one file per encoder.
    assert sorted(record["encoders"]) == ["mobilenet_v2", "resnet18"]
    assert [step for step, _ in record["encoders"]["resnet18"]["loss"]][-1] == 4
    state = torch.load(out / "resnet18.pth", weights_only=True)
    model = build_model("tiny-unet", 3, str(out))
    for key, value in model.net.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key

    # A second start keeps the finished encoders; other settings in the same folder are refused.
    before = (out / "resnet18.pth").stat().st_mtime_ns
    code, events = run_main("pretrain", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out))
    assert code == 0 and (out / "resnet18.pth").stat().st_mtime_ns == before
    code, events = run_main("pretrain", "--data", str(tiny_dataset), "--preset", "tiny", "--steps-scale", "1.5",
                            "--out", str(out))
    assert code == 2 and "other settings" in errors(events)[0]["message"]

    code, events = run_main("train", "--data", str(tiny_dataset), "--preset", "tiny", "--weights", str(out),
                            "--stages", "teacher_a", "--out", str(tmp_path / "run"))
    assert code == 0, errors(events)
    assert not [e for e in events if e["event"] == "warning" and "not in the file" in e.get("message", "")]


def test_pretrain_never_replaces_weights_it_did_not_write(run_main, tmp_path, tiny_dataset):
    out = tmp_path / "weights"
    out.mkdir()
    (out / "resnet18.pth").write_bytes(b"mine")
    code, events = run_main("pretrain", "--data", str(tiny_dataset), "--preset", "tiny", "--out", str(out))
    assert code == 2 and "is not one of this pretraining's encoders" in errors(events)[0]["message"]
    assert (out / "resnet18.pth").read_bytes() == b"mine"


def test_train_pretrains_its_own_encoders_first(run_main, tmp_path, tiny_dataset):
    run, config = tmp_path / "run", tmp_path / "holdout.json"
    config.write_text(json.dumps({"holdout": 1}))
    code, events = run_main("train", "--data", str(tiny_dataset), "--preset", "tiny", "--weights", "pretrain",
                            "--config", str(config), "--stages", "teacher_a,student_supervised", "--out", str(run))
    assert code == 0, errors(events)
    stages = list(dict.fromkeys(e["stage"] for e in events if e["event"] == "progress"))
    assert stages[:3] == ["pretrain_resnet18", "pretrain_mobilenet_v2", "teacher_a"]
    # The setting becomes the folder: a resumed run starts from the same encoders without pretraining again.
    folder = (run / "pretrained").resolve()
    assert json.loads((run / "config.json").read_text())["config"]["weights"] == str(folder)
    record = json.loads((folder / "pretrain.json").read_text())
    assert sorted(record["encoders"]) == ["mobilenet_v2", "resnet18"] and "--weights pretrain" in record["command"]
    # The held-out image that validates the run is not pretrained on; the training ones are.
    split = json.loads((tiny_dataset / "split.json").read_text())
    held_out, trained = (str((tiny_dataset / p["image"]).resolve()) for p in split["labelled"][:2])
    assert trained in record["settings"]["rasters"] and held_out not in record["settings"]["rasters"]
    code, events = run_main("train", "--resume", str(run), "--stages", "teacher_b")
    assert code == 0, errors(events)
    assert not [e for e in events if e["event"] == "progress" and e["stage"].startswith("pretrain")]
