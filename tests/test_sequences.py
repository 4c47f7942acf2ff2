"""GRU user encoder, sequence metrics, leave-one-out split, CF baselines and the sequence CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.sequence import GRUSequenceModel, SequenceEncoder, SequenceModelConfig
from serving.cli import main
from tests.conftest import DATASETS
from training.cf import ItemCF, Popularity, UserCF
from training.seq_metrics import (
    RankingAccumulator,
    mask_excluded,
    metrics_from_ranks,
    target_ranks,
    top_items,
)
from training.sequences import (
    PURCHASE,
    SequenceData,
    TrainConfig,
    attribute_bags,
    effective_batch_size,
    evaluate_model,
    item_vocabulary,
    leave_one_out,
    load_sequences,
    model_scores,
    train_model,
    training_windows,
)

AMAZON = DATASETS / "amazon-sequences"
N_ITEMS = 20
TINY_MODEL = SequenceModelConfig(dim=32, hidden=32, input_dropout=0.0, hidden_dropout=0.0, max_len=10)
TINY_TRAIN = TrainConfig(lr=0.01, batch_size=32, max_epochs=40, patience=40, max_minutes=1.0, threads=1)


@pytest.fixture
def amazon_sequences() -> Path:
    if not (AMAZON / "Beauty.txt").is_file():
        pytest.skip(f"Amazon sequences not found at {AMAZON} (set SHOPGUIDE_DATASETS to its parent folder)")
    return AMAZON


def successor_data(users: int = 200, seed: int = 0) -> SequenceData:
    """Item i is always followed by item i + 1 (wrapping); half the users start at item "1" so the
    first-purchase popularity (the cold-start ranking) has a clear winner."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(users):
        start = 0 if rng.random() < 0.5 else int(rng.integers(N_ITEMS))
        length = int(rng.integers(4, 9))
        sequences.append([str((start + j) % N_ITEMS + 1) for j in range(length)])
    return SequenceData([f"u{i}" for i in range(users)], sequences, "successor.txt")


@pytest.fixture(scope="module")
def trained() -> tuple[SequenceEncoder, SequenceData]:
    data = successor_data()
    item_ids = item_vocabulary(data)
    split = leave_one_out(data, item_ids)
    model, summary = train_model(split, len(item_ids), TINY_MODEL, TINY_TRAIN, progress=False)
    assert summary["epochs"] >= 1
    return SequenceEncoder(model, item_ids), data


# ---- metrics -------------------------------------------------------------------------------------------
def test_rank_and_metrics_hand_computed():
    scores = np.array([[0.9, 0.5, 0.7, 0.1]], dtype=np.float32)
    ranks = target_ranks(scores, np.array([2]))
    assert ranks.tolist() == [1]  # only item 0 scores higher
    metrics = metrics_from_ranks(ranks, ks=(1, 5))
    assert metrics["HR@1"] == 0.0 and metrics["NDCG@1"] == 0.0
    assert metrics["HR@5"] == 1.0 and metrics["NDCG@5"] == pytest.approx(1 / math.log2(3))


