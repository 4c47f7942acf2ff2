"""Sequence data (`user item item ...` files), leave-one-out split, GRU training and evaluation."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from encoders.sequence import EVENT_INDEX, EVENT_TYPES, GRUSequenceModel, SequenceEncoder, SequenceModelConfig
from training.catalog import DATASETS_DIR
from training.cf import ItemCF, Popularity, UserCF
from training.seq_metrics import KS, RankingAccumulator

DEFAULT_SEQUENCES = DATASETS_DIR / "amazon-sequences"
PURCHASE = EVENT_INDEX["purchase"]  # every Amazon review event is a purchase
TOP_K_OUT = 20  # items per user in the --topk-out TSV

# Published full-ranking results on the same files and protocol: Zhou et al., "S3-Rec: Self-Supervised
# Learning for Sequential Recommendation with Mutual Information Maximization", CIKM 2020, Table 2
# (as quoted in ../shared/datasets/README.md). None = not quoted there.
PUBLISHED: dict[str, dict[str, dict[str, float | None]]] = {
    "Beauty": {
        "PopRec": {"HR@5": 0.0080, "NDCG@5": 0.0044, "HR@10": 0.0152, "NDCG@10": 0.0068, "HR@20": 0.0217,
                   "NDCG@20": 0.0084},
        "GRU4Rec": {"HR@5": 0.0164, "NDCG@5": 0.0099, "HR@10": 0.0283, "NDCG@10": 0.0137, "HR@20": 0.0479,
                    "NDCG@20": 0.0187},
        "SASRec": {"HR@5": 0.0387, "NDCG@5": 0.0249, "HR@10": 0.0605, "NDCG@10": 0.0318, "HR@20": 0.0902,
                   "NDCG@20": 0.0394},
        "BERT4Rec": {"HR@5": None, "NDCG@5": None, "HR@10": 0.0347, "NDCG@10": 0.0170, "HR@20": None,
                     "NDCG@20": None},
        "S3-Rec": {"HR@5": 0.0387, "NDCG@5": 0.0244, "HR@10": 0.0647, "NDCG@10": 0.0327, "HR@20": 0.0994,
                   "NDCG@20": 0.0414},
    },
    "Sports": {
        "PopRec": {"HR@10": 0.0094, "NDCG@10": 0.0053},
        "GRU4Rec": {"HR@10": 0.0204, "NDCG@10": 0.0110},
        "SASRec": {"HR@10": 0.0350, "NDCG@10": 0.0192},
        "BERT4Rec": {"HR@10": 0.0191, "NDCG@10": 0.0099},
        "S3-Rec": {"HR@10": 0.0385, "NDCG@10": 0.0204},
    },
}  # fmt: skip


@dataclass
class TrainConfig:
    """How the GRU is trained. Defaults: full-softmax cross entropy, early stopping on validation NDCG@10."""

    lr: float = 2e-3  # AdamW learning rate (2e-3 peaks on Beauty validation at ~10 epochs)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (dropout does the regularizing)
    batch_size: int = 128  # training windows (user sequences) per step; ~6 targets each on Amazon
    # Smaller batches when the data has fewer windows than batch_size * min_steps_per_epoch: a small
    # log (a new shop, the closed loop's 300 shoppers) would otherwise get 2-3 steps an epoch, and early
    # stopping ends training before the model learns anything (loop day-0 model: validation HR@10 0.04
    # at batch 128, 0.34 at 16). Amazon Beauty and Sports keep 128 (150+ steps an epoch).
    min_steps_per_epoch: int = 20
    max_epochs: int = 200  # upper bound; early stopping or max_minutes usually ends training first
    patience: int = 3  # stop after this many evaluations without a better validation NDCG@10
    eval_every: int = 1  # epochs between validation evaluations
    max_minutes: float = 15.0  # wall-clock budget for training (the best checkpoint so far is kept)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: float = 5.0  # gradient-norm clip: GRUs occasionally spike on long histories
    seed: int = 0  # torch and numpy seed (initialization, dropout, batch order)
    threads: int = 2  # torch intra-op threads

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class SequenceData:
    """One `user item item ...` file: external user ids and their item id sequences in time order."""

    user_ids: list[str]
    sequences: list[list[str]]
    path: str = ""

    @property
    def name(self) -> str:
        """Dataset name for the published table: "Beauty", "Sports", or the file stem."""
        stem = Path(self.path).stem
        return "Sports" if stem.startswith("Sports") else stem


def load_sequences(path: Path) -> SequenceData:
    """Read `user_id item_1 item_2 ...` lines (whitespace-separated, time order); blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequence file not found: {path} (expected `user item item ...` lines)")
    user_ids, sequences = [], []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{line_no}: user {parts[0]} has no items; expected `user item ...`")
            user_ids.append(parts[0])
            sequences.append(parts[1:])
    if not sequences:
        raise ValueError(f"{path} holds no sequences")
    return SequenceData(user_ids, sequences, str(path))


