"""The ``edgevl`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgevl import __version__
from edgevl.config import DEFAULT_MODEL, PRECISIONS
from edgevl.errors import EdgevlError
from edgevl.logsetup import LEVELS, setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgevl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (as --log-level debug)")
    parser.add_argument("--log-level", choices=LEVELS, default=None,
                        help="log messages at this level and above (default: [log] level for run, else info)")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer questions about image files; one JSON record per image on stdout")
    ask.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to answer")
    ask.add_argument("-q", "--question", action="append", default=[], dest="questions",
                     help="a question: 'TEXT', 'yes_no: TEXT', 'number: TEXT', 'json: TEXT' or "
                          "'choice(A|B|C): TEXT' (repeatable)")
    ask.add_argument("--rules", type=Path, help="rules file to take the questions from")
    ask.add_argument("--rule", help="name of the rule in --rules")
    ask.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face repo id (local cache) or directory")
    ask.add_argument("--precision", choices=PRECISIONS, default="float32", help="weights and arithmetic")
    ask.add_argument("--max-pixels", type=int, default=None, help="resize images to at most this many pixels")
    ask.add_argument("--threads", type=int, default=0, help="0: one per usable core")
    ask.add_argument("--max-batch", type=int, default=0, help="rows decoded together; 0: from the core count")
    ask.add_argument("--max-frames", type=int, default=0,
                     help="images answered together (the stream mode); 0: from the core count; 1: each alone")

    ev = sub.add_parser("eval", help="measure a rule's answers against labelled images, per precision; "
                                     "a JSON summary on stdout")
    ev.add_argument("folder", type=Path, metavar="DIR", help="the labelled images with labels.csv or labels.jsonl")
    ev.add_argument("-c", "--config", type=Path, default=None,
                    help="the appliance's edgevl.toml: its rules file, model, precision and max_pixels")
    ev.add_argument("--rules", type=Path, default=None, help="rules file holding the rule (default: from -c)")
    ev.add_argument("--rule", required=True, help="name of the rule to evaluate")
    ev.add_argument("--labels", type=Path, default=None, help="the labels file (default: DIR/labels.csv or .jsonl)")
    ev.add_argument("--model", default=None, help="Hugging Face repo id (local cache) or directory "
                                                  "(default: from -c, else " + DEFAULT_MODEL + ")")
    ev.add_argument("--precision", default=None,
                    help=f"comma-separated precisions to compare ({', '.join(PRECISIONS)}; default: from -c, "
                         "else float32)")
    ev.add_argument("--max-pixels", type=int, default=None,
                    help="the model's resolution where the rule sets none (default: from -c, else the model's)")
    ev.add_argument("--report", type=Path, default=None, help="write a self-contained HTML report with plots here")
    ev.add_argument("--max-false-alarm-rate", type=float, default=0.01,
                    help="the proposed alarm_above keeps false alarms at most this rate on the labels")
    ev.add_argument("--tolerance", type=float, default=0.0, help="number answers within this of the label count")
    ev.add_argument("--calibrate", action="store_true",
                    help="fit a calibration per yes_no and choice question and propose it with alarm_above")
    ev.add_argument("--write", action="store_true",
                    help="with --calibrate: write the proposals into the rules file, comments kept")
    ev.add_argument("--cache", type=Path, default=None,
                    help="answers kept between runs (default: ~/.cache/edgevl/eval-answers.jsonl)")
    ev.add_argument("--threads", type=int, default=None, help="0: one per usable core (default: from -c, else 0)")

    run = sub.add_parser("run", help="the daemon: watch the rules' folders and answer every image")
    run.add_argument("-c", "--config", type=Path, default=Path("/etc/edgevl/edgevl.toml"),
                     help="the configuration file (default: /etc/edgevl/edgevl.toml)")
    chk = sub.add_parser("check", help="validate the configuration and the rules; every error with file and key")
    chk.add_argument("-c", "--config", type=Path, default=Path("/etc/edgevl/edgevl.toml"),
                     help="the configuration file (default: /etc/edgevl/edgevl.toml)")

    cfg = sub.add_parser("config", help="the settings as the code defines them")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("reference", help="every key of edgevl.toml and the rules file, as Markdown (docs/config.md)")
    cfg_sub.add_parser("schema", help="JSON Schema of edgevl.toml and the rules file, for editors")

    model = sub.add_parser("model", help="manage model files")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = model_sub.add_parser("pull", help="download a model into the local Hugging Face cache")
    pull.add_argument("model_id", nargs="?", default=DEFAULT_MODEL,
                      help=f"Hugging Face repo id (default: {DEFAULT_MODEL})")

    bench = sub.add_parser("bench", help="measure workloads W4 and W-doc on a random checkpoint with the real 2B "
                                        "shapes")
    bench.add_argument("--precision", action="append", choices=PRECISIONS, dest="precisions",
                       help="a precision to measure (repeatable; default: float32, int8 and int4)")
    bench.add_argument("--json", action="store_true", help="one JSON object per precision on stdout")
    bench.add_argument("--checkpoint", type=Path, default=None, help="where the random checkpoint is cached")
    bench.add_argument("--write-doc", type=Path, default=None, help="write the results as Markdown to this file")
    bench.add_argument("--threads", type=int, default=0, help="0: one per usable core")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = "debug" if args.verbose else args.log_level
    setup_logging(level or "info")
    try:
        if args.command == "run":
            from edgevl.daemon.loop import run

            return run(args.config, level)
        if args.command == "check":
            from edgevl.commands.check import check

            config, rules = check(args.config)
            print(f"{args.config}: ok; {config.rules}: {len(rules.rules)} rules "
                  f"({', '.join(r.name for r in rules.rules)})")
            return 0
        if args.command == "ask":
            from edgevl.commands.ask import run_ask

            return run_ask(args.images, args.questions, args.rules, args.rule, args.model, args.precision,
                           args.max_pixels, args.threads, args.max_batch, args.max_frames)
        if args.command == "eval":
            from edgevl.evaluation.command import run_eval, target
            from edgevl.evaluation.summary import Settings

            t = target(args.config, args.rules, args.model, args.precision, args.max_pixels, args.threads)
            settings = Settings(args.max_false_alarm_rate, args.tolerance, args.calibrate)
            return run_eval(args.folder, t.rules, args.rule, t.model, t.precisions, args.report, settings,
                            args.write, args.cache, t.threads, args.labels, t.max_pixels)
        if args.command == "config":
            from edgevl.commands.reference import reference, schema

            print(reference() if args.config_command == "reference" else schema(), end="")
            return 0
        if args.command == "model":
            from edgevl.engine.model_files import pull_model

            print(pull_model(args.model_id))
            return 0
        if args.command == "bench":
            from edgevl.bench.command import run_bench

            return run_bench(args.precisions or ["float32", "int8", "int4"], args.json, args.checkpoint,
                             args.write_doc, args.threads)
    except EdgevlError as exc:
        print(f"edgevl: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C in ask or eval: what was finished is printed or kept (eval's answer cache).
        print("edgevl: interrupted", file=sys.stderr)
        return 130
    return 2
