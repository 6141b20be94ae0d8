"""Class labels: the null label that stands for "no class" (label dropout, classifier-free guidance)."""

from __future__ import annotations

from typing import Any


def null_label_of(network: Any, num_classes: int | None = None) -> int:
    """The unconditional label, which is the number of classes: `num_classes` if given, else the
    network's `.num_classes` (a wrapper such as DDP hides it: pass num_classes= then)."""
    if num_classes is not None:
        return int(num_classes)
    value = getattr(network, "num_classes", None)
    if value is None:
        raise ValueError(
            "the null label is num_classes, but none was given and the network has no num_classes "
            "attribute; pass num_classes= (or null_label= to the sampler)"
        )
    return int(value)
