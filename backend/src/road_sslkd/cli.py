"""Road SSLKD backend: train road teachers and students, export ONNX, segment rasters.

One sub-command per module, each exposing ``register(subparsers)``.

Every command reports through JSON-lines events on stdout (``road_sslkd.events``); a ``UserError``, a bad
command line and an --out that cannot be written become an ``error`` event with a hint and exit code 2, any
other failure an ``error`` event and exit code 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn, Optional

from . import __version__, events

# Sub-command -> (module with ``register``, one-line help). Only the module of the command being run is
# imported, so light commands (predict, demo-data) never load torch.
COMMANDS = {
    "train": ("road_sslkd.pipeline", "train teachers and the SSLKD student, export student.onnx"),
    "evaluate": ("road_sslkd.evaluate", "evaluate trained models of a run on test rasters"),
    "export": ("road_sslkd.export", "export a trained model of a run to ONNX"),
    "predict": ("road_sslkd.predict", "segment roads in rasters with an ONNX model"),
    "centrelines": ("road_sslkd.centrelines", "road centrelines (GeoPackage) of a road probability GeoTIFF"),
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


class Parser(argparse.ArgumentParser):
    """argparse whose errors also reach stdout as the protocol's ``error`` event (the plugin reads only that);
    the usage text still goes to stderr, and the exit code stays 2. Sub-command parsers share the class."""

    def error(self, message: str) -> NoReturn:
        events.emit("error", message=f"{self.prog}: {message}", hint=f"see {self.prog} --help")
        super().error(message)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser of ``command``; the others appear in --help by name only."""
    parser = Parser(prog="road-sslkd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"road-sslkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _output_error(exc: OSError, out: Optional[Path]) -> Optional[events.UserError]:
    """The user's error when ``exc`` concerns ``--out`` (the path, one under it or one of its parents): an
    existing file, a path under a file, a read-only or system place. None for any other path."""
    if out is None or exc.filename is None:
        return None
    path, target = Path(os.path.abspath(exc.filename)), Path(os.path.abspath(out))
    if path != target and target not in path.parents and path not in target.parents:
        return None
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        hint = "a file stands where --out needs a folder: choose another --out"
    elif exc.errno == errno.EISDIR:
        hint = "a folder stands where --out needs a file: give a file name"
    else:
        hint = "choose an --out in a folder you can write to (not a read-only or system place such as /proc)"
    where = "" if path == target else f" ({exc.filename})"
    return events.UserError(f"cannot write --out {out}: {exc.strerror}{where}", hint)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    args.command_line = shlex.join(["road-sslkd", *argv])  # recorded in reports
    events.setup_logging(args.verbose)
    try:
        try:
            args.func(args)
        except OSError as exc:
            problem = _output_error(exc, getattr(args, "out", None))
            if problem is None:
                raise
            raise problem from exc
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
