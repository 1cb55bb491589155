"""Parameter shapes of every supported architecture, computed without torch.

The API validates uploaded checkpoints with this table (it never imports torch); a test
keeps it equal to the `state_dict()` of the torch models in `engine.archs`.
"""

from __future__ import annotations

from engine.errors import InvalidInput, UnknownName

Shape = tuple[int, ...]
ARCHITECTURES = ("small_cnn", "resnet18", "mlp")

SMALL_CNN_WIDTH = (32, 64)
SMALL_CNN_FEATURES = 128
MLP_WIDTHS = (256, 128)  # hidden layers; the last is the feature width
RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


def _small_cnn(num_classes: int, c: int, h: int, w: int) -> dict[str, Shape]:
    c1, c2 = SMALL_CNN_WIDTH
    return {
        "conv1.weight": (c1, c, 3, 3),
        "conv1.bias": (c1,),
        "conv2.weight": (c2, c1, 3, 3),
        "conv2.bias": (c2,),
        "fc.weight": (SMALL_CNN_FEATURES, c2 * (h // 4) * (w // 4)),
        "fc.bias": (SMALL_CNN_FEATURES,),
        "head.weight": (num_classes, SMALL_CNN_FEATURES),
        "head.bias": (num_classes,),
    }


def _mlp(num_classes: int, c: int, h: int, w: int) -> dict[str, Shape]:
    h1, h2 = MLP_WIDTHS
    return {
        "fc1.weight": (h1, c * h * w),
        "fc1.bias": (h1,),
        "fc2.weight": (h2, h1),
        "fc2.bias": (h2,),
        "head.weight": (num_classes, h2),
        "head.bias": (num_classes,),
    }


def _batchnorm(prefix: str, n: int) -> dict[str, Shape]:
    return {
        f"{prefix}.weight": (n,),
        f"{prefix}.bias": (n,),
        f"{prefix}.running_mean": (n,),
        f"{prefix}.running_var": (n,),
        f"{prefix}.num_batches_tracked": (),
    }


def _resnet18(num_classes: int, c: int, h: int, w: int) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {"body.conv1.weight": (64, c, 3, 3), **_batchnorm("body.bn1", 64)}
    in_ch = 64
    for stage, (out_ch, stride) in enumerate(RESNET18_STAGES, start=1):
        for block in range(2):
            p = f"body.layer{stage}.{block}"
            block_in = in_ch if block == 0 else out_ch
            shapes[f"{p}.conv1.weight"] = (out_ch, block_in, 3, 3)
            shapes.update(_batchnorm(f"{p}.bn1", out_ch))
            shapes[f"{p}.conv2.weight"] = (out_ch, out_ch, 3, 3)
            shapes.update(_batchnorm(f"{p}.bn2", out_ch))
            if block == 0 and (stride != 1 or block_in != out_ch):
                shapes[f"{p}.downsample.0.weight"] = (out_ch, block_in, 1, 1)
                shapes.update(_batchnorm(f"{p}.downsample.1", out_ch))
        in_ch = out_ch
    shapes["head.weight"] = (num_classes, 512)
    shapes["head.bias"] = (num_classes,)
    return shapes


def param_shapes(arch: str, num_classes: int, input_shape: tuple[int, int, int]) -> dict[str, Shape]:
    """Every tensor name and shape in `arch`'s state dict for this input (C, H, W)."""
    c, h, w = input_shape
    if num_classes < 2:
        raise InvalidInput("num_classes must be at least 2")
    if arch == "small_cnn":
        if h < 4 or w < 4:
            raise InvalidInput("small_cnn needs inputs of at least 4x4 pixels")
        return _small_cnn(num_classes, c, h, w)
    if arch == "resnet18":
        return _resnet18(num_classes, c, h, w)
    if arch == "mlp":
        return _mlp(num_classes, c, h, w)
    raise UnknownName("architecture", arch, ARCHITECTURES)
