"""Command line: `python -m orchestrator <verb> <job.yaml> [section.key=value ...]` (or `ucgm ...`).

The job spec is validated before anything else happens, so a typo costs a second, not a cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.config import ConfigError, load_job
from orchestrator.checkpoints import CheckpointError

VERBS = ("train",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    train = sub.add_parser("train", help="train a model with the UCGM-T objective")
    train.add_argument("job", help="YAML job spec, e.g. jobs/digits.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=500 objective.consistency_ratio=1")
    train.add_argument("--check", action="store_true", help="validate the job spec, print it resolved, and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # overrides may follow flags (`train job.yaml --check a.b=1`), which argparse leaves unparsed
    args, unparsed = parser.parse_known_args(argv)
    stray = [item for item in unparsed if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *unparsed]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        config = load_job(args.job, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return 0
    if args.verb == "train":
        from orchestrator.train import run_train

        try:
            summary = run_train(config)
        except (CheckpointError, FileNotFoundError, ImportError) as error:
            # problems of the input (a path, a package, a checkpoint), not of the code: no traceback
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(summary.to_json())
    return 0
