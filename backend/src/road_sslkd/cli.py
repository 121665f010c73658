"""Road SSLKD backend: train road teachers and students, export ONNX, segment rasters.

One sub-command per module, each exposing ``register(subparsers)``.

Every command reports through JSON-lines events on stdout (``road_sslkd.events``); a ``UserError`` becomes
an ``error`` event with a hint and exit code 2, any other failure an ``error`` event and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from typing import Optional

from . import __version__, events

# Sub-command -> (module with ``register``, one-line help). Only the module of the command being run is
# imported, so light commands (predict, demo-data) never load torch.
COMMANDS = {
    "train": ("road_sslkd.pipeline", "train teachers and the SSLKD student, export student.onnx"),
    "evaluate": ("road_sslkd.evaluate", "evaluate trained models of a run on test rasters"),
    "export": ("road_sslkd.export", "export a trained model of a run to ONNX"),
    "predict": ("road_sslkd.predict", "segment roads in rasters with an ONNX model"),
    "pretrain": ("road_sslkd.pretrain", "learn encoder weights from the dataset's own imagery, for --weights"),
    "bench": ("road_sslkd.bench", "compare students and teachers on a dataset"),
    "ablate": ("road_sslkd.ablation", "retrain the SSLKD student with one setting changed per variant"),
    "bench-inference": ("road_sslkd.bench_inference", "measure ONNX and torch inference speed and memory"),
    "bench-training": ("road_sslkd.bench_training", "measure seconds per training step, float32 and mixed precision"),
    "demo-data": ("road_sslkd.demo_data", "write a small synthetic dataset"),
    "demo": ("road_sslkd.demo", "the whole job on embedded synthetic data, in minutes"),
}

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 143


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser of ``command``; the others appear in --help by name only."""
    parser = argparse.ArgumentParser(prog="road-sslkd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"road-sslkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    args.command_line = shlex.join(["road-sslkd", *argv])  # recorded in reports
    events.setup_logging(args.verbose)
    try:
        args.func(args)
    except events.UserError as exc:
        events.error(exc.message, exc.hint)
        return EXIT_USER_ERROR
    except events.Cancelled as exc:
        events.error(str(exc), exc.hint, cancelled=True)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        events.error("interrupted", "run the command again (training: --resume RUN_DIR)", cancelled=True)
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - the protocol promises an error event for every failure
        logging.getLogger("road_sslkd").exception("unexpected failure")
        events.error(f"{type(exc).__name__}: {exc}", "this is a bug; the log on stderr has the traceback")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
