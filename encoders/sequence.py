"""GRU user-sequence encoder: a shopper's (product, event type) history -> a user vector in item space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoders.base import EncoderInfo

# The one event-type vocabulary of shopguide (the event store, the simulator and the API use it too).
# Model index = position + 1; 0 is padding. Amazon review sequences are all "purchase".
EVENT_TYPES = ("view", "click", "cart", "purchase", "search")
EVENT_INDEX = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
DEFAULT_EVENT = "purchase"

CHECKPOINT_NAME = "sequence_model.pt"
ENCODER_NAME = "gru_sequence"
ENCODER_VERSION = "1"

# A history element: an item id alone (event type "purchase") or an (item id, event type) pair.
HistoryEvent = str | int | tuple[str | int, str]


@dataclass
class SequenceModelConfig:
    """The GRU user encoder's shape. Defaults train on Amazon Beauty on 2 CPU cores in minutes."""

    dim: int = 128  # item embedding = user vector size (before the index augmentation, see below)
    hidden: int = 256  # GRU hidden size
    layers: int = 1  # GRU layers; one is enough for ~9-item histories and keeps encoding < 1 ms
    input_dropout: float = 0.4  # dropout on the summed item (+event, +attribute) input embeddings
    hidden_dropout: float = 0.3  # dropout on the GRU state before the projection to item space
    max_len: int = 50  # only the last max_len events of a history are read (training and serving alike)
    item_bias: bool = True  # per-item score bias (learns popularity); folded into the vectors, see below
    use_event_types: bool = True  # add an event-type embedding to each input item

    def validate(self) -> SequenceModelConfig:
        for name in ("dim", "hidden", "layers", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SequenceModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SequenceModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> SequenceModelConfig:
        """Build from a dict; unknown keys are errors that list the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sequence model config key(s) {unknown}; known: {sorted(known)}")
        return cls(**data).validate()


class GRUSequenceModel(nn.Module):
    """Item (+ event type, + attribute bag) embeddings -> dropout -> GRU -> projection = user vector.

    Items are scored by a dot product with the same (tied) item table plus a per-item bias. Item index 0
    is padding; real items are 1..n_items. Side information: each item's attribute ids (category, brand)
    go through an EmbeddingBag (mean) that is added to the item's own embedding, on the input side and
    on the output side alike, so rare items borrow strength from their brand and category.
    """

    def __init__(
        self,
        config: SequenceModelConfig,
        n_items: int,
        n_attributes: int = 0,
        attribute_ids: torch.Tensor | None = None,
        attribute_offsets: torch.Tensor | None = None,
        content: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = config.validate()
        self.n_items = n_items
        self.n_attributes = n_attributes
        self.item_embedding = nn.Embedding(n_items + 1, config.dim, padding_idx=0)
        self.event_embedding = nn.Embedding(len(EVENT_TYPES) + 1, config.dim, padding_idx=0)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.gru = nn.GRU(config.dim, config.hidden, num_layers=config.layers, batch_first=True)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)
        self.projection = nn.Linear(config.hidden, config.dim)
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1)) if config.item_bias else None
        # Attribute bags live in buffers so the checkpoint carries them (no side file needed to serve).
        if n_attributes > 0:
            if attribute_ids is None or attribute_offsets is None:
                raise ValueError("n_attributes > 0 needs attribute_ids and attribute_offsets")
            self.attribute_embedding = nn.EmbeddingBag(n_attributes + 1, config.dim, mode="mean")
            self.register_buffer("attribute_ids", attribute_ids.long())  # (n_item_attribute_pairs,)
            self.register_buffer("attribute_offsets", attribute_offsets.long())  # (n_items + 1,)
        else:
            self.attribute_embedding = None
        # Content side information: fixed product vectors (e.g. the catalog's fused image + text vectors,
        # (n_items + 1, content_dim), row 0 and unknown items zero) through a learned linear map, added
        # to the item's own embedding: items with few events borrow from products that look alike.
        if content is not None:
            if content.shape[0] != n_items + 1:
                raise ValueError(f"content has {content.shape[0]} rows, expected n_items + 1 = {n_items + 1}")
            self.register_buffer("content", content.float())  # (n_items + 1, content_dim)
            self.content_projection = nn.Linear(content.shape[1], config.dim, bias=False)
        else:
            self.content_projection = None
        nn.init.normal_(self.item_embedding.weight, std=1.0 / math.sqrt(config.dim))
        nn.init.zeros_(self.event_embedding.weight)  # starts as a no-op; Amazon data has one event type
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            if self.attribute_embedding is not None:
                self.attribute_embedding.weight.normal_(std=1.0 / math.sqrt(config.dim))

    def item_table(self) -> torch.Tensor:
        """(n_items + 1, dim) item vectors (row 0 = padding), own embedding + attribute-bag mean."""
        table = self.item_embedding.weight
        if self.attribute_embedding is not None:
            table = table + self.attribute_embedding(self.attribute_ids, self.attribute_offsets)
        if self.content_projection is not None:
            table = table + self.content_projection(self.content)
        return table

    def states(self, items: torch.Tensor, events: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(batch, T) right-padded items/events -> (batch, T + 1, dim) user vectors after 0..T events.

        Position 0 is the empty history: the GRU's zero initial state through the projection. Training
        asks it to predict each user's first item, so it learns the first-purchase popularity: that is
        the cold-start vector.
        """
        inputs = table[items]  # (batch, T, dim)
        if self.config.use_event_types:
            inputs = inputs + self.event_embedding(events)
        if inputs.shape[1] > 0:
            outputs, _ = self.gru(self.input_dropout(inputs))  # (batch, T, hidden)
        else:  # a batch of one-item windows: only the cold-start position has a target
            outputs = inputs.new_zeros(inputs.shape[0], 0, self.config.hidden)
        start = outputs.new_zeros(outputs.shape[0], 1, outputs.shape[2])  # (batch, 1, hidden)
        hidden = torch.cat([start, outputs], dim=1)  # (batch, T + 1, hidden)
        return self.projection(self.hidden_dropout(hidden))  # (batch, T + 1, dim)

    def logits(self, users: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(n, dim) user vectors -> (n, n_items) scores over real items (column j = item index j + 1)."""
        scores = users @ table[1:].T  # (n, n_items)
        if self.item_bias is not None:
            scores = scores + self.item_bias[1:]
        return scores

    def user_vectors(
        self,
        items: torch.Tensor,
        events: torch.Tensor,
        lengths: torch.Tensor,
        table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, T) right-padded histories with `lengths` -> (batch, dim) vectors after the last event.

        Same result as `states(...)[row, lengths[row]]`, but packed: the GRU runs only the real steps,
        which is 3-5x faster on Amazon's short histories padded to a long one. Length 0 = cold start.
        `table`: a precomputed `item_table()` (serving caches it: the attribute bags cost ~6 ms a call).
        """
        table = self.item_table() if table is None else table
        inputs = table[items]  # (batch, T, dim)
        if self.config.use_event_types:
            inputs = inputs + self.event_embedding(events)
        inputs = self.input_dropout(inputs)
        hidden = inputs.new_zeros(len(lengths), self.config.hidden)  # (batch, hidden); zeros = empty history
        nonempty = lengths > 0
        if bool(nonempty.any()):
            packed = nn.utils.rnn.pack_padded_sequence(
                inputs[nonempty], lengths[nonempty].cpu(), batch_first=True, enforce_sorted=False
            )
            _, last = self.gru(packed)  # (layers, n_nonempty, hidden), each row at its own last step
            hidden[nonempty] = last[-1]
        return self.projection(self.hidden_dropout(hidden))  # (batch, dim)


@dataclass
class EncodeStats:
    """What encoding skipped: item ids missing from the vocabulary, per user and in total."""

    unknown_items: int  # total over all histories
    unknown_per_user: list[int]  # one count per history, in input order


class SequenceEncoder:
    """A trained GRU user encoder with its item id vocabulary: user and item vectors for the index.

    Vector space (why not plain cosine): full-softmax training scores items by a raw dot product plus a
    per-item bias, which ranks better than cosine (the norm and bias carry popularity). The index compares
    unit vectors by cosine, so both sides are augmented (the MIPS-to-cosine reduction of Bachrach et al.,
    RecSys 2014): item' = [v, b, sqrt(M^2 - |[v, b]|^2)] / M with M the largest |[v, b]|, and
    user' = [u, 1, 0] / |[u, 1]|. Then cos(user', item') = (u.v + b) / (M |[u, 1]|), a positive multiple
    of the exact score for each user, so cosine top-k equals the model's exact top-k. Vectors have dim + 2
    components. `space="dot"` gives the un-normalized [u, 1] / [v, b] (dim + 1) for a dot-product space.
    """

    def __init__(self, model: GRUSequenceModel, item_ids: Sequence[str]):
        if len(item_ids) != model.n_items:
            raise ValueError(f"vocabulary has {len(item_ids)} ids but the model has {model.n_items} items")
        self.model = model.eval()
        self.item_ids = [str(i) for i in item_ids]
        self.item_index = {item_id: i + 1 for i, item_id in enumerate(self.item_ids)}  # 0 = padding
        self._cache: dict[str, np.ndarray] = {}  # item vectors per space; the model is frozen once wrapped
        with torch.inference_mode():
            self._table = model.item_table()  # (n_items + 1, dim), computed once: the model is frozen
        self.extra: dict = {}  # what the checkpoint recorded about training (dataset, metrics)

    @property
    def config(self) -> SequenceModelConfig:
        return self.model.config

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo(ENCODER_NAME, ENCODER_VERSION, self.config.dim + 2)

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self, folder: Path, extra: dict | None = None) -> Path:
        """Write `folder/sequence_model.pt`: state_dict + config + item ids (+ JSON-safe `extra`)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CHECKPOINT_NAME
        checkpoint = {
            "state_dict": self.model.state_dict(),
            "config": asdict(self.config),
            "item_ids": self.item_ids,
            "n_attributes": self.model.n_attributes,
            "encoder": self.info.id,
            "extra": extra or {},
        }
        tmp = path.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
        return path

    @classmethod
    def load(cls, path: Path) -> SequenceEncoder:
        """Load a checkpoint file or a folder holding `sequence_model.pt` (weights_only: no pickled code)."""
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no sequence model at {path}; train one with `shopguide train sequences`"
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config = SequenceModelConfig.from_dict(checkpoint["config"])
        state = checkpoint["state_dict"]
        n_attributes = int(checkpoint["n_attributes"])
        model = GRUSequenceModel(
            config,
            n_items=len(checkpoint["item_ids"]),
            n_attributes=n_attributes,
            attribute_ids=state.get("attribute_ids"),
            attribute_offsets=state.get("attribute_offsets"),
            content=state.get("content"),
        )
        model.load_state_dict(state)
        encoder = cls(model, checkpoint["item_ids"])
        encoder.extra = checkpoint.get("extra", {})
        return encoder

    # ---- encoding ----------------------------------------------------------------------------------
    def to_indices(
        self, histories: Sequence[Sequence[HistoryEvent]]
    ) -> tuple[list[list[tuple[int, int]]], EncodeStats]:
        """Histories of external ids -> (item index, event index) lists (last max_len), unknowns counted."""
        encoded, unknown_per_user = [], []
        for history in histories:
            events, unknown = [], 0
            for event in history:
                item_id, event_type = event if isinstance(event, tuple) else (event, DEFAULT_EVENT)
                event_index = EVENT_INDEX.get(event_type)
                if event_index is None:
                    raise ValueError(f"unknown event type {event_type!r}; known: {list(EVENT_TYPES)}")
                item_index = self.item_index.get(str(item_id))
                if item_index is None:  # a product the model never saw (new or removed): skip, count
                    unknown += 1
                    continue
                events.append((item_index, event_index))
            encoded.append(events[-self.config.max_len :])
            unknown_per_user.append(unknown)
        return encoded, EncodeStats(sum(unknown_per_user), unknown_per_user)

    @torch.inference_mode()
    def raw_user_vectors(self, encoded: Sequence[Sequence[tuple[int, int]]]) -> torch.Tensor:
        """Index histories -> (n, dim) raw user vectors u (empty history -> the cold-start vector)."""
        lengths = torch.tensor([len(h) for h in encoded], dtype=torch.long)
        width = max(1, int(lengths.max()) if len(encoded) else 1)
        items = torch.zeros(len(encoded), width, dtype=torch.long)
        events = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, history in enumerate(encoded):
            if history:
                items[row, : len(history)] = torch.tensor([i for i, _ in history])
                events[row, : len(history)] = torch.tensor([e for _, e in history])
        return self.model.user_vectors(items, events, lengths, self._table)  # (n, dim)

    @torch.inference_mode()
    def raw_item_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_items, dim) item vectors v and (n_items,) biases b, in vocabulary order."""
        table = self._table[1:]
        bias = self.model.item_bias[1:] if self.model.item_bias is not None else table.new_zeros(len(table))
        return table, bias

    def scores(self, histories: Sequence[Sequence[HistoryEvent]]) -> np.ndarray:
        """(n, n_items) exact model scores u.v + b, columns in vocabulary order."""
        encoded, _ = self.to_indices(histories)
        with torch.inference_mode():
            return self.model.logits(self.raw_user_vectors(encoded), self._table).numpy()

    @torch.inference_mode()
    def encode_users_with_stats(
        self, histories: Sequence[Sequence[HistoryEvent]], space: str = "cosine"
    ) -> tuple[np.ndarray, EncodeStats]:
        """(n, dim + 2) unit user vectors for a cosine index (or (n, dim + 1) for space="dot") + stats."""
        encoded, stats = self.to_indices(histories)
        users = self.raw_user_vectors(encoded)  # (n, dim)
        augmented = torch.cat([users, users.new_ones(len(users), 1)], dim=1)  # (n, dim + 1)
        if space == "dot":
            return augmented.numpy().astype(np.float32), stats
        _check_space(space)
        augmented = torch.cat([augmented, users.new_zeros(len(users), 1)], dim=1)  # (n, dim + 2)
        return (augmented / augmented.norm(dim=1, keepdim=True)).numpy().astype(np.float32), stats

    def encode_users(self, histories: Sequence[Sequence[HistoryEvent]], space: str = "cosine") -> np.ndarray:
        """(n, dim + 2) unit user vectors; unknown item ids are skipped (see encode_users_with_stats)."""
        return self.encode_users_with_stats(histories, space)[0]

    def cold_start_vector(self, space: str = "cosine") -> np.ndarray:
        """(dim + 2,) the vector of an empty history (ranks items by learned first-purchase popularity)."""
        return self.encode_users([[]], space)[0]

    @torch.inference_mode()
    def item_vectors(self, space: str = "cosine") -> np.ndarray:
        """(n_items, dim + 2) unit item vectors for a cosine index, rows in `item_ids` order."""
        if space in self._cache:
            return self._cache[space]
        table, bias = self.raw_item_table()
        augmented = torch.cat([table, bias[:, None]], dim=1).double()  # (n_items, dim + 1)
        if space == "dot":
            vectors = augmented.float().numpy()
        else:
            _check_space(space)
            norms = augmented.norm(dim=1, keepdim=True)  # (n_items, 1)
            largest = norms.max()
            filler = (largest**2 - norms**2).clamp_min(0).sqrt()  # lifts every row to norm `largest`
            vectors = (torch.cat([augmented, filler], dim=1) / largest).float().numpy()
        self._cache[space] = vectors
        return vectors


def _check_space(space: str) -> None:
    if space not in ("cosine", "dot"):
        raise ValueError(f"unknown vector space {space!r}; use 'cosine' (unit vectors) or 'dot'")
