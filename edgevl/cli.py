"""The ``edgevl`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgevl import __version__
from edgevl.config import DEFAULT_MODEL, PRECISIONS
from edgevl.errors import EdgevlError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgevl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer questions about image files; one JSON record per image on stdout")
    ask.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    ask.add_argument("-q", "--question", action="append", default=[], dest="questions",
                     help="a question: 'TEXT', 'yes_no: TEXT', 'number: TEXT', 'json: TEXT' or "
                          "'choice(A|B|C): TEXT' (repeatable)")
    ask.add_argument("--rules", type=Path, help="rules file to take the questions from")
    ask.add_argument("--rule", help="name of the rule in --rules")
    ask.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face repo id (local cache) or directory")
    ask.add_argument("--precision", choices=PRECISIONS, default="float32")
    ask.add_argument("--max-pixels", type=int, default=None, help="resize images to at most this many pixels")
    ask.add_argument("--threads", type=int, default=0, help="0: one per usable core")
    ask.add_argument("--max-batch", type=int, default=0, help="rows decoded together; 0: from the core count")

    run = sub.add_parser("run", help="the daemon: watch the rules' folders and answer every image")
    run.add_argument("-c", "--config", type=Path, default=Path("/etc/edgevl/edgevl.toml"))
    chk = sub.add_parser("check", help="validate the configuration and the rules; every error with file and key")
    chk.add_argument("-c", "--config", type=Path, default=Path("/etc/edgevl/edgevl.toml"))

    model = sub.add_parser("model", help="manage model files")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = model_sub.add_parser("pull", help="download a model into the local Hugging Face cache")
    pull.add_argument("model_id", nargs="?", default=DEFAULT_MODEL)

    bench = sub.add_parser("bench", help="measure workload W4 on a random checkpoint with the real 2B shapes")
    bench.add_argument("--precision", action="append", choices=PRECISIONS, dest="precisions")
    bench.add_argument("--json", action="store_true", help="one JSON object per precision on stdout")
    bench.add_argument("--checkpoint", type=Path, default=None, help="where the random checkpoint is cached")
    bench.add_argument("--write-doc", type=Path, default=None, help="write the results as Markdown to this file")
    bench.add_argument("--threads", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from edgevl.logsetup import setup_logging

    setup_logging(args.verbose)
    try:
        if args.command == "run":
            from edgevl.daemon.loop import run

            return run(args.config)
        if args.command == "check":
            from edgevl.commands.check import check

            config, rules = check(args.config)
            print(f"{args.config}: ok; {config.rules}: {len(rules.rules)} rules "
                  f"({', '.join(r.name for r in rules.rules)})")
            return 0
        if args.command == "ask":
            from edgevl.commands.ask import run_ask

            return run_ask(args.images, args.questions, args.rules, args.rule, args.model, args.precision,
                           args.max_pixels, args.threads, args.max_batch)
        if args.command == "model":
            from edgevl.engine.model_files import pull_model

            print(pull_model(args.model_id))
            return 0
        if args.command == "bench":
            from edgevl.bench.command import run_bench

            return run_bench(args.precisions or ["float32", "int8"], args.json, args.checkpoint,
                             args.write_doc, args.threads)
    except EdgevlError as exc:
        print(f"edgevl: {exc.message}", file=sys.stderr)
        return 2
    return 2
