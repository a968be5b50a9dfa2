"""The fasterrcnn command: ``fasterrcnn {export,serve,demo,detect,evaluate,prepare}`` (or ``python -m fasterrcnn``)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .options import ROOT, HelpFormatter, Options, OptionsError, add_arguments, flag_name
from .repository import StaleRepository
from .server import ServerError

DESCRIPTION = """\
torchvision's fasterrcnn_resnet50_fpn on NVIDIA Triton Inference Server.
Run "fasterrcnn COMMAND --help" for a command's options and their defaults.

exit status: 0 done (serve: stopped by Ctrl-C or SIGTERM), 1 tritonserver failed while serving,
2 the command could not start (a bad option, checkpoint or path; no tritonserver; a port in use)
"""
COMMAND = "fasterrcnn"


def build_parser(prog: str = COMMAND) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("export", help="torch model -> ONNX (checked TensorRT-ready) or TorchScript -> model repository", formatter_class=HelpFormatter,
                       description="Export the detector and write the Triton model repository.")
    add_arguments(p, ("model", "repository"))
    p = sub.add_parser("serve", help="start tritonserver on the repository (exported first if missing) until Ctrl-C "
                                              "or SIGTERM", formatter_class=HelpFormatter,
                       description="Start tritonserver on the repository (exported first if missing or with "
                                   "--rebuild) and wait; Ctrl-C or SIGTERM stops it, its model processes and "
                                   "the MPS daemon, and exits 0.")
    add_arguments(p, ("model", "repository", "server"))
    p = sub.add_parser("demo", help="export, serve, and detect on sample photographs through gRPC", formatter_class=HelpFormatter,
                       description="Export, start tritonserver, detect on scikit-image's photographs through gRPC, "
                                   "write the detections and annotated pictures, stop the server, and say which "
                                   "weights the pictures come from.")
    p.add_argument("--weights", default="auto", metavar="auto|coco|random|PATH",
                   help="'auto': torchvision's COCO weights if they are in torch's cache, else 'random' (seeded "
                        "random weights: meaningless boxes); or 'coco' or a checkpoint, as for export")
    add_arguments(p, ("model", "repository", "server"), skip=("weights", "rebuild"))
    p.add_argument("--out", type=Path, default=ROOT / "out", help="where detections and annotated images go")
    # detect, evaluate and prepare parse their own arguments (client.detect.main, client.evaluate.main,
    # fasterrcnn.prepare.main)
    sub.add_parser("detect", help="the gRPC client: detect objects in image files on a running server",
                   add_help=False)
    sub.add_parser("evaluate", help="COCO box mAP of a running server on a COCO dataset, beside torchvision's",
                   add_help=False)
    sub.add_parser("prepare", help="the Docker image's cached, locked repository preparation (from its "
                                   "environment variables)", add_help=False)
    return parser


def given_options(argv: list[str]) -> frozenset[str]:
    """The Options fields that ``argv`` sets, as opposed to those left at their defaults."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:  # argparse keeps no record of which defaults were used
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv))) - {"command"}


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "detect":
        from client import detect

        return detect.main(argv[1:], prog=f"{COMMAND} detect")
    if argv and argv[0] == "evaluate":
        from client import evaluate

        return evaluate.main(argv[1:], prog=f"{COMMAND} evaluate")
    if argv and argv[0] == "prepare":
        from .prepare import main as prepare_main

        return prepare_main(argv[1:], prog=f"{COMMAND} prepare")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "demo":
            from .demo import choose_weights

            args.weights = choose_weights(args.weights)
        options = Options.from_args(args)
    except OptionsError as e:  # named by its flags, under the subcommand's usage; exits 2, as argparse does
        _subcommand_parser(parser, args.command).error(e.spelled(flag_name))
    try:
        if args.command == "export":
            from .repository import export_repository

            export_repository(options)
            return 0
        if args.command == "serve":
            from .serve import serve

            return serve(options, given=given_options(argv))
        from .demo import demo

        return demo(options, args.out, command=f"{COMMAND} demo")
    except (ServerError, StaleRepository, OSError, ValueError, RuntimeError) as e:  # a CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
