"""Command line: `python -m orchestrator <verb> <job.yaml> [section.key=value ...]` (or `ucgm ...`).

The job spec is validated and its rules checked (orchestrator.job_checks) before anything else
happens, so a typo or a wrong path costs seconds, not a cluster. Exit codes: 2 for a job that
cannot run as written (a ConfigError, whenever it is found), 1 for other problems of its inputs
or environment (a checkpoint, a package, the cluster's size); both print `error: ...` and no
traceback. A training run stopped by SIGTERM or Ctrl-C, with a checkpoint written at the step it
reached, exits 128 + the signal's number (143, 130), as the signal alone would.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.config import load_job
from orchestrator.errors import ConfigError, JobError
from orchestrator.job_checks import check_job
from orchestrator.stopping import Stopped
from orchestrator.verbs import VERBS

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS.values():
        verb_parser = sub.add_parser(verb.name, help=verb.help, description=f"{verb.help}. Example: python -m orchestrator {verb.name} {verb.example}")
        verb_parser.add_argument("job", help="YAML job spec, e.g. jobs/digits.yaml")
        shortcuts = "".join(f"; {k}= is {v}" for k, v in verb.shortcuts.items())
        verb_parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. train.steps=500{shortcuts}")
        verb_parser.add_argument("--check", action="store_true", help="check the job (schema, rules, paths; no cluster work), print it resolved, and exit")
    tune = sub.add_parser("tune", help="hyperparameter search over a job's keys (Ray Tune + Optuna + ASHA)")
    tune.add_argument("sweep", help="YAML sweep spec, e.g. jobs/tune_digits.yaml")
    tune.add_argument("overrides", nargs="*", help="num_trials=4, job.train.steps=100, 'space.sampler.steps={type: int, low: 2, high: 6}'")
    tune.add_argument("--check", action="store_true", help="validate the sweep spec against its base job, print it resolved, and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # overrides may follow flags (`train job.yaml --check a.b=1`), which argparse leaves unparsed
    args, unparsed = parser.parse_known_args(argv)
    stray = [item for item in unparsed if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.overrides = expand_shortcuts(args.verb, [*args.overrides, *unparsed])
    if args.verb == "tune":
        return run_tune_verb(args.sweep, args.overrides, args.check)
    try:
        config = check_job(load_job(args.job, args.overrides), args.verb)  # before any Ray call
        if args.check:
            import yaml

            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            return 0
        summary = VERBS[args.verb].run(config)
    except Stopped as stopped:
        # a SIGTERM / Ctrl-C, handled: the checkpoint is written; exit as the signal would have
        print(f"stopped: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (JobError, FileNotFoundError, ImportError) as error:
        # problems of the input (a path, a package, a checkpoint), not of the code: no traceback;
        # a ConfigError is the job's, whether the checks found it or only the data could show it
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    print(summary.to_json())
    return 0


def expand_shortcuts(verb: str, overrides: list[str]) -> list[str]:
    """`num_samples=5000` -> `evaluation.num_samples=5000` (for evaluate), and so on (Verb.shortcuts)."""
    record = VERBS.get(verb)
    table, renamed = (record.shortcuts, record.renamed_shortcuts) if record else ({}, {})
    expanded = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in renamed:
            logger.warning("%s %s= is deprecated and will stop working in 0.3; write %s=", verb, key, renamed[key])
            key = renamed[key]
        expanded.append(f"{table[key]}={value}" if sep and key in table else override)
    return expanded


# --------------------------------------------------------------------------- tune


def run_tune_verb(path: str, overrides: list[str], check: bool) -> int:
    from orchestrator.tune.spec import load_sweep

    try:
        sweep = load_sweep(path, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from orchestrator.tune.run import check_sweep, run_tune

    if check:
        import yaml

        print(yaml.safe_dump(check_sweep(sweep), sort_keys=False))
        return 0
    try:
        summary = run_tune(sweep)
    except (JobError, FileNotFoundError, ImportError) as error:
        # a ConfigError here (the base job's checks, or what every trial failed with) is the job's: exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    print(summary.to_json())
    return 0
