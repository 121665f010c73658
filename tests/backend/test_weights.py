"""Pretrained encoder weights without a network: a folder of one file per encoder, the local Hugging Face
cache for "imagenet", and files that do not fit, which fail before anything is written."""

import json

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from conftest import errors
from road_sslkd import models
from road_sslkd.events import UserError
from road_sslkd.models import build_model


def _encoder_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model(arch, weights="none").net.encoder.state_dict().items()}


def _same(model: models.SegModel, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> bool:
    own = model.net.encoder.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith(skip))


def test_folder_gives_each_model_its_encoder(tmp_path, capsys):
    state = _encoder_state("tiny-unet", seed=1)
    torch.save(state, tmp_path / "resnet18.pth")  # the teachers' encoder; none for the student's mobilenet_v2

    teacher = build_model("tiny-unet", weights=str(tmp_path))
    assert _same(teacher, state)
    assert not _same(build_model("tiny-unet", weights="none"), state)

    student = build_model("tiny-student", weights=str(tmp_path))
    assert student.net.encoder.state_dict()  # built, from random initialisation
    warning = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"warning"' in line]
    assert any("mobilenet_v2" in w["message"] and "random initialisation" in w["message"] for w in warning)

    # torchvision's own cache names its files <encoder>-<hash>.pth: that folder serves as it is
    student_state = _encoder_state("tiny-student", seed=5)
    torch.save(student_state, tmp_path / "mobilenet_v2-0123abcd.pth")
    assert _same(build_model("tiny-student", weights=str(tmp_path)), student_state)


def test_rgb_weights_widen_to_more_bands(tmp_path):
    state = _encoder_state("tiny-unet", seed=2)
    torch.save(state, tmp_path / "rgb.pth")
    model = build_model("tiny-unet", in_channels=4, weights=str(tmp_path / "rgb.pth"))
    conv = model.net.encoder.conv1.weight
    assert conv.shape[1] == 4
    assert _same(model, state, skip=("conv1.",))
    out = model.eval()(torch.zeros(1, 4, 64, 64))
    assert out.shape == (1, 1, 64, 64)


@pytest.mark.parametrize("arch", ["tiny-unet", "linknet-regnetx_002"])  # smp's own encoder, a timm one
def test_imagenet_offline_from_the_hugging_face_cache(arch, tmp_path, monkeypatch):
    encoder = models.REGISTRY[arch].encoder
    if encoder.startswith("tu-"):
        repo, revision = timm.models.get_pretrained_cfg(encoder.removeprefix("tu-")).hf_hub_id, None
    else:
        settings = smp.encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
        if "repo_id" not in settings:
            pytest.skip("this segmentation-models-pytorch downloads through torch.hub, not the Hugging Face hub")
        repo, revision = settings["repo_id"], settings["revision"]
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    if revision is None:  # the hub client follows the main branch's ref to its snapshot
        revision = "0" * 40
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    state = _encoder_state(arch, seed=3)
    # timm's files name tensors as timm does, without smp's "model." wrapper
    save_file({k.removeprefix("model."): v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network, whatever this one has
    models._hub_reachable.cache_clear()
    try:
        assert _same(build_model(arch, weights="imagenet"), state)
    finally:
        models._hub_reachable.cache_clear()


def test_timm_checkpoint_in_a_folder_widens_to_more_bands(tmp_path):
    torch.manual_seed(6)
    state = timm.create_model("regnetx_002").state_dict()  # a classifier's file, head included
    torch.save(state, tmp_path / "regnetx_002.pth")  # timm's name; tu-regnetx_002.pth serves too
    model = build_model("linknet-regnetx_002", in_channels=4, weights=str(tmp_path))
    own = model.net.encoder.state_dict()
    assert own["model.stem.conv.weight"].shape[1] == 4
    loaded = [k for k in state if f"model.{k}" in own and k != "stem.conv.weight"]
    assert len(loaded) > 50 and all(torch.equal(own[f"model.{k}"], state[k]) for k in loaded)
    assert model.eval()(torch.zeros(1, 4, 64, 64)).shape == (1, 1, 64, 64)


def test_missing_weights_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model("tiny-unet", weights=str(tmp_path / "nope.pth"))


def test_a_broken_file_in_a_weights_folder_fails_before_any_stage(run_main, tmp_path, tiny_dataset):
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(_encoder_state("tiny-unet", seed=4), folder / "resnet18.pth")  # the teachers': fine
    (folder / "mobilenet_v2.pth").write_bytes(b"not a state dict")  # the student's: broken
    out = tmp_path / "run"
    code, events = run_main("train", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out),
                            "--weights", str(folder))
    assert code == 2 and "mobilenet_v2.pth" in errors(events)[0]["message"]
    assert not out.exists(), "checked before the teachers train, not when the student's stage starts"


def test_file_that_fits_no_model_fails_before_any_stage(run_main, tmp_path, tiny_dataset):
    torch.save(_encoder_state("tiny-unet", seed=4), tmp_path / "resnet18.pth")  # not the student's encoder
    out = tmp_path / "run"
    code, events = run_main("train", "--preset", "tiny", "--data", str(tiny_dataset), "--out", str(out),
                            "--weights", str(tmp_path / "resnet18.pth"))
    assert code == 2
    (error,) = errors(events)
    assert "tiny-student" in error["message"] and "folder" in error["hint"]
    assert not out.exists(), "a failed start must not leave a run folder"


def test_weights_of_another_network_are_refused_or_named(tmp_path, capsys):
    """A whole model of another architecture shares a few head names at most: refused, not loaded in part.
    A deeper sibling's encoder (resnet34 as resnet18) fits every tensor: loaded, with a warning."""
    whole = build_model("tiny-unet", weights="none")
    torch.save({f"net.{k}": v for k, v in whole.net.state_dict().items()}, tmp_path / "unet.pt")
    with pytest.raises(UserError, match="saved from another network"):
        build_model("tiny-student", weights=str(tmp_path / "unet.pt"))
    torch.save(_encoder_state("unet-resnet34", seed=2), tmp_path / "resnet18.pth")
    build_model("tiny-unet", weights=str(tmp_path / "resnet18.pth"))
    warnings = [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines() if '"warning"' in line]
    assert any("is it for a deeper network" in w for w in warnings), warnings
