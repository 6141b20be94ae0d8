"""What every verb returns, prints and stores as JSON (summary.json, sweep.json)."""

from __future__ import annotations

import dataclasses
import json


class VerbSummary:
    """Base of the verbs' result dataclasses: one JSON rendering for all of them."""

    def to_json(self) -> str:
        # default=str: paths and enums print as text rather than failing the whole summary
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)