def test_ties_are_pessimistic():
    scores = np.array([[0.5, 0.5, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    ranks = target_ranks(scores, np.array([1, 0]))
    assert ranks.tolist() == [2, 3]  # every equal-scored other item counts as ranked above
    assert metrics_from_ranks(ranks, ks=(3,))["HR@3"] == 0.5


def test_excluded_items_removed_but_target_kept():
    scores = np.array([[0.9, 0.5, 0.7, 0.8]], dtype=np.float32)
    # History holds items 0, 3 and the target 2 itself (a repeat purchase): 0 and 3 leave the ranking.
    mask_excluded(scores, np.array([2]), [np.array([0, 3, 2])])
    assert np.isneginf(scores[0, [0, 3]]).all() and scores[0, 2] == pytest.approx(0.7)
    assert target_ranks(scores, np.array([2])).tolist() == [0]


def test_metrics_average_over_users_and_accumulator():
    ranks = np.array([0, 1, 9, 10, 100])
    metrics = metrics_from_ranks(ranks, ks=(10,))
    assert metrics["HR@10"] == pytest.approx(3 / 5)
    expected = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert metrics["NDCG@10"] == pytest.approx(expected)
    accumulator = RankingAccumulator(keep_top=2)
    accumulator.add(np.array([[0.4, 0.9, 0.3], [0.2, 0.2, 0.9]], dtype=np.float32), np.array([0, 2]),
                    [np.array([1]), np.array([], dtype=np.int64)])  # fmt: skip
    assert accumulator.metrics(ks=(1,))["HR@1"] == 1.0
    assert accumulator.top().tolist() == [[0, 2], [2, 0]]  # ties broken by lower column in the listing


def test_top_items_order():
    assert top_items(np.array([[0.1, 0.4, 0.3, 0.9]]), 3).tolist() == [[3, 1, 2]]


# ---- data and split ------------------------------------------------------------------------------------
def test_load_and_leave_one_out(tmp_path: Path):
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12 13\n2 12 10 14\n3 11 12\n")
    data = load_sequences(path)
    item_ids = item_vocabulary(data)
    assert item_ids == ["10", "11", "12", "13", "14"]
    split = leave_one_out(data, item_ids)
    assert split.user_ids == ["1", "2"]  # user 3 has < 3 items: training only
    assert [t.tolist() for t in split.train] == [[0, 1], [2]]
    assert split.valid_target.tolist() == [2, 0] and split.test_target.tolist() == [3, 4]
    assert [h.tolist() for h in split.inputs("test")] == [[0, 1, 2], [2, 0]]
    assert [e.tolist() for e in split.extra_train] == [[1, 2]]


def test_training_windows_cover_every_target_once():
    windows = training_windows([np.arange(7)], max_len=3)  # 7 items, history capped at 3
    assert [(w.tolist(), first) for w, _, first in windows] == [([1, 2, 3, 4], True), ([4, 5, 6, 7], False)]
    # Targets: item 1 (cold start), 2, 3, 4 from the first window; 5, 6, 7 from the second.
    assert sum(len(w) - (0 if first else 1) for w, _, first in windows) == 7
    # Without event types every step is a purchase; given types travel with their items.
    assert all((e == PURCHASE).all() for _, e, _ in windows)
    typed = training_windows([np.arange(7)], max_len=3, events=[np.arange(7) % 4 + 1])
    assert [e.tolist() for _, e, _ in typed] == [[1, 2, 3, 4], [4, 1, 2, 3]]


def test_training_handles_one_item_training_parts(tmp_path: Path):
    data = SequenceData(["a", "b", "c"], [["1", "2", "3"], ["2", "3", "1"], ["3", "1", "2", "3"]])
    item_ids = item_vocabulary(data)
    split = leave_one_out(data, item_ids)  # training parts of 1, 1 and 2 items
    model, summary = train_model(
        split, 3, TINY_MODEL, TrainConfig(max_epochs=2, batch_size=2, threads=1), progress=False
    )
    assert summary["epochs"] == 2 and summary["training_targets"] == 4  # 3 cold starts + 1 next item


def test_load_sequences_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="sequence file not found"):
        load_sequences(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("1\n")
    with pytest.raises(ValueError, match="has no items"):
        load_sequences(tmp_path / "bad.txt")


# ---- the GRU -------------------------------------------------------------------------------------------
def test_gru_learns_successor_pattern(trained):
    encoder, data = trained
    split = leave_one_out(data, encoder.item_ids)
    metrics = evaluate_model(encoder.model, split, "test").metrics(ks=(1,))
    assert metrics["HR@1"] >= 0.9, metrics


def test_cosine_vectors_rank_like_exact_scores(trained):
    encoder, data = trained
    histories = data.sequences[:20]
    exact = encoder.scores(histories)  # (20, n_items)
    users, items = encoder.encode_users(histories), encoder.item_vectors()
    assert users.shape[1] == items.shape[1] == encoder.info.dim == TINY_MODEL.dim + 2
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    cosine = users @ items.T
    assert (np.argmax(cosine, axis=1) == np.argmax(exact, axis=1)).all()
    dot = encoder.encode_users(histories, space="dot") @ encoder.item_vectors(space="dot").T
    np.testing.assert_allclose(dot, exact, rtol=1e-4, atol=1e-4)


def test_packed_user_vectors_match_training_states(trained):
    encoder, data = trained
    histories = [s[: n + 1] for n, s in enumerate(data.sequences[:6])]  # lengths 1..6
    items = torch.zeros(6, 6, dtype=torch.long)
    for row, seq in enumerate(histories):
        items[row, : len(seq)] = torch.tensor([encoder.item_index[i] for i in seq])
    events = torch.where(items > 0, 4, 0)
    lengths = torch.arange(1, 7)
    with torch.inference_mode():
        states = encoder.model.states(items, events, encoder.model.item_table())  # (6, 7, dim)
        packed = encoder.model.user_vectors(items, events, lengths)  # (6, dim)
    torch.testing.assert_close(packed, states[torch.arange(6), lengths], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip(trained, tmp_path: Path):
    encoder, data = trained
    encoder.save(tmp_path / "model")
    loaded = SequenceEncoder.load(tmp_path / "model")
    assert loaded.item_ids == encoder.item_ids and loaded.config == encoder.config
    np.testing.assert_allclose(
        loaded.scores(data.sequences[:5]), encoder.scores(data.sequences[:5]), atol=1e-6
    )


def test_checkpoint_with_attributes_round_trip(tmp_path: Path):
    data = successor_data(users=30)
    item_ids = item_vocabulary(data)
    attributes = {item: [int(item) % 3, 100 + int(item) % 2] for item in item_ids[:-2]}  # 2 items have none
    bag = attribute_bags(item_ids, attributes)
    assert bag[0] == 5  # attribute ids 0, 1, 2, 100, 101 remapped to 1..5
    split = leave_one_out(data, item_ids)
    config = TrainConfig(max_epochs=1, threads=1)
    model, _ = train_model(split, len(item_ids), TINY_MODEL, config, bag, progress=False)
    SequenceEncoder(model, item_ids).save(tmp_path)
    loaded = SequenceEncoder.load(tmp_path)
    np.testing.assert_allclose(
        loaded.scores([[]]), model_scores(model, [np.zeros(0, dtype=np.int64)]), atol=1e-6
    )
    np.testing.assert_allclose(
        loaded.scores(data.sequences[:3]),
        SequenceEncoder(model, item_ids).scores(data.sequences[:3]),
        atol=1e-6,
    )


def test_unknown_ids_skipped_and_counted(trained):
    encoder, _ = trained
    vectors, stats = encoder.encode_users_with_stats([["1", "nope", "2"], ["gone", ("3", "view")], []])
    assert stats.unknown_items == 2 and stats.unknown_per_user == [1, 1, 0]
    np.testing.assert_allclose(vectors[0], encoder.encode_users([["1", "2"]])[0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown event type"):
        encoder.encode_users([[("1", "wishlist")]])


def test_empty_history_gives_cold_start_vector(trained):
    encoder, _ = trained
    cold = encoder.cold_start_vector()
    np.testing.assert_allclose(encoder.encode_users([[]])[0], cold)
    np.testing.assert_allclose(encoder.encode_users([["never-seen"]])[0], cold)  # all unknown = empty
    # Half the users start at item "1": the cold-start vector must rank it first.
    assert encoder.item_ids[int(np.argmax(encoder.item_vectors() @ cold))] == "1"


# ---- baselines -----------------------------------------------------------------------------------------
HAND_HISTORIES = [np.array([0, 1]), np.array([0, 1, 2]), np.array([2, 3])]


def test_popularity_counts_users():
    assert Popularity(HAND_HISTORIES, 4).scores(np.array([0])).tolist() == [[2, 2, 2, 1]]


def test_item_cf_hand_computed():
    # Item user-sets: 0 {u0,u1}, 1 {u0,u1}, 2 {u1,u2}, 3 {u2}. cos(0,1)=1, cos(0,2)=cos(1,2)=1/2,
    # cos(2,3)=1/sqrt(2), cos(0,3)=cos(1,3)=0. User 0 holds items 0 and 1.
    scores = ItemCF(HAND_HISTORIES, 4).scores(np.array([0, 2]))
    np.testing.assert_allclose(scores[0], [1.0, 1.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(scores[1], [0.5, 0.5, 1 / math.sqrt(2), 1 / math.sqrt(2)], atol=1e-6)


def test_user_cf_hand_computed():
    # cos(u0,u1) = 2/sqrt(6), cos(u0,u2) = 0, cos(u1,u2) = 1/sqrt(6); one neighbour each.
    scores = UserCF(HAND_HISTORIES, 4, neighbours=1).scores(np.array([0, 2]))
    np.testing.assert_allclose(scores[0], np.array([1, 1, 1, 0]) * 2 / math.sqrt(6), atol=1e-6)
    np.testing.assert_allclose(scores[1], np.array([1, 1, 1, 0]) / math.sqrt(6), atol=1e-6)


# ---- CLI -----------------------------------------------------------------------------------------------
def test_cli_train_and_eval(tmp_path: Path, capsys):
    data = successor_data(users=60)
    dataset = tmp_path / "successor.txt"
    lines = [" ".join([user, *seq]) + "\n" for user, seq in zip(data.user_ids, data.sequences, strict=True)]
    dataset.write_text("".join(lines))
    config = tmp_path / "config.yaml"
    config.write_text("model: {dim: 16, hidden: 16, max_len: 10}\ntrain: {max_epochs: 2, threads: 1}\n")
    assert main(["train", "sequences", "--dataset", str(dataset), "--out", str(tmp_path / "m"),
                 "--config", str(config), "--no-progress"]) == 0  # fmt: skip
    out_json, tsv = tmp_path / "eval.json", tmp_path / "top.tsv"
    assert main(["eval", "sequences", "--dataset", str(dataset), "--model", str(tmp_path / "m"),
                 "--json", str(out_json), "--topk-out", str(tsv)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "GRU (ours)" in printed and "item-CF" in printed and "user-CF" in printed
    result = json.loads(out_json.read_text())
    assert set(result["rows"]) == {"GRU (ours)", "popularity", "item-CF", "user-CF"}
    lines = tsv.read_text().splitlines()
    assert len(lines) == 60 and all(len(line.split("\t")) == 1 + N_ITEMS for line in lines)
    assert main(["train", "sequences", "--dataset", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2


# ---- the real data -------------------------------------------------------------------------------------
@pytest.mark.dataset
def test_beauty_split_matches_readme(amazon_sequences: Path):
    data = load_sequences(amazon_sequences / "Beauty.txt")
    item_ids = item_vocabulary(data)
    split = leave_one_out(data, item_ids)
    assert len(split.user_ids) == 22_363 and len(item_ids) == 12_101
    assert sum(len(s) for s in data.sequences) == 198_502
    assert sum(len(t) for t in split.train) == 198_502 - 2 * 22_363
    assert not split.extra_train


def test_train_and_eval_on_shopguide_events(tmp_path: Path):
    """An events file (.jsonl) trains with its event types: a shopper who clicks p{i} then views p{i+1}."""
    from training.events import Event, write_events
    from training.sequences import load_dataset, run_eval_sequences, run_train_sequences

    events, n = [], 0
    for user in range(60):
        for step in range(6):
            item = (user + step) % 12
            for kind in ("view", "click") if step % 2 == 0 else ("view",):
                n += 1
                events.append(Event(f"e{n}", f"u{user}", f"p{item}", kind, ts=float(n)))
    path = tmp_path / "events.jsonl"
    write_events(events, path)
    data, types = load_dataset(path)
    assert len(data.user_ids) == 60 and types[0][:2] == ["click", "view"]  # view->click collapsed
    config = SequenceModelConfig(dim=16, hidden=32, input_dropout=0.0, hidden_dropout=0.0)
    trained = run_train_sequences(
        path,
        tmp_path / "model",
        model_config=config,
        train_config=TrainConfig(lr=1e-2, max_epochs=40, patience=40),
        progress=False,
    )
    assert trained["items"] == 12
    result = run_eval_sequences(path, tmp_path / "model", baselines=True)
    assert result["rows"]["GRU (ours)"]["HR@5"] > 0.9  # the next product is learnable
    assert set(result["rows"]) == {"GRU (ours)", "popularity", "item-CF", "user-CF"}
    assert result["published"] == {}
    assert result["index_recall_at_10"] >= 0.98 and result["index_recall_users"] == 60


def test_content_side_information_round_trips_and_shapes_item_vectors(tmp_path: Path):
    """Fixed content vectors go through a learned map into the item table and travel in the checkpoint."""
    content = torch.zeros(6, 4)
    content[1:] = torch.randn(5, 4)
    model = GRUSequenceModel(SequenceModelConfig(dim=8, hidden=8), n_items=5, content=content)
    with torch.no_grad():
        model.item_embedding.weight.zero_()  # only content is left to tell items apart
    table = model.item_table()
    torch.testing.assert_close(table[1:], model.content_projection(content[1:]))
    encoder = SequenceEncoder(model, ["a", "b", "c", "d", "e"])
    encoder.save(tmp_path)
    loaded = SequenceEncoder.load(tmp_path)
    np.testing.assert_allclose(loaded.scores([["a", "b"]]), encoder.scores([["a", "b"]]), atol=1e-6)
    with pytest.raises(ValueError, match="content has 3 rows"):
        GRUSequenceModel(SequenceModelConfig(dim=8, hidden=8), n_items=5, content=torch.zeros(3, 4))


def test_small_logs_get_smaller_batches_so_an_epoch_has_enough_steps():
    """batch_size is a ceiling: an epoch has at least min_steps_per_epoch steps when the data allows."""
    config = TrainConfig(batch_size=128, min_steps_per_epoch=20)
    assert effective_batch_size(22_000, config) == 128  # Amazon-sized: unchanged
    assert effective_batch_size(300, config) == 15  # the closed loop's 300 shoppers: 20 steps
    assert effective_batch_size(7, config) == 1  # fewer windows than steps: one window a step
    assert effective_batch_size(300, TrainConfig(batch_size=128, min_steps_per_epoch=1)) == 128
