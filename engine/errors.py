"""The engine's error tree.

    EngineError
    ├── InvalidInput              the caller asked for something impossible
    │   ├── UnknownSampleIds      IDs the dataset does not contain
    │   ├── TestSplitSamples      IDs of held-out samples (never trained on, cannot be forgotten)
    │   ├── UnknownName           an architecture, dataset kind, method or balancer not registered
    │   │   └── UnsupportedArchitecture  a `timm:`/`torchvision:` name the library lacks
    │   ├── HeadNotFound          a library model without a linear classifier Lethe can split off
    │   ├── InvalidCheckpoint     a file that is not a loadable checkpoint for the architecture
    │   │   └── CheckpointMismatch      missing, unexpected or mis-shaped tensors, each named
    │   ├── PathOutsideDataset    manifest rows whose image path leaves the dataset folder
    │   └── UnreadableImages      image files missing or undecodable, by sample ID
    ├── NonFiniteOutputs          a model gives NaN or infinite logits where it is measured
    ├── UnlearningDiverged        the method left non-finite weights or outputs; nothing is published
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


class NonFiniteOutputs(EngineError):
    """A model gives NaN or infinite logits on samples it is measured on."""

    code = "non_finite_outputs"


class UnlearningDiverged(EngineError):
    """The method's model holds NaN or infinite weights, or gives such outputs: verifying or
    publishing it would describe nothing."""

    code = "unlearning_diverged"

    def __init__(self, method: str, problem: str) -> None:
        self.method, self.problem = method, problem
        super().__init__(f"{method} diverged: {problem}; nothing was published")


class UnsupportedArchitecture(UnknownName):
    code = "unsupported_architecture"

    def __init__(self, name: str, reason: str) -> None:
        self.what, self.name, self.known = "architecture", name, []
        InvalidInput.__init__(self, f"unsupported architecture {name!r}: {reason}")


class HeadNotFound(InvalidInput):
    code = "head_not_found"


class CheckpointMismatch(InvalidCheckpoint):
    code = "checkpoint_mismatch"

    def __init__(
        self,
        arch: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        limit: int = 20,
    ) -> None:
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {listing(self.missing, limit)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {listing(self.unexpected, limit)}")
        if self.mismatched:
            shown = [f"{k} (file {list(got)}, model {list(want)})" for k, got, want in self.mismatched]
            parts.append(f"mis-shaped {len(shown)}: {listing(shown, limit)}")
        super().__init__(f"checkpoint does not fit {arch}: " + "; ".join(parts))


class PathOutsideDataset(_SampleIdError):
    code = "path_outside_dataset"
    noun = "samples whose image path is absolute or leaves the dataset folder"


class UnreadableImages(InvalidInput):
    code = "unreadable_images"

    def __init__(self, problems: dict[str, str], *, checked: int | None = None, limit: int = 20) -> None:
        self.problems = dict(sorted(problems.items()))
        self.ids = list(self.problems)
        of = f" of {checked} checked" if checked is not None else ""
        shown = [f"{k} ({v})" for k, v in list(self.problems.items())[:limit]]
        more = f" (and {len(self.ids) - limit} more)" if len(self.ids) > limit else ""
        super().__init__(f"{len(self.ids)} image files{of} missing or unreadable: "
                         f"{', '.join(shown)}{more}")


def listing(items: list[str], limit: int = 10) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
