"""Train the image-text alignment heads with a symmetric contrastive loss on cached frozen features."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from tqdm import tqdm

from encoders.alignment import AlignmentConfig, AlignmentHeads

HELDOUT_FRACTION = 0.2  # share of products never used to train the heads (evaluation only)
_SPLIT_SALT = "shopguide-heldout-v1"


def is_heldout(product_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Deterministic split: blake2b(salt + id) mapped to [0, 1) < fraction -> held out.

    Depends only on the id, so a product keeps its side of the split when the catalog grows."""
    digest = hashlib.blake2b(f"{_SPLIT_SALT}:{product_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass(frozen=True)
class AlignTrainConfig:
    """Optimization of the heads (defaults train on 9k pairs in well under a minute on 2 cores)."""

    epochs: int = 40  # upper bound; early stopping usually ends sooner
    batch_size: int = 512  # contrastive negatives per step: larger = harder, up to memory
    lr: float = 1e-3
    weight_decay: float = 0.05
    val_fraction: float = 0.05  # of the training pairs, for early stopping (held-out stays untouched)
    patience: int = 5  # epochs without validation improvement before stopping
    seed: int = 0


@dataclass
class AlignResult:
    heads: AlignmentHeads
    metrics: dict  # train pairs, epochs, best validation recall@10, seconds


def _recall_at_10(queries: torch.Tensor, targets: torch.Tensor) -> float:
    """Row i of queries should retrieve row i of targets (both unit rows)."""
    top = (queries @ targets.T).topk(min(10, len(targets)), dim=1).indices
    return (top == torch.arange(len(queries))[:, None]).any(dim=1).float().mean().item()


def train_alignment(
    image_feats: np.ndarray,
    text_views: list[np.ndarray],
    model_config: AlignmentConfig,
    train_config: AlignTrainConfig = AlignTrainConfig(),
    progress: bool = True,
) -> AlignResult:
    """Fit the heads on pairs (image_feats[i], text_views[v][i]).

    `text_views` are alternative texts for the same products (title, title + attributes, attribute
    phrase); each step picks one view per pair at random, so the text head learns to place short
    shopper queries and full product descriptions near the same photos. View 0 is used for validation.
    """
    n = len(image_feats)
    if n < 20:
        raise ValueError(
            f"alignment needs at least 20 image-text pairs to train on, got {n}; ingest a larger catalog "
            "first (the heads are then reused for small ones from the same data dir)"
        )
    if any(len(v) != n for v in text_views):
        raise ValueError("every text view must have one row per image")
    gen = torch.Generator().manual_seed(train_config.seed)
    torch.manual_seed(train_config.seed)
    order = torch.randperm(n, generator=gen)
    n_val = max(10, int(n * train_config.val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    images = torch.as_tensor(image_feats, dtype=torch.float32)
    texts = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in text_views])  # (views, n, dim)

    heads = AlignmentHeads(model_config)
    optim = torch.optim.AdamW(heads.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // train_config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=train_config.lr, total_steps=train_config.epochs * steps_per_epoch, pct_start=0.1
    )
    from open_clip.loss import ClipLoss  # here, not at import: open_clip costs seconds to import

    loss_fn = ClipLoss()
    best, best_state, best_epoch, bad_epochs = -1.0, None, 0, 0
    start = time.perf_counter()
    bar = tqdm(range(train_config.epochs), desc="align heads", unit="epoch", disable=not progress)
    for epoch in bar:
        heads.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for step in range(steps_per_epoch):
            batch = perm[step * train_config.batch_size : (step + 1) * train_config.batch_size]
            view = torch.randint(len(text_views), (len(batch),), generator=gen)
            img = F.normalize(heads.image_head(images[batch]), dim=-1)  # (b, embed)
            txt = F.normalize(heads.text_head(texts[view, batch]), dim=-1)  # (b, embed)
            loss = loss_fn(img, txt, heads.logit_scale.exp())
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            with torch.no_grad():  # CLIP clamps the temperature so logits cannot blow up
                heads.logit_scale.clamp_(0, np.log(100))
        heads.eval()
        with torch.no_grad():
            val_img = F.normalize(heads.image_head(images[val_idx]), dim=-1)
            val_txt = F.normalize(heads.text_head(texts[0, val_idx]), dim=-1)
            recall = _recall_at_10(val_txt, val_img)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_r10=f"{recall:.3f}")
        if recall > best:
            best, best_epoch, bad_epochs = recall, epoch, 0
            best_state = {k: v.clone() for k, v in heads.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= train_config.patience:
                break
    heads.load_state_dict(best_state)
    heads.eval()
    metrics = {
        "train_pairs": int(len(train_idx)),
        "val_pairs": int(n_val),
        "epochs_run": epoch + 1,
        "best_epoch": best_epoch + 1,
        "val_title_to_image_r10": round(best, 4),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return AlignResult(heads, metrics)
