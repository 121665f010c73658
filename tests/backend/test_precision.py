"""Mixed precision on the CPU: bfloat16 networks, float32 losses, the same loss as float32 within rounding."""

import torch

from road_sslkd import precision
from road_sslkd.losses import feature_distill, seg_loss
from road_sslkd.models import build_model

CPU = torch.device("cpu")


def _step(dtype):
    torch.manual_seed(0)
    model = build_model("tiny-student", 3, "none").train().to(memory_format=torch.channels_last)
    image = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    label = (torch.rand(2, 64, 64) > 0.8).float()
    with precision.autocast(CPU, dtype):
        logits, (features,) = model.forward_features(image)
        loss = seg_loss(logits, label, torch.ones_like(label, dtype=torch.bool))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits, features, loss, grads


def test_bfloat16_step_keeps_losses_in_float32_and_close_to_float32():
    logits, features, loss, grads = _step(torch.bfloat16)
    assert features.dtype == torch.bfloat16  # the network did run in bfloat16
    assert logits.dtype == loss.dtype == torch.float32
    assert torch.isfinite(grads).all()
    _, _, loss32, grads32 = _step(None)
    assert abs(loss.item() - loss32.item()) < 0.02
    assert torch.nn.functional.cosine_similarity(grads, grads32, dim=0) > 0.9  # measured 0.94: bfloat16 rounding


def test_feature_distill_accepts_bfloat16_features():
    student = torch.randn(2, 8, 16, 16).to(torch.bfloat16)
    teacher = torch.randn(2, 8, 16, 16)
    assert feature_distill(student, teacher).dtype == torch.float32


def test_amp_dtype_off_means_float32():
    assert precision.amp_dtype(CPU, enabled=False) is None
    # on the CPU, bfloat16 only where the instructions exist and the probe finds them faster
    pays = precision.cpu_bf16_pays()
    assert pays is False or precision.cpu_has_native_bf16()  # emulated bfloat16 is never chosen
    assert precision.amp_dtype(CPU) == (torch.bfloat16 if pays else None)


def test_the_environment_overrides_the_probe(monkeypatch):
    # road-sslkd bench decides once and passes the decision to its children this way.
    try:
        for value, dtype in (("1", torch.bfloat16), ("0", None)):
            monkeypatch.setenv(precision.CPU_BF16_ENV, value)
            precision.cpu_bf16_pays.cache_clear()
            assert precision.amp_dtype(CPU) == dtype
    finally:
        monkeypatch.delenv(precision.CPU_BF16_ENV)
        precision.cpu_bf16_pays.cache_clear()


def test_the_bfloat16_probe_leaves_random_streams_alone():
    precision.cpu_bf16_pays.cache_clear()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    precision.cpu_bf16_pays()
    assert torch.equal(torch.rand(3), expected)


def test_machine_names_the_instructions_that_set_speed():
    from road_sslkd.bench import machine

    cpu = machine()["cpu"]
    for flag in ("avx2", "avx512_vnni", "avx512_bf16"):
        assert (flag in cpu) == (flag in precision.cpu_flags())
