"""Alignment training: the contrastive heads learn to pair images with their texts, held-out stays out."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.alignment import AlignmentConfig
from training.align import AlignTrainConfig, is_heldout, train_alignment
from training.evaluate import recall_at_k


def _paired_features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and text features that share a latent (via different random linear maps) plus noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 8))
    to_image, to_text = rng.normal(size=(8, 32)), rng.normal(size=(8, 16))
    images = latent @ to_image + 0.3 * rng.normal(size=(n, 32))
    texts = latent @ to_text + 0.3 * rng.normal(size=(n, 16))
    return images.astype(np.float32), texts.astype(np.float32), latent


def test_heads_learn_cross_modal_retrieval() -> None:
    images, texts, _ = _paired_features(1200, seed=0)
    config = AlignmentConfig("img/1", "txt/1", image_dim=32, text_dim=16, embed_dim=16, hidden_dim=64)
    result = train_alignment(
        images[:1000], [texts[:1000]], config, AlignTrainConfig(epochs=30, batch_size=128), progress=False
    )
    # Unseen pairs: text -> image recall@10 among 200 candidates (chance = 0.05).
    recall = recall_at_k(result.heads.project_texts(texts[1000:]), result.heads.project_images(images[1000:]))
    assert recall > 0.5
    assert result.metrics["train_pairs"] + result.metrics["val_pairs"] == 1000
    assert 1 <= result.metrics["best_epoch"] <= result.metrics["epochs_run"] <= 30


def test_training_is_seeded() -> None:
    images, texts, _ = _paired_features(200, seed=1)
    config = AlignmentConfig("img/1", "txt/1", image_dim=32, text_dim=16, embed_dim=8, hidden_dim=0)
    train = AlignTrainConfig(epochs=3, batch_size=64)
    a = train_alignment(images, [texts], config, train, progress=False).heads
    b = train_alignment(images, [texts], config, train, progress=False).heads
    assert a.version == b.version


def test_bad_training_input_is_refused() -> None:
    config = AlignmentConfig("img/1", "txt/1", image_dim=4, text_dim=4)
    with pytest.raises(ValueError, match="at least 20"):
        train_alignment(np.zeros((5, 4), np.float32), [np.zeros((5, 4), np.float32)], config, progress=False)
    with pytest.raises(ValueError, match="one row per image"):
        train_alignment(
            np.zeros((30, 4), np.float32), [np.zeros((29, 4), np.float32)], config, progress=False
        )


def test_heldout_split_is_deterministic_and_about_a_fifth() -> None:
    ids = [str(i) for i in range(20000)]
    share = sum(map(is_heldout, ids)) / len(ids)
    assert 0.19 < share < 0.21
    assert [is_heldout(i) for i in ids[:100]] == [is_heldout(i) for i in ids[:100]]