def load_dataset(path: Path) -> tuple[SequenceData, list[list[str]] | None]:
    """A `user item item ...` file (every event a purchase, types None), or a shopguide events file
    (`.jsonl`, e.g. from `shopguide simulate sessions`): per-user (product, event type) histories."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return load_sequences(path), None
    from training.events import read_events
    from training.session_data import histories_from_events

    if not path.is_file():
        raise FileNotFoundError(f"events file not found: {path}")
    histories = histories_from_events(read_events(path))
    if not histories:
        raise ValueError(f"{path} holds no product events")
    users = sorted(histories)
    data = SequenceData(users, [[pid for pid, _ in histories[u]] for u in users], str(path))
    return data, [[kind for _, kind in histories[u]] for u in users]


def load_item_attributes(path: Path) -> dict[str, list[int]]:
    """Read `{item_id: [attribute ids]}` JSON (S3-Rec's `*_item2attributes.json`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute file not found: {path} (expected {{item_id: [attribute ids]}})")
    data = json.loads(path.read_text())
    return {str(item): [int(a) for a in attrs] for item, attrs in data.items()}


def item_vocabulary(data: SequenceData) -> list[str]:
    """Every item id in the file, sorted numerically when all ids are integers (else by first appearance)."""
    seen = dict.fromkeys(item for seq in data.sequences for item in seq)
    ids = list(seen)
    if all(i.isdigit() for i in ids):
        ids.sort(key=int)
    return ids


@dataclass
class LeaveOneOut:
    """The published split. Item columns are 0-based indices into the item vocabulary.

    For each user with >= 3 items: test target = last item, validation target = second to last, training
    part = the rest. Validation input = training part; test input = everything but the last item.
    Users with fewer than 3 items are training-only (`extra_train`) and not evaluated (none in Beauty or
    Sports, which are 5-core).
    """

    user_ids: list[str]  # evaluated users
    train: list[np.ndarray]  # per evaluated user: seq[:-2]
    valid_target: np.ndarray  # (n_users,) seq[-2]
    test_target: np.ndarray  # (n_users,) seq[-1]
    extra_train: list[np.ndarray] = field(default_factory=list)  # sequences of users with < 3 items
    # Event-type indices (encoders.sequence.EVENT_INDEX) aligned with each whole sequence; None = all
    # purchases (the Amazon files). Evaluated users' arrays cover train + validation + test items.
    events: list[np.ndarray] | None = None
    extra_events: list[np.ndarray] | None = None

    def inputs(self, which: str) -> list[np.ndarray]:
        """Histories the model reads for the "valid" or "test" targets."""
        if which == "valid":
            return self.train
        if which == "test":
            return [np.append(t, v) for t, v in zip(self.train, self.valid_target, strict=True)]
        raise ValueError(f"unknown split {which!r}; use 'valid' or 'test'")

    def targets(self, which: str) -> np.ndarray:
        return self.valid_target if which == "valid" else self.test_target

    def input_events(self, which: str) -> list[np.ndarray] | None:
        """Event types aligned with `inputs(which)`, or None when every event is a purchase."""
        if self.events is None:
            return None
        cut = 2 if which == "valid" else 1
        return [e[:-cut] for e in self.events]

    def train_sequences(self) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Training item sequences (evaluated users first, then short ones) and their event types."""
        items = self.train + self.extra_train
        if self.events is None:
            return items, None
        return items, [e[:-2] for e in self.events] + list(self.extra_events or [])


def leave_one_out(
    data: SequenceData, item_ids: Sequence[str], events: Sequence[Sequence[str]] | None = None
) -> LeaveOneOut:
    """The split; `events` (event type names aligned with data.sequences) keeps each step's type."""
    column = {item: i for i, item in enumerate(item_ids)}
    users, train, valid, test, extra = [], [], [], [], []
    kept_events, extra_events = [], []
    for row, (user, seq) in enumerate(zip(data.user_ids, data.sequences, strict=True)):
        cols = np.fromiter((column[i] for i in seq), dtype=np.int64, count=len(seq))
        types = None if events is None else np.array([EVENT_INDEX[t] for t in events[row]], dtype=np.int64)
        if len(cols) < 3:
            extra.append(cols)
            extra_events.append(types)
            continue
        users.append(user)
        train.append(cols[:-2])
        valid.append(cols[-2])
        test.append(cols[-1])
        kept_events.append(types)
    if events is None:
        return LeaveOneOut(users, train, np.asarray(valid), np.asarray(test), extra)
    return LeaveOneOut(users, train, np.asarray(valid), np.asarray(test), extra, kept_events, extra_events)


def attribute_bags(
    item_ids: Sequence[str], attributes: dict[str, list[int]] | None
) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(n_attributes, ids, offsets) for the model's EmbeddingBag; row 0 (padding) and unknown items get
    an empty bag. Attribute ids are remapped to 1..n_attributes in sorted order."""
    if not attributes:
        return 0, None, None
    known = sorted({a for attrs in attributes.values() for a in attrs})
    remap = {a: i + 1 for i, a in enumerate(known)}
    bags = [[]] + [[remap[a] for a in attributes.get(item, [])] for item in item_ids]
    offsets = torch.tensor(np.cumsum([0] + [len(b) for b in bags[:-1]]), dtype=torch.long)
    ids = torch.tensor([a for b in bags for a in b], dtype=torch.long)
    return len(known), ids, offsets


def training_windows(
    sequences: Sequence[np.ndarray], max_len: int, events: Sequence[np.ndarray] | None = None
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Cut 0-based item sequences into (window of 1-based indices, its event types, is_first).

    A window of n items feeds n - 1 inputs and predicts items 1..n-1 (every prefix's next item) plus,
    in a sequence's first window, item 0 from the empty history (that trains the cold-start vector).
    Windows overlap by one item so every item after the first max_len is still a target, with at most
    max_len items of history: the same cap as serving.
    """
    windows = []
    for row, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64) + 1
        if len(seq) == 0:
            continue
        types = np.full(len(seq), PURCHASE, np.int64) if events is None else np.asarray(events[row], np.int64)
        windows.append((seq[: max_len + 1], types[: max_len + 1], True))
        for start in range(max_len, len(seq) - 1, max_len):
            windows.append((seq[start : start + max_len + 1], types[start : start + max_len + 1], False))
    return windows


