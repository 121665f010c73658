"""Scale-out: `torchrun` training with DDP on CPU (gloo, 2 ranks) and `predict --workers`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import rasterio
import torch
import torch.multiprocessing as mp

from conftest import CLI
from road_sslkd import distributed, events, trainer
from road_sslkd.config import make_config
from road_sslkd.data import DatasetSpec
from road_sslkd.runs import RunDir
from test_engine import tiny_net, write_model
from test_predict import IDENTITY, write_raster

BIN = Path(sys.executable).parent
ENV = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}, "OMP_NUM_THREADS": "1"}


def test_torchrun_two_ranks_train_one_report(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", str(BIN / "road-sslkd"), "train",
               "--data", str(tiny_dataset), "--preset", "tiny", "--steps-scale", "0.5", "--out", str(run)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stream = [json.loads(line) for line in proc.stdout.splitlines()]  # rank 0's events only
    assert [e["event"] for e in stream].count("done") == 1
    assert [e.get("kind") for e in stream].count("report") == 1
    assert not [e for e in stream if e["event"] == "error"]
    stages = [e["stage"] for e in stream if e["event"] == "progress" and e["step"] == e["total"]]
    assert stages.count("student_sslkd") == 1  # one rank reports, once
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    assert 0 <= metrics["student_sslkd"]["iou"] <= 1
    session = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((2, 3, 64, 96), np.float32)})[0]
    assert out.shape == (2, 1, 64, 96)
    assert not list(run.glob("checkpoints/*"))  # finished stages leave no checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parameters(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.named_parameters()}


def _rank(rank: int, folder: Path, port: int) -> None:
    """One gloo rank: two supervised stages (the second with gradient accumulation), then the cross-model
    stage, stopped by rank 1 alone and resumed. Dumps its first crop and its parameters after each stage."""
    from road_sslkd.teachers import CrossModelStage, SupervisedStage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    assert distributed.init(torch.device("cpu"))
    run = RunDir.open(folder / "run")
    ctx = trainer.build_context(run, torch.device("cpu"))
    dump: dict = {"crop": ctx.labelled.sample(1)["image"]}
    for index, name in enumerate(("teacher_a", "teacher_b")):
        trainer.seed_everything(distributed.rank_seed(index))
        run.config.accumulate, run.config.batch = (2, 4) if name == "teacher_b" else (1, 2)
        stage = SupervisedStage(ctx, name, getattr(run.config, name))
        trainer.run_stage(stage, ctx)
        dump[name] = _parameters(stage.trainable())
    run.config.accumulate, run.config.batch = 1, 2
    calls = []

    def stop_at_step_1() -> bool:  # asked of rank 1 alone
        calls.append(rank)
        return rank == 1 and len(calls) == 2

    trainer.stop_requested, real_stop = stop_at_step_1, trainer.stop_requested
    try:
        trainer.run_stage(distributed.main_first(lambda: CrossModelStage(ctx)), ctx)  # it caches targets
        raise AssertionError(f"rank {rank} did not stop with rank 1")
    except events.Cancelled:
        pass
    finally:
        trainer.stop_requested = real_stop
    saved = run.load_checkpoint("teachers_ssl")
    dump["checkpoint"] = (saved["step"], len(saved["rank_rngs"]))
    stage = distributed.main_first(lambda: CrossModelStage(ctx))
    trainer.run_stage(stage, ctx)
    dump["teachers_ssl"] = _parameters(stage.trainable())
    torch.save(dump, folder / f"rank{rank}.pt")


def test_ddp_ranks_stay_equal_and_resume(tiny_dataset, tmp_path):
    cfg = make_config("tiny", steps={"teacher": 2, "teachers_ssl": 4}, checkpoint_every=10, val_every=100)
    run = RunDir.create(tmp_path / "run", cfg, DatasetSpec.from_split(tiny_dataset))
    trainer.build_context(run, torch.device("cpu"))  # fits and saves the normaliser
    context = mp.spawn(_rank, args=(tmp_path, _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "distributed ranks hung"
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(first["crop"], second["crop"])  # each rank draws its own crops
    assert first["checkpoint"] == second["checkpoint"] == (1, 2)  # both stopped at rank 1's step
    for stage in ("teacher_a", "teacher_b", "teachers_ssl"):
        assert first[stage].keys() == second[stage].keys()
        for name, value in first[stage].items():
            assert torch.equal(value, second[stage][name]), f"{stage}: {name} differs between ranks"
    model = RunDir.open(tmp_path / "run").load_model("teacher_a_ssl")
    saved = dict(model.named_parameters())
    assert all(torch.equal(saved[k.split(".", 1)[1]], v) for k, v in first["teachers_ssl"].items()
               if k.startswith("teacher_a_ssl."))


def test_predict_workers_equal_serial(tmp_path):
    model = write_model(tmp_path / "m.onnx", tiny_net(), {**IDENTITY, "road_sslkd_output": "logits"})
    rng = np.random.default_rng(0)
    rasters = [write_raster(tmp_path / f"r{i}.tif", rng.integers(0, 255, (3, 90 + 7 * i, 120), np.uint8))
               for i in range(3)]
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        proc = subprocess.run([*CLI, "predict", str(model), *map(str, rasters), "--out", str(out), "--threads", "1",
                               "--workers", workers, "--vector", "--provider", "cpu"],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stream = [json.loads(line) for line in proc.stdout.splitlines()]
        done = stream[-1]
        assert done["event"] == "done" and [o["raster"] for o in done["outputs"]] == list(map(str, rasters))
        assert {e["raster_index"] for e in stream if e["event"] == "progress"} == {1, 2, 3}
        outputs[workers] = out
    for raster in rasters:
        name = f"{raster.stem}_road_prob.tif"
        with rasterio.open(outputs["1"] / name) as a, rasterio.open(outputs["2"] / name) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            np.testing.assert_array_equal(a.read_masks(), b.read_masks())
