"""The engine's error tree.

    EngineError
    ├── InvalidInput              the caller asked for something impossible
    │   ├── UnknownSampleIds      IDs the dataset does not contain
    │   ├── TestSplitSamples      IDs of held-out samples (never trained on, cannot be forgotten)
    │   ├── UnknownName           an architecture, dataset kind, method or balancer not registered
    │   └── InvalidCheckpoint     a file that is not a loadable checkpoint for the architecture
    └── Cancelled                 the job was cancelled; nothing is published

The worker turns each into a failed (or cancelled) job with its evidence; the API maps
`InvalidInput` to 4xx responses.
"""

from __future__ import annotations

from collections.abc import Iterable


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "engine_error"


class InvalidInput(EngineError):
    code = "invalid_input"


class _SampleIdError(InvalidInput):
    noun = "samples"

    def __init__(self, ids: Iterable[str], *, limit: int = 100) -> None:
        self.ids = sorted(set(ids))
        self.count = len(self.ids)
        self.shown = self.ids[:limit]
        more = f" (and {self.count - limit} more)" if self.count > limit else ""
        super().__init__(f"{self.count} {self.noun}: {', '.join(self.shown)}{more}")


class UnknownSampleIds(_SampleIdError):
    code = "unknown_sample_ids"
    noun = "sample IDs not in the dataset"


class TestSplitSamples(_SampleIdError):
    __test__ = False  # a name, not a test case
    code = "test_split_samples"
    noun = "sample IDs of the held-out test split, which was never trained on"


class UnknownName(InvalidInput):
    code = "unknown_name"

    def __init__(self, what: str, name: str, known: Iterable[str]) -> None:
        self.what, self.name, self.known = what, name, sorted(known)
        super().__init__(f"unknown {what} {name!r}; known: {', '.join(self.known)}")


class InvalidCheckpoint(InvalidInput):
    code = "invalid_checkpoint"


class Cancelled(EngineError):
    code = "cancelled"
