"""Benchmark: every seed system trained from its job spec (jobs/systems/) with the same network and
budget, then scored at several network-evaluation counts (NFE) from the same noise.

Each job trains through the `train` verb's single-process backend (`distributed.backend=local`, the
loop every Ray Train worker runs), in dependency order: teachers before distillation, the UCGM
multi-step model before the few-step model that starts from it. Then each model file is sampled
with its own sampler at NFE 1, 2, 4, 8 (multi-step models also at 16, 32, 64, with plain Euler and
with UCGM-S) and scored by the Frechet distance to the training data in the feature space of the
pretrained MNIST CNN (`mnist-cnn-penultimate`; this is not FID).

Plain Euler and UCGM-S share the checkpoint, the time grid (uniform, the model's own boundary gaps)
and the noise, so the only difference is the extrapolation kappa. kappa is chosen per NFE from
KAPPAS on other noise (seeds from SELECTION_SEED) than the noise the table is scored on (seeds from
SCORE_SEED), so the table does not reward a kappa fitted to its own samples. Extrapolation starts at
the third step and the last step's prediction is returned raw, so it changes nothing below NFE 4.

    .venv/bin/python tests/bench/bench_systems.py [--steps 800] [--num-samples 1000] [--device cuda]
        [--dataset fashion_mnist] [--only JOB ...]

--dataset fashion_mnist trains the same specs on Debian's Fashion-MNIST (28x28, 60000 training
images) at patch size 4 (49 tokens, against 16 for 8x8 digits at patch 2) and scores against the
60000 training images in the same classifier's features, the images stretched to 28x28 (that is,
as they are); a digit classifier's features on clothes, so the distances only compare the systems
with each other.

Writes results.json and results.md under --out and prints the table (paste it into RESULTS.md and
the README). A rerun with the same --out reuses finished trainings (the train verb resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from orchestrator.config import load_job  # noqa: E402
from orchestrator.sample.extractors import extractor_spec  # noqa: E402
from orchestrator.verbs import run_job  # noqa: E402
from ucgm_core.datasets import load_dataset  # noqa: E402
from ucgm_core.evaluation import dataset_statistics, sample_statistics  # noqa: E402
from ucgm_core.fid import frechet_distance_from_statistics  # noqa: E402
from ucgm_core.model_file import load_model_file  # noqa: E402
from ucgm_core.sampler import SamplerSettings, count_network_evaluations  # noqa: E402
from ucgm_core.transports import build_transport  # noqa: E402

# what --dataset changes in every job: digits are the specs' own data; Fashion-MNIST at patch 4
DATASETS = {
    "digits": [],
    "fashion_mnist": ["data.name=fashion_mnist", "model.patch_size=4"],
}
FEW_STEPS = (1, 2, 4, 8)
MANY_STEPS = (1, 2, 4, 8, 16, 32, 64)
PLAIN = dict(schedule=(1.0, 1.0, 1.0), extrapolation=0.0, stochasticity=0.0)
KAPPAS = (0.2, 0.4, 0.6, 0.8)  # UCGM-S extrapolation candidates (the paper's range is 0.2-0.6)
SCORE_SEED = 10_000  # noise of the table: other seeds than training's evaluation (0..)
SELECTION_SEED = 20_000  # noise on which UCGM-S's kappa is chosen


@dataclasses.dataclass(frozen=True)
class System:
    label: str
    job: str  # jobs/systems/<job>.yaml
    depends_on: tuple[str, ...] = ()  # jobs whose model files this one reads
    multi_step: bool = False  # scored at MANY_STEPS, plain and with UCGM-S


SYSTEMS = (
    System("UCGM-T multi-step (lambda 0)", "digits_ucgm_multi_step", multi_step=True),
    System("UCGM-T few-step (lambda 0.95, from multi-step)", "digits_ucgm_few_step", ("digits_ucgm_multi_step",)),
    System("TrigFlow multi-step (sCT, sCD start)", "digits_trigflow_teacher", multi_step=True),
    System("sCT (from the TrigFlow model)", "digits_sct", ("digits_trigflow_teacher",)),
    System("sCD", "digits_scd", ("digits_trigflow_teacher",)),
    System("VP-cosine multi-step (MCT, MCD start)", "digits_vp_teacher", multi_step=True),
    System("Multistep CT (T 4, from the VP model)", "digits_multistep_ct", ("digits_vp_teacher",)),
    System("Multistep CD (T 4)", "digits_multistep_cd", ("digits_vp_teacher",)),
    System("Shortcut", "digits_shortcut"),
    System("ESC", "digits_esc"),
)


def train(system: System, out: Path, args) -> dict:
    overrides = [
        f"output_dir={out / 'runs'}",
        "distributed.backend=local",
        "tracking.enabled=false",
        f"train.device={args.device}",
        f"train.steps={args.steps}",
        "train.sample_every=1000000",
        "evaluation.num_samples=100",  # the train verb's own end-of-run score; the table scores anew
        *DATASETS[args.dataset],
    ]
    config = load_job(ROOT / "jobs/systems" / f"{system.job}.yaml", overrides)
    sources = {}
    if config.train.teacher:
        sources["train.teacher"] = str(out / "runs" / system.depends_on[0] / "model.pt")
    if config.train.initialize_from:
        sources["train.initialize_from"] = str(out / "runs" / system.depends_on[0] / "model.pt")
    if sources:
        config = load_job(ROOT / "jobs/systems" / f"{system.job}.yaml", overrides + [f"{k}={v}" for k, v in sources.items()])
    summary_path = Path(config.run_dir) / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text())["steps"] >= args.steps:
        return json.loads(summary_path.read_text())
    started = time.perf_counter()
    summary = run_job("train", config)
    print(f"{system.job}: trained {summary.steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return dataclasses.asdict(summary)


def frechet(contents, network, transport, settings: SamplerSettings, reference, extractor, args, seed: int) -> float:
    statistics = sample_statistics(
        network,
        transport,
        settings,
        extractor,
        num_samples=args.num_samples,
        num_classes=contents.num_classes,
        image_shape=(contents.in_channels, contents.input_size, contents.input_size),
        batch_size=500,
        seed=seed,
        device=args.device,
    )
    return frechet_distance_from_statistics(statistics, reference)


def step_settings(own: SamplerSettings, row: str, steps: int, pick_kappa) -> SamplerSettings:
    """The sampler of one table cell: the model's own sampler, plain Euler on a uniform grid, or
    UCGM-S = that same grid with the extrapolation kappa `pick_kappa(euler_settings)` chooses."""
    if row == "own sampler":
        return dataclasses.replace(own, steps=steps)
    euler = dataclasses.replace(own, steps=steps, **PLAIN)
    return euler if row == "Euler" else dataclasses.replace(euler, extrapolation=pick_kappa(euler))


def evaluate(system: System, out: Path, reference, extractor, args) -> list[dict]:
    contents = load_model_file(out / "runs" / system.job / "model.pt", map_location=args.device)
    network = contents.model.to(args.device)
    transport = build_transport(contents.transport)

    def pick_kappa(euler: SamplerSettings) -> float:
        if euler.steps < 4:  # extrapolation would not change the sample
            return 0.0
        scores = {k: frechet(contents, network, transport, dataclasses.replace(euler, extrapolation=k), reference, extractor, args, SELECTION_SEED) for k in KAPPAS}
        return min(scores, key=scores.get)

    rows = []
    for row in ("Euler", "UCGM-S") if system.multi_step else ("own sampler",):
        for steps in MANY_STEPS if system.multi_step else FEW_STEPS:
            started = time.perf_counter()
            settings = step_settings(contents.sampler, row, steps, pick_kappa)
            rows.append(
                {
                    "system": system.label,
                    "job": system.job,
                    "sampler": row,
                    "steps": steps,
                    "nfe": count_network_evaluations(settings),
                    "frechet": round(frechet(contents, network, transport, settings, reference, extractor, args, SCORE_SEED), 3),
                    "seconds": round(time.perf_counter() - started, 2),
                    "settings": dataclasses.asdict(settings),
                }
            )
    return rows


def cell(row: dict) -> str:
    """The distance, and for UCGM-S the kappa chosen on the selection noise."""
    kappa = row["settings"]["extrapolation"]
    return f"{row['frechet']:.2f}" + (f" (κ {kappa})" if row["sampler"] == "UCGM-S" and kappa else "")


def markdown(results: dict) -> str:
    nfes = sorted({row["nfe"] for row in results["rows"]})
    header = "| system | sampler | train s | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [header, "|" + "---|" * 3 + "---:|" * len(nfes)]
    for system in (s for s in SYSTEMS if all(job in results["training"] for job in (s.job, *s.depends_on))):
        trained = results["training"][system.job]
        chain = [system.job, *system.depends_on]
        total = sum(results["training"][job]["seconds"] for job in chain)
        seconds = f"{trained['seconds']:.0f}" + (f" (+{total - trained['seconds']:.0f} before)" if system.depends_on else "")
        for row in dict.fromkeys(r["sampler"] for r in results["rows"] if r["job"] == system.job):
            by_nfe = {r["nfe"]: r for r in results["rows"] if r["job"] == system.job and r["sampler"] == row}
            cells = [cell(by_nfe[n]) if n in by_nfe else "" for n in nfes]
            lines.append(f"| {system.label} | {row} | {seconds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps of every job")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per Frechet distance")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--out", type=Path, help="default outputs/bench_systems (digits) or outputs/bench_systems_<dataset>")
    parser.add_argument("--only", nargs="*", help="job names to run (their dependencies must have run)")
    args = parser.parse_args()
    args.out = args.out or ROOT / "outputs" / ("bench_systems" if args.dataset == "digits" else f"bench_systems_{args.dataset}")
    args.out.mkdir(parents=True, exist_ok=True)
    systems = [s for s in SYSTEMS if not args.only or s.job in args.only]

    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"training": {}, "rows": []}
    # the extractor (and its framing) evaluate would build for these images
    images = load_dataset(args.dataset).images.to(args.device)
    job = load_job(ROOT / "jobs/systems" / f"{SYSTEMS[0].job}.yaml", DATASETS[args.dataset])
    extractor = extractor_spec(job, tuple(images.shape[1:])).build(args.device)
    reference = dataset_statistics(images, extractor)
    results["setup"] = {
        "dataset": args.dataset,
        "steps": args.steps,
        "num_samples": args.num_samples,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "extractor": extractor.identifier(),
    }
    # scored right after each training and written each time, so an interrupted run keeps its rows
    for system in systems:
        results["training"][system.job] = train(system, args.out, args)
        results["rows"] = [r for r in results["rows"] if r["job"] != system.job] + evaluate(system, args.out, reference, extractor, args)
        results_path.write_text(json.dumps(results, indent=1))
        table = markdown(results)
        (args.out / "results.md").write_text(table + "\n")
        print(table, flush=True)


if __name__ == "__main__":
    main()
