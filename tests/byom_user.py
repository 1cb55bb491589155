"""A user of timm or torchvision, outside Lethe: their models, their evaluation transform, a
plain training loop saved with safetensors. Bring-your-own-model tests upload what this
writes and load what Lethe gives back with it."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import timm
import timm.data
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

CLASSES = 4
SIZE = (3, 32, 32)


def timm_user_model(num_classes: int = CLASSES) -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=num_classes)


def torchvision_user_model(num_classes: int = CLASSES) -> torch.nn.Module:
    return torchvision.models.mobilenet_v3_small(num_classes=num_classes)


def user_transform(arch: str) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform a user of the library writes, with no Lethe code."""
    if arch.startswith("timm:"):
        cfg = timm.get_pretrained_cfg("test_resnet")
        assert cfg is not None
        return timm.data.create_transform(input_size=SIZE, interpolation=cfg.interpolation,  # type: ignore[no-any-return]
                                          mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct)
    t = torchvision.transforms
    return t.Compose([t.Resize(int(32 * 256 / 224)), t.CenterCrop(32), t.ToTensor(),  # type: ignore[no-any-return]
                      t.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def user_batch(folder: Path, rows: list[tuple[str, int]], arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at `rows` (relative path, label) as the user's model reads them."""
    tf = user_transform(arch)
    xs = []
    for rel, _ in rows:
        with Image.open(folder / rel) as im:
            xs.append(tf(im.convert("RGB")))
    return torch.stack(xs), torch.tensor([label for _, label in rows])


def train_elsewhere(make: Callable[[], torch.nn.Module], folder: Path, rows: list[tuple[str, int]],
                    arch: str, prefix: str, out: Path) -> None:
    """A plain PyTorch training loop outside Lethe, saved with safetensors (keys prefixed
    with `prefix`, as a training wrapper would)."""
    torch.manual_seed(0)
    net = make()
    x, y = user_batch(folder, rows, arch)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(15):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    save_file({prefix + k: v.contiguous() for k, v in net.state_dict().items()}, str(out))


def manifest_rows(manifest: Path, split: str) -> list[tuple[str, str, int]]:
    """(sample ID, relative path, label) of the manifest's rows in `split`."""
    with manifest.open(newline="") as f:
        return [(r["sample_id"], r["path"], int(r["label"])) for r in csv.DictReader(f)
                if r["split"] == split]
