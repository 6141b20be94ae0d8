"""The `reference` verb and reference statistics: the feature statistics of a dataset split,
stored once as a small .npz (float64 n, sum f, sum f f^T, and the extractor's identifier) that
`evaluate` scores samples against; `evaluate` refuses statistics of another feature space."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator import storage
from orchestrator.config import JobConfig
from orchestrator.errors import ReferenceStatisticsError
from orchestrator.sample.extractors import extractor_spec
from orchestrator.summary import VerbSummary
from ucgm_core.datasets import load_dataset
from ucgm_core.fid import FeatureStatistics

logger = logging.getLogger(__name__)


def default_reference_path(config: JobConfig, extractor_name: str) -> str:
    """Where `reference` writes and `evaluate` looks: beside the data when it has a path
    (`<data.path>-reference-<split>[-size<N>][-limit<N>]-<extractor>.npz`), else under
    `<output_dir>/reference/`."""
    data = config.data
    tag = config.evaluation.reference_split
    tag += f"-size{data.image_size}" if data.image_size else ""
    tag += f"-limit{data.limit}" if data.limit else ""
    if data.path:
        return f"{data.path.rstrip('/')}-reference-{tag}-{extractor_name}.npz"
    return storage.join(config.output_dir, "reference", f"{data.name}-{tag}-{extractor_name}.npz")


def reference_path(config: JobConfig) -> str:
    return config.evaluation.reference_statistics or default_reference_path(config, config.evaluation.extractor)


def save_reference(path: str, statistics: FeatureStatistics, extractor_identifier: str, description: str) -> None:
    """Write statistics as .npz, with the feature space and the data they describe."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        count=np.asarray(statistics.count, dtype=np.int64),
        feature_sum=statistics.feature_sum,
        outer_sum=statistics.outer_sum,
        extractor=np.asarray(extractor_identifier),
        description=np.asarray(description),
    )
    storage.write_bytes(path, buffer.getvalue())


def load_reference(path: str, extractor_identifier: str | None) -> FeatureStatistics:
    """Statistics written by `reference`; refused when computed with another extractor than the
    one `extractor_identifier` names (None: not compared, for when the feature space is unknown)."""
    if not storage.exists(path):
        raise ReferenceStatisticsError(
            f"no reference statistics at {path!r}; compute them once with "
            "`python -m orchestrator reference <job.yaml>` (same job spec), or set evaluation.reference_statistics"
        )
    data = storage.read_bytes(path)
    statistics = FeatureStatistics.load(io.BytesIO(data))
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        stored = str(arrays["extractor"]) if "extractor" in arrays.files else "<not recorded>"
    if extractor_identifier is not None and stored != extractor_identifier:
        raise ReferenceStatisticsError(
            f"reference statistics {path!r} were computed with {stored}, but this evaluation uses {extractor_identifier}; "
            "distances across feature spaces mean nothing. Recompute them with `python -m orchestrator reference <job.yaml>`"
        )
    return statistics


@dataclass
class ReferenceSummary(VerbSummary):
    path: str
    count: int
    extractor: str
    dataset: str
    seconds: float


def run_reference(config: JobConfig) -> ReferenceSummary:
    """Statistics of the job's dataset split in the job's feature space, written to
    evaluation.reference_statistics (default: `default_reference_path`)."""
    started = time.perf_counter()
    evaluation = config.evaluation
    dataset = load_dataset(
        config.data.name, path=config.data.path, image_size=config.data.image_size, limit=config.data.limit, split=evaluation.reference_split
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = extractor_spec(config, dataset.image_shape).build(device)
    logger.info("reference statistics of %s (%d images) with %s", dataset.name, len(dataset), extractor.identifier())
    statistics = FeatureStatistics.empty(extractor.feature_dim)
    from tqdm import tqdm

    for start in tqdm(range(0, len(dataset), evaluation.batch_size), desc="reference", unit="batch"):
        images = dataset.images[start : start + evaluation.batch_size].to(device)
        statistics = statistics.merge(FeatureStatistics.from_features(extractor(images)))
    path = reference_path(config)
    description = f"{dataset.name} split={evaluation.reference_split} images={len(dataset)} shape={tuple(dataset.image_shape)}"
    save_reference(path, statistics, extractor.identifier(), description)
    logger.info("wrote %s", path)
    return ReferenceSummary(path, statistics.count, extractor.identifier(), description, round(time.perf_counter() - started, 2))