def _batches(windows: list[tuple[np.ndarray, np.ndarray, bool]], batch_size: int, rng: np.random.Generator):
    """Yield (items (B, T), events (B, T), targets (B, T + 1), mask (B, T + 1)) batches of similar
    length, shuffled."""
    order = rng.permutation(len(windows))
    order = order[np.argsort([len(windows[i][0]) for i in order], kind="stable")]  # bucket by length
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk_index in rng.permutation(len(chunks)):
        chunk = [windows[i] for i in chunks[chunk_index]]
        width = max(len(w) for w, _, _ in chunk)
        targets = np.zeros((len(chunk), width), dtype=np.int64)
        types = np.zeros((len(chunk), width), dtype=np.int64)
        for row, (window, window_types, _) in enumerate(chunk):
            targets[row, : len(window)] = window
            types[row, : len(window)] = window_types
        mask = targets > 0
        mask[:, 0] = [first for _, _, first in chunk]
        items = torch.from_numpy(targets[:, :-1].copy())  # (B, T): inputs are all but the last item
        events = torch.from_numpy(types[:, :-1].copy())  # (B, T): the inputs' event types
        yield items, events, torch.from_numpy(targets), torch.from_numpy(mask)


def _padded(
    histories: Sequence[np.ndarray], max_len: int, events: Sequence[np.ndarray] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """0-based histories -> right-padded (n, T) 1-based items and event types (last max_len), (n,) lengths."""
    cut = [
        np.asarray(h[-max_len:], dtype=np.int64) + 1 if len(h) else np.zeros(0, np.int64) for h in histories
    ]
    lengths = torch.tensor([len(h) for h in cut], dtype=torch.long)
    items = torch.zeros(len(cut), max(1, int(lengths.max())), dtype=torch.long)
    types = torch.zeros_like(items)
    for row, h in enumerate(cut):
        items[row, : len(h)] = torch.from_numpy(h)
        if events is None:
            types[row, : len(h)] = PURCHASE
        elif len(h):
            types[row, : len(h)] = torch.from_numpy(np.asarray(events[row][-max_len:], dtype=np.int64))
    return items, types, lengths


@torch.inference_mode()
def model_scores(
    model: GRUSequenceModel, histories: Sequence[np.ndarray], events: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """(n, n_items) exact scores for 0-based histories (events None: every event a purchase)."""
    was_training = model.training
    model.eval()
    items, events, lengths = _padded(histories, model.config.max_len, events)
    table = model.item_table()  # (n_items + 1, dim), once for both sides
    users = model.user_vectors(items, events, lengths, table)  # (n, dim)
    scores = model.logits(users, table).numpy()
    model.train(was_training)
    return scores


def evaluate_scorer(
    score_batch, histories: Sequence[np.ndarray], targets: np.ndarray, batch: int = 1024, keep_top: int = 0
) -> RankingAccumulator:
    """Rank each target against all items with the user's history excluded; `score_batch(rows)` returns
    (len(rows), n_items) scores for those users."""
    accumulator = RankingAccumulator(keep_top)
    for start in range(0, len(targets), batch):
        rows = np.arange(start, min(start + batch, len(targets)))
        scores = np.asarray(score_batch(rows), dtype=np.float32)  # writable: masked in place
        accumulator.add(scores, targets[rows], [histories[r] for r in rows])
    return accumulator


def evaluate_model(
    model: GRUSequenceModel, split: LeaveOneOut, which: str, keep_top: int = 0
) -> RankingAccumulator:
    histories, events = split.inputs(which), split.input_events(which)

    def score_rows(rows: np.ndarray) -> np.ndarray:
        return model_scores(
            model, [histories[r] for r in rows], None if events is None else [events[r] for r in rows]
        )

    return evaluate_scorer(score_rows, histories, split.targets(which), keep_top=keep_top)


def _seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def effective_batch_size(n_windows: int, config: TrainConfig) -> int:
    """`config.batch_size`, made smaller so an epoch of n_windows has at least min_steps_per_epoch steps."""
    return max(1, min(config.batch_size, math.ceil(n_windows / max(1, config.min_steps_per_epoch))))


def train_model(
    split: LeaveOneOut,
    n_items: int,
    model_config: SequenceModelConfig,
    train_config: TrainConfig,
    attribute_bag: tuple[int, torch.Tensor | None, torch.Tensor | None] = (0, None, None),
    progress: bool = True,
    content: torch.Tensor | None = None,
    init_model: GRUSequenceModel | None = None,
) -> tuple[GRUSequenceModel, dict]:
    """Full-softmax next-item training with AdamW, early stopping on validation NDCG@10; returns the best
    model (by validation NDCG@10) and a summary (epochs, seconds per epoch, validation history).

    `init_model`: continue training this model (a warm start for incremental updates) instead of a new
    one; it must already cover the n_items vocabulary (see training.update.expand_model)."""
    torch.set_num_threads(train_config.threads)
    rng = _seed_everything(train_config.seed)
    n_attributes, attribute_ids, attribute_offsets = attribute_bag
    if init_model is not None:
        if init_model.n_items != n_items:
            raise ValueError(f"init_model has {init_model.n_items} items, the data {n_items}")
        model = init_model
    else:
        model = GRUSequenceModel(
            model_config, n_items, n_attributes, attribute_ids, attribute_offsets, content
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    train_items, train_events = split.train_sequences()
    windows = training_windows(train_items, model_config.max_len, train_events)
    n_targets = sum(len(w) - (0 if first else 1) for w, _, first in windows)
    batch_size = effective_batch_size(len(windows), train_config)
    best = {"NDCG@10": -1.0, "epoch": 0, "state": None, "metrics": {}}
    history, epoch_seconds, stale = [], [], 0
    started = time.perf_counter()
    stop_reason = "max_epochs"
    for epoch in range(1, train_config.max_epochs + 1):
        model.train()
        epoch_start, loss_sum = time.perf_counter(), 0.0
        n_batches = math.ceil(len(windows) / batch_size)
        bar = tqdm(
            _batches(windows, batch_size, rng), total=n_batches, desc=f"epoch {epoch}",
            leave=False, disable=not progress,
        )  # fmt: skip
        for items, events, targets, mask in bar:
            table = model.item_table()  # (n_items + 1, dim), recomputed: attribute bags train too
            states = model.states(items, events, table)  # (B, T + 1, dim)
            logits = model.logits(states[mask], table)  # (n_valid, n_items)
            loss = F.cross_entropy(logits, targets[mask] - 1, label_smoothing=train_config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            loss_sum += loss.item() * int(mask.sum())
        epoch_seconds.append(time.perf_counter() - epoch_start)
        entry = {"epoch": epoch, "loss": loss_sum / n_targets, "seconds": round(epoch_seconds[-1], 2)}
        if epoch % train_config.eval_every == 0:
            metrics = evaluate_model(model, split, "valid").metrics()
            entry.update({k: round(v, 5) for k, v in metrics.items()})
            if metrics["NDCG@10"] > best["NDCG@10"]:
                best = {"NDCG@10": metrics["NDCG@10"], "epoch": epoch, "metrics": metrics,
                        "state": copy.deepcopy(model.state_dict())}  # fmt: skip
                stale = 0
            else:
                stale += 1
        history.append(entry)
        tqdm.write(json.dumps(entry))  # one line per epoch even without bars: logs show the curve
        if stale >= train_config.patience:
            stop_reason = "early_stopping"
            break
        if time.perf_counter() - started > train_config.max_minutes * 60:
            stop_reason = "max_minutes"
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    summary = {
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "stop_reason": stop_reason,
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_epoch": round(float(np.mean(epoch_seconds)), 2),
        "training_windows": len(windows),
        "batch_size": batch_size,
        "training_targets": n_targets,
        "valid": best["metrics"],
        "history": history,
    }
    return model, summary


def content_vectors(data_dir: Path, item_ids: Sequence[str], space: str = "fused") -> torch.Tensor:
    """(n_items + 1, dim) the live collection's `space` vectors for the items (row 0 and missing: zero)."""
    from index import EdgeStore
    from training.ingest import ALIAS

    with EdgeStore(Path(data_dir) / "index") as store:
        index = store.open(ALIAS)
        dim = index.spaces[space].dim
        table = torch.zeros(len(item_ids) + 1, dim)
        position = {pid: i + 1 for i, pid in enumerate(item_ids)}
        for start in range(0, len(item_ids), 2048):
            for record in index.get(item_ids[start : start + 2048], with_vectors=True):
                table[position[record.product_id]] = torch.from_numpy(record.vectors[space])
    return table


def load_config_file(path: Path | None) -> tuple[SequenceModelConfig, TrainConfig]:
    """Defaults < YAML with `model:` and `train:` sections; unknown keys are errors naming the known ones."""
    if path is None:
        return SequenceModelConfig(), TrainConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: ['model', 'train']")
    train_data = data.get("train") or {}
    bad = sorted(set(train_data) - TrainConfig.field_names())
    if bad:
        raise ValueError(f"{path}: unknown train key(s) {bad}; known: {sorted(TrainConfig.field_names())}")
    return SequenceModelConfig.from_dict(data.get("model") or {}), TrainConfig(**train_data)


def run_train_sequences(
    dataset: Path,
    out_dir: Path,
    seed: int = 0,
    attributes: Path | None = None,
    model_config: SequenceModelConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = True,
    content_index: Path | None = None,
) -> dict:
    """Train on the leave-one-out training part of `dataset`; write `out_dir/sequence_model.pt`.

    `content_index`: a data dir whose live collection holds the products; their `fused` vectors become
    content side information (products not in it get a zero row)."""
    data, events = load_dataset(dataset)
    item_ids = item_vocabulary(data)
    split = leave_one_out(data, item_ids, events)
    model_config = model_config or SequenceModelConfig()
    train_config = replace(train_config or TrainConfig(), seed=seed)
    bag = attribute_bags(item_ids, load_item_attributes(attributes) if attributes else None)
    content = content_vectors(content_index, item_ids) if content_index else None
    model, summary = train_model(split, len(item_ids), model_config, train_config, bag, progress, content)
    extra = {
        "dataset": str(dataset),
        "attributes": str(attributes) if attributes else None,
        "content_index": str(content_index) if content_index else None,
        "train_config": asdict(train_config),
        "train": {k: v for k, v in summary.items() if k != "history"},
    }
    path = SequenceEncoder(model, item_ids).save(Path(out_dir), extra=extra)
    (Path(out_dir) / "train_history.json").write_text(json.dumps(summary, indent=2))
    return {"checkpoint": str(path), "users": len(split.user_ids), "items": len(item_ids), **summary}


def run_eval_sequences(
    dataset: Path, model_dir: Path, baselines: bool = True, user_cf_neighbours: int = 50
) -> dict:
    """Test metrics (HR/NDCG@5/10/20) of the trained GRU and of popularity, item-CF and user-CF, plus the
    GRU's top-20 items per test user. Baselines fit on the test inputs (everything but each last item)."""
    encoder = SequenceEncoder.load(model_dir)
    torch.set_num_threads(int(encoder.extra.get("train_config", {}).get("threads", 2)))
    data, events = load_dataset(dataset)
    missing = sorted(set(item_vocabulary(data)) - set(encoder.item_ids))
    if missing:
        raise ValueError(
            f"{dataset} has {len(missing)} item(s) the model never saw (e.g. {missing[:3]}); "
            f"evaluate on the file the model was trained on, or retrain with `shopguide train sequences`"
        )
    split = leave_one_out(data, encoder.item_ids, events)
    histories, targets = split.inputs("test"), split.targets("test")
    rows: dict[str, dict] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    gru = evaluate_model(encoder.model, split, "test", keep_top=TOP_K_OUT)
    rows["GRU (ours)"], timings["GRU (ours)"] = gru.metrics(), time.perf_counter() - start
    if baselines:
        n_items = len(encoder.item_ids)
        for name, build in (
            ("popularity", lambda: Popularity(histories, n_items)),
            ("item-CF", lambda: ItemCF(histories, n_items)),
            ("user-CF", lambda: UserCF(histories, n_items, user_cf_neighbours)),
        ):
            start = time.perf_counter()
            scorer = build()
            rows[name] = evaluate_scorer(scorer.scores, histories, targets, batch=512).metrics()
            timings[name] = time.perf_counter() - start
    # Serving path: the same model through the index's behavior space (HNSW), 1,000 random test users.
    from training.behavior import hnsw_behavior_recall

    picked = np.random.default_rng(0).permutation(len(histories))[:1000]
    test_events = split.input_events("test")
    sample = [
        [(encoder.item_ids[c], EVENT_TYPES[e - 1]) for c, e in zip(histories[r], test_events[r], strict=True)]
        if test_events is not None
        else [encoder.item_ids[c] for c in histories[r]]
        for r in picked
    ]
    start = time.perf_counter()
    index_recall = hnsw_behavior_recall(encoder, sample, k=10)
    timings["index recall"] = time.perf_counter() - start
    top = gru.top()
    return {
        "index_recall_at_10": round(index_recall, 4),
        "index_recall_users": len(sample),
        "dataset": str(dataset),
        "dataset_name": data.name,
        "model": str(model_dir),
        "users": len(split.user_ids),
        "items": len(encoder.item_ids),
        "protocol": "leave-one-out; full ranking over all items; user's other items excluded; "
        "ties pessimistic (equal scores rank above the target)",
        "rows": rows,
        "eval_seconds": {k: round(v, 1) for k, v in timings.items()},
        "published": PUBLISHED.get(data.name, {}),
        "model_train": encoder.extra.get("train", {}),
        "topk": [[split.user_ids[r]] + [encoder.item_ids[c] for c in top[r]] for r in range(len(top))],
    }


def write_topk_tsv(result: dict, path: Path) -> None:
    """One line per test user: user_id then the top-ranked item ids, tab-separated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(line) + "\n" for line in result["topk"]))


def format_table(result: dict) -> str:
    """Our rows beside the published rows (a dash where the paper's number is not quoted)."""
    columns = [f"{m}@{k}" for k in KS for m in ("HR", "NDCG")]
    lines = [
        f"{result['dataset_name']}: {result['users']} test users, {result['items']} items",
        f"protocol: {result['protocol']}",
        f"{'model':<26}" + "".join(f"{c:>9}" for c in columns),
    ]
    for name, metrics in result["rows"].items():
        lines.append(f"{name:<26}" + "".join(f"{metrics[c]:>9.4f}" for c in columns))
    for name, metrics in result["published"].items():
        cells = [metrics.get(c) for c in columns]
        lines.append(
            f"{name + ' (S3-Rec paper)':<26}"
            + "".join(f"{v:>9.4f}" if v is not None else f"{'-':>9}" for v in cells)
        )
    if "index_recall_at_10" in result:
        lines.append(
            f"serving path: index (HNSW) top-10 vs the model's exact top-10, recall "
            f"{result['index_recall_at_10']:.4f} over {result['index_recall_users']} random test users"
        )
    return "\n".join(lines)
