"""What a score was measured with, recorded beside every score (MLflow tags, CSV columns,
summary.json), so that two numbers can be told comparable or not without rerunning anything.

Scores of one model disagree across tools for reasons a single figure hides: the feature
extractor's weights and preprocessing, the reference file and how many images it describes, the
number of samples, how their labels were drawn, the seeds, the sampler settings. Each is a field
here; the sampler settings of each score are in its own row (SettingResult.sampler).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from orchestrator import storage

# How `evaluate` draws sample i (orchestrator.sample.evaluate.sample_table): fixed, so it is stated once here.
LABEL_SAMPLING = "class-balanced: label of sample i = i mod num_classes"


@dataclass(frozen=True)
class EvaluationFingerprint:
    extractor: str  # the extractor's identifier: name, weights' sha256, preprocessing
    extractor_weights_sha256: str
    reference: str  # the reference statistics file
    reference_sha256: str
    reference_kind: str  # "sums" (ours: n, sum f, sum f f^T) or "mu-sigma" (published)
    reference_count: int | None  # images the reference describes; a mu/sigma file does not say
    model_file_sha256: str
    num_samples: int
    num_classes: int
    label_sampling: str
    seeds: str  # the seed of sample i

    def tags(self) -> dict[str, str]:
        """As MLflow tags, `fingerprint.<field>`."""
        return {f"fingerprint.{key}": "not recorded" if value is None else str(value) for key, value in dataclasses.asdict(self).items()}

    def columns(self) -> dict[str, str]:
        """As CSV columns (the extractor has its own column already)."""
        return {key: value for key, value in self.tags().items() if key != "fingerprint.extractor"}


def weights_sha256(identifier: str) -> str:
    """The weights' sha256 an extractor identifier records ("" when it records none)."""
    return identifier.split("weights_sha256=", 1)[1].split(",", 1)[0].rstrip(")") if "weights_sha256=" in identifier else ""


def evaluation_fingerprint(
    *, identifier: str, reference_path: str, reference_count: int | None, model_bytes: bytes, num_samples: int, num_classes: int, seed: int
) -> EvaluationFingerprint:
    return EvaluationFingerprint(
        extractor=identifier,
        extractor_weights_sha256=weights_sha256(identifier),
        reference=reference_path,
        reference_sha256=storage.sha256(reference_path),
        reference_kind="sums" if reference_count is not None else "mu-sigma",
        reference_count=reference_count,
        model_file_sha256=hashlib.sha256(model_bytes).hexdigest(),
        num_samples=num_samples,
        num_classes=num_classes,
        label_sampling=LABEL_SAMPLING,
        seeds=f"sample i: seed {seed} + i (job seed + index)",
    )
