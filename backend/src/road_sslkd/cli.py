"""`road-sslkd` command line: one sub-command per module, each exposing ``register(subparsers)``.

Every command reports through JSON-lines events on stdout (``road_sslkd.events``); a ``UserError`` becomes
an ``error`` event with a hint and exit code 2, any other failure an ``error`` event and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from . import __version__, events

# Sub-command modules, imported lazily so that `road-sslkd --help` and light commands start fast.
COMMAND_MODULES = (
    "road_sslkd.pipeline",  # train
    "road_sslkd.evaluate",  # evaluate
    "road_sslkd.export",  # export
    "road_sslkd.predict",  # predict
    "road_sslkd.bench",  # bench
    "road_sslkd.demo_data",  # demo-data
    "road_sslkd.demo",  # demo
)

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 143


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="road-sslkd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"road-sslkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    events.setup_logging(args.verbose)
    try:
        args.func(args)
    except events.UserError as exc:
        events.error(exc.message, exc.hint)
        return EXIT_USER_ERROR
    except events.Cancelled as exc:
        events.error(str(exc), "continue with --resume RUN_DIR", cancelled=True)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        events.error("interrupted", "continue with --resume RUN_DIR", cancelled=True)
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - the protocol promises an error event for every failure
        logging.getLogger("road_sslkd").exception("unexpected failure")
        events.error(f"{type(exc).__name__}: {exc}", "this is a bug; the log on stderr has the traceback")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
