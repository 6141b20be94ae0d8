"""Command line: `python -m orchestrator <verb> <job.yaml> [section.key=value ...]` (or `ucgm ...`).

The job spec is validated before anything else happens, so a typo costs a second, not a cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.cluster import check_outputs_outlive_the_job
from orchestrator.config import load_job
from orchestrator.errors import ConfigError, JobError

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    train = sub.add_parser("train", help="train a model with the UCGM-T objective")
    train.add_argument("job", help="YAML job spec, e.g. jobs/digits.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=500 objective.consistency_ratio=1")
    train.add_argument("--check", action="store_true", help="validate the job spec, print it resolved, and exit")
    for verb, (help_text, example) in SAMPLING_VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=f"{help_text}. Example: python -m orchestrator {verb} {example}")
        verb_parser.add_argument("job", help="YAML job spec, e.g. jobs/digits.yaml")
        shortcuts = ", ".join(f"{k}= ({v})" for k, v in SHORTCUTS[verb].items())
        verb_parser.add_argument("overrides", nargs="*", help=f"dotted overrides; shortcuts: {shortcuts}")
        verb_parser.add_argument("--check", action="store_true", help="validate the job spec, print it resolved, and exit")
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
        config = load_job(args.job, args.overrides)
        check_outputs_outlive_the_job(config, args.verb)  # only inside `ray job submit`
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return 0
    if args.verb == "train":
        from orchestrator.train.run import run_train

        try:
            summary = run_train(config)
        except (JobError, FileNotFoundError, ImportError) as error:
            # problems of the input (a path, a package, a checkpoint), not of the code: no traceback
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(summary.to_json())
    if args.verb in SAMPLING_VERBS:
        try:
            summary = run_sampling_verb(args.verb, config)
        except (JobError, FileNotFoundError, ImportError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(summary.to_json())
    return 0


# --------------------------------------------------------------------------- evaluate, reference, generate, encode

SAMPLING_VERBS = {
    "evaluate": (
        "Frechet distance / FID of a model file for one or several sampler settings (Ray Data)",
        "jobs/digits.yaml model_file=outputs/digits/model.pt num_samples=5000 'evaluation.sampler_grid=[{steps: 2}, {steps: 8}]'",
    ),
    "reference": ("reference feature statistics of the job's dataset split, stored next to the data", "jobs/digits.yaml split=train"),
    "generate": ("many images from a model file, PNG/parquet shards, resumable (Ray Data)", "jobs/digits.yaml num_samples=50000 out=s3://bucket/samples"),
    "encode": ("VAE latents of the job's images, parquet shards, resumable (Ray Data)", "jobs/imagenet256_encode.yaml vae=s3://bucket/sd-vae-ft-ema out=s3://bucket/latents"),
}

# Bare keys these verbs accept on the command line, mapped onto their config keys.
SHORTCUTS = {
    "evaluate": {"model_file": "evaluation.model_file", "num_samples": "evaluation.num_samples", "reference": "evaluation.reference_statistics"},
    "reference": {"split": "evaluation.reference_split", "out": "evaluation.reference_statistics"},
    "generate": {"model_file": "evaluation.model_file", "num_samples": "evaluation.generation.num_samples", "out": "evaluation.generation.out"},
    "encode": {"vae": "encode.vae", "out": "encode.out"},
}


# Shortcuts renamed with their keys (orchestrator.config.RENAMED_KEYS); they work for one release.
RENAMED_SHORTCUTS = {"evaluate": {"checkpoint": "model_file"}, "generate": {"checkpoint": "model_file"}}


def expand_shortcuts(verb: str, overrides: list[str]) -> list[str]:
    """`num_samples=5000` -> `evaluation.num_samples=5000` (for evaluate), and so on (SHORTCUTS)."""
    table, renamed = SHORTCUTS.get(verb, {}), RENAMED_SHORTCUTS.get(verb, {})
    expanded = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in renamed:
            logger.warning("%s %s= is deprecated and will stop working in 0.3; write %s=", verb, key, renamed[key])
            key = renamed[key]
        expanded.append(f"{table[key]}={value}" if sep and key in table else override)
    return expanded


def run_sampling_verb(verb: str, config):
    if verb == "evaluate":
        from orchestrator.sample.evaluate import run_evaluate

        return run_evaluate(config)
    if verb == "reference":
        from orchestrator.sample.reference import run_reference

        return run_reference(config)
    if verb == "encode":
        from orchestrator.encode.run import run_encode

        return run_encode(config)
    from orchestrator.sample.generate import run_generate

    return run_generate(config)


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
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.to_json())
    return 0
