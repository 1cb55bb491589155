"""What a registered model expects as input: a torch-free description the API stores.

`ModelDescription` carries the architecture name, `num_classes`, `in_chans`, `input_size`
(C, H, W) and the `Preprocessing` that turns an image file into the model's input. The API
stores it as JSON (`to_dict` / `from_dict`) without importing torch; a worker fills in the
library's defaults with `engine.library_models.describe_model`.

Architecture names: the built-ins (`engine.arch_shapes.ARCHITECTURES`), `timm:<name>` (any
timm 1.x classification model) and `torchvision:<name>` (any `torchvision.models`
classification builder). `split_arch` checks the form only; `check_library_name` checks a
library name against the installed libraries' model lists (`engine.library_names`, torch-free);
whether the model's head can be found is checked on a worker.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.arch_shapes import ARCHITECTURES
from engine.errors import InvalidInput, UnknownName, UnsupportedArchitecture

LIBRARIES = ("timm", "torchvision")
CROPS = ("center", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORTED = (
    "the built-ins (" + ", ".join(ARCHITECTURES) + "), 'timm:<name>' for a timm 1.x "
    "classification model and 'torchvision:<name>' for a torchvision.models classification "
    "builder, whose final classifier is a linear layer (timm: get_classifier(); torchvision: "
    "fc, classifier[-1], heads.head or head)"
)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def split_arch(arch: str) -> tuple[str | None, str]:
    """(`library`, `name`) for `timm:`/`torchvision:` names, (None, `arch`) for a built-in.

    Refuses any other name with `UnknownName` (built-ins) or `UnsupportedArchitecture`."""
    if ":" not in arch:
        if arch not in ARCHITECTURES:
            raise UnknownName("architecture", arch, [*ARCHITECTURES, "timm:<name>", "torchvision:<name>"])
        return None, arch
    library, name = arch.split(":", 1)
    if library not in LIBRARIES:
        raise UnsupportedArchitecture(arch, f"unknown library {library!r}; supported: {SUPPORTED}")
    if not _NAME.match(name):
        raise UnsupportedArchitecture(arch, f"not a model name; supported: {SUPPORTED}")
    return library, name


def is_library_arch(arch: str) -> bool:
    """True for `timm:` and `torchvision:` names (form only, torch-free)."""
    return arch.split(":", 1)[0] in LIBRARIES and ":" in arch


def check_library_name(arch: str) -> None:
    """Refuse (`UnsupportedArchitecture`) a `timm:`/`torchvision:` name the library lacks.

    Torch-free: the names come from `engine.library_names`, generated from the installed
    libraries. Built-in names pass (`split_arch` checks them)."""
    from engine import library_names

    library, name = split_arch(arch)
    known = {"timm": library_names.TIMM, "torchvision": library_names.TORCHVISION}.get(library or "")
    if known is not None and name not in known:
        version = {"timm": library_names.TIMM_VERSION,
                   "torchvision": library_names.TORCHVISION_VERSION}[str(library)]
        raise UnsupportedArchitecture(
            arch, f"{library} {version} has no classification model {name!r}; supported: {SUPPORTED}"
        )


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model input, after scaling pixels to [0, 1].

    `crop="center"`: resize the shorter side to `resize` pixels (keeping the aspect ratio),
    then take the centre `input_size` crop (timm's and torchvision's evaluation transform).
    `crop="squash"`: resize straight to `input_size`; `resize` is unused.
    Then `(x - mean) / std` per channel.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: int | None = None
    crop: str = "squash"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise InvalidInput(f"preprocessing crop must be one of {CROPS}, got {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidInput(
                f"preprocessing interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if len(self.mean) != len(self.std) or not self.mean:
            raise InvalidInput("preprocessing mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise InvalidInput("preprocessing std values must be > 0")
        if self.resize is not None and self.resize < 1:
            raise InvalidInput("preprocessing resize must be >= 1 pixel")

    @property
    def is_identity(self) -> bool:
        return all(m == 0.0 for m in self.mean) and all(s == 1.0 for s in self.std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidInput(f"unknown preprocessing fields: {unknown}")
        kw = dict(data)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        if kw.get("resize") is not None:
            kw["resize"] = int(kw["resize"])
        return cls(**kw)


@dataclass(frozen=True)
class ModelDescription:
    """A model's architecture, label count and input contract (stored with the model)."""

    arch: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int, int]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        split_arch(self.arch)
        if self.num_classes < 2:
            raise InvalidInput("num_classes must be at least 2")
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise InvalidInput(f"input_size must be [C, H, W] of positive sizes, got {self.input_size}")
        if self.input_size[0] != self.in_chans:
            raise InvalidInput(f"input_size {list(self.input_size)} disagrees with in_chans {self.in_chans}")
        if self.in_chans not in (1, 3):
            raise InvalidInput("images are read as 1 (grayscale) or 3 (RGB) channels")
        if len(self.preprocessing.mean) not in (1, self.in_chans):
            raise InvalidInput(f"preprocessing mean and std need {self.in_chans} values")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        out["preprocessing"] = self.preprocessing.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDescription:
        return cls(
            arch=str(data["arch"]),
            num_classes=int(data["num_classes"]),
            in_chans=int(data["in_chans"]),
            input_size=_size3(data["input_size"]),
            preprocessing=Preprocessing.from_dict(dict(data.get("preprocessing") or {})),
        )


def _size3(value: Any) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in value)
    return c, h, w
