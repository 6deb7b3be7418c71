"""Tests of the position-bias shallow tower: position dropping, eval-mode invariance, devices, wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtrank.config import parse_config
from mtrank.config.schema import DEFAULT_POSITION_DROP_RATE
from mtrank.data.encoders import MISSING_POSITION_ID, PositionEncoder
from mtrank.data.pipeline import prepare_data
from mtrank.data.tensors import Batch, iterate_batches
from mtrank.errors import ConfigError
from mtrank.models.builder import build_ranker
from mtrank.models.shallow_tower import ShallowTower
from mtrank.serving.scorer import Scorer
from mtrank.training.run import train_run
from mtrank.training.trainer import Trainer

# Positions 1..10 take ids 1..10; the overflow id is 11 and id 0 is missing.
NUM_POSITION_IDS = 12


def make_tower(**options: object) -> ShallowTower:
    settings: dict[str, object] = {
        "num_position_ids": NUM_POSITION_IDS,
        "device_vocab_sizes": [5],
        "embedding_dim": 4,
        "hidden": [16],
        "num_outputs": 1,
    }
    settings.update(options)
    return ShallowTower(**settings)  # type: ignore[arg-type]


def with_position(batch: Batch, position: torch.Tensor) -> Batch:
    return Batch(
        categorical=batch.categorical,
        numeric=batch.numeric,
        labels=batch.labels,
        position=position,
        device=batch.device,
    )


@pytest.fixture
def prepared(write_log, config_dict):
    """Return (config, prepared data) of a synthetic log with a shallow tower on `click` only."""
    raw = config_dict(write_log(num_rows=300), position_bias=True)
    raw["model"]["position_bias"]["tasks"] = ["click"]
    config = parse_config(raw)
    return config, prepare_data(config)


# ----------------------------------------------------------------------------------------------------
# position dropping


def test_drop_fraction_on_100k_rows() -> None:
    tower = make_tower(drop_rate=DEFAULT_POSITION_DROP_RATE).train()
    positions = torch.randint(1, 11, (100_000,), generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    dropped = tower.drop_positions(positions)

    fraction = (dropped == MISSING_POSITION_ID).double().mean().item()
    assert 0.095 <= fraction <= 0.105
    assert torch.equal(dropped[dropped != MISSING_POSITION_ID], positions[dropped != MISSING_POSITION_ID])


def test_no_drop_in_eval_mode() -> None:
    tower = make_tower(drop_rate=DEFAULT_POSITION_DROP_RATE).eval()
    positions = torch.randint(1, 11, (100_000,), generator=torch.Generator().manual_seed(0))

    kept = tower.drop_positions(positions)

    assert torch.equal(kept, positions)
    assert (kept == MISSING_POSITION_ID).sum().item() == 0


def test_configured_drop_rate_reaches_tower(prepared) -> None:
    config, data = prepared

    model = build_ranker(config, data.encoders)

    assert model.shallow_tower.drop_rate == DEFAULT_POSITION_DROP_RATE


def test_dropped_rows_get_missing_bias() -> None:
    torch.manual_seed(0)
    tower = make_tower(drop_rate=0.5).train()
    # Unit-variance embeddings make the biases of position 3 and of the missing id clearly differ.
    torch.nn.init.normal_(tower.position_embedding.weight, std=1.0)
    positions = torch.full((1000,), 3)
    devices = torch.full((1000, 1), 2)
    missing_bias = tower.bias_logits(torch.zeros(1, dtype=torch.int64), devices[:1])
    position_bias = tower.bias_logits(torch.full((1,), 3), devices[:1])

    torch.manual_seed(1)
    bias = tower(positions, devices)

    as_missing = torch.isclose(bias, missing_bias).squeeze(1)
    as_position = torch.isclose(bias, position_bias).squeeze(1)
    assert (as_missing | as_position).all()
    assert 400 < as_missing.sum().item() < 600


# ----------------------------------------------------------------------------------------------------
# eval mode and devices


def test_eval_scores_invariant_to_position(prepared) -> None:
    config, data = prepared
    model = build_ranker(config, data.encoders).eval()
    batch = data.test.batch
    generator = torch.Generator().manual_seed(0)

    scores = [
        model(with_position(batch, position)).logits
        for position in (
            torch.ones_like(batch.position),
            torch.full_like(batch.position, 5),
            torch.full_like(batch.position, 6),  # id 6 is the overflow id of max_position 5
            torch.zeros_like(batch.position),
            torch.randint(0, 7, batch.position.shape, generator=generator),
        )
    ]

    for other in scores[1:]:
        assert torch.equal(scores[0], other)


def test_eval_bias_uses_missing_position() -> None:
    tower = make_tower().eval()
    devices = torch.tensor([[2], [3]])

    bias = tower(torch.tensor([4, 9]), devices)

    assert torch.equal(bias, tower.bias_logits(torch.zeros(2, dtype=torch.int64), devices))


def test_device_changes_eval_score(prepared) -> None:
    config, data = prepared
    model = build_ranker(config, data.encoders).eval()
    torch.nn.init.normal_(
        model.shallow_tower.device_embeddings[0].weight, std=1.0, generator=torch.Generator().manual_seed(0)
    )
    batch = data.test.batch
    phone, tablet = (
        data.encoders.device["device"].transform(pa.array([name])).values[0] for name in ("phone", "tablet")
    )
    on_phone = Batch(
        batch.categorical,
        batch.numeric,
        batch.labels,
        batch.position,
        torch.full_like(batch.device, int(phone)),
    )
    on_tablet = Batch(
        batch.categorical,
        batch.numeric,
        batch.labels,
        batch.position,
        torch.full_like(batch.device, int(tablet)),
    )

    phone_logits = model(on_phone).logits
    tablet_logits = model(on_tablet).logits

    assert (phone_logits[:, 0] != tablet_logits[:, 0]).all()
    assert torch.equal(phone_logits[:, 1], tablet_logits[:, 1])


def test_zeroed_tower_gives_main_output(prepared) -> None:
    config, data = prepared
    model = build_ranker(config, data.encoders).train()
    with torch.no_grad():
        for parameter in model.shallow_tower.parameters():
            parameter.zero_()
    batch = data.test.batch
    main_only = Batch(categorical=batch.categorical, numeric=batch.numeric)

    torch.manual_seed(0)
    with_tower = model(batch)
    torch.manual_seed(0)
    without_tower = model(main_only)

    assert without_tower.bias_logits is None
    assert torch.equal(with_tower.bias_logits, torch.zeros_like(with_tower.bias_logits))
    assert torch.equal(with_tower.logits, without_tower.logits)


def test_zero_device_features() -> None:
    torch.manual_seed(0)
    tower = make_tower(device_vocab_sizes=[]).train()
    tower.drop_rate = 0.0
    no_devices = torch.zeros((3, 0), dtype=torch.int64)

    bias = tower(torch.tensor([1, 2, 3]), no_devices)

    assert bias.shape == (3, 1)
    assert len({round(v, 8) for v in bias[:, 0].tolist()}) == 3


def test_device_less_run_trains(tmp_path: Path, write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=300), position_bias=True, epochs=2)
    raw["model"]["position_bias"]["device"] = []
    result = train_run(parse_config(raw), tmp_path / "run")

    batch = result.data.test.batch
    logits = result.model.eval()(batch).logits

    assert batch.device.shape == (len(batch), 0)
    assert len(result.model.shallow_tower.device_embeddings) == 0
    assert torch.isfinite(logits).all()


def test_untrained_bias_nearly_flat() -> None:
    # With torch's default N(0, 1) embeddings the spread across positions was about one logit, and
    # it outlived a one-epoch run. The small init keeps the untrained tower nearly constant.
    torch.manual_seed(0)
    tower = make_tower().eval()
    positions = torch.arange(NUM_POSITION_IDS)

    bias = tower.bias_logits(positions, torch.full((NUM_POSITION_IDS, 1), 2))

    assert (bias.max() - bias.min()).item() < 0.05


# ----------------------------------------------------------------------------------------------------
# position ids


def test_overflow_positions_share_one_id() -> None:
    encoder = PositionEncoder(first_position=1, max_position=10)

    ids = encoder.transform(pa.array([10, 11, 12, 500])).values

    assert ids.tolist() == [10, 11, 11, 11]


def test_overflow_positions_share_one_bias() -> None:
    encoder = PositionEncoder(first_position=1, max_position=10)
    tower = make_tower().train()
    ids = torch.from_numpy(encoder.transform(pa.array([11, 12, 500])).values)

    bias = tower.bias_logits(ids, torch.full((3, 1), 2))

    assert torch.equal(bias[0], bias[1])
    assert torch.equal(bias[0], bias[2])


def test_zero_based_positions() -> None:
    encoder = PositionEncoder(first_position=0, max_position=7)

    ids = encoder.transform(pa.array([0, 1, 7, 8, None])).values

    assert ids.tolist() == [1, 2, 8, 9, MISSING_POSITION_ID]


# ----------------------------------------------------------------------------------------------------
# training and wiring


def test_tower_parameters_optimised(prepared) -> None:
    config, data = prepared
    model = build_ranker(config, data.encoders)
    trainer = Trainer(model, config)
    before = {name: p.detach().clone() for name, p in model.shallow_tower.named_parameters()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}

    trainer.train_epoch(data.train, 1)

    for name, parameter in model.shallow_tower.named_parameters():
        assert id(parameter) in optimised, name
        assert not torch.equal(parameter.detach(), before[name]), name


def test_bias_only_on_configured_tasks_in_training(prepared) -> None:
    config, data = prepared
    model = build_ranker(config, data.encoders).train()
    model.shallow_tower.drop_rate = 0.0
    batch = data.test.batch
    main_only = Batch(categorical=batch.categorical, numeric=batch.numeric)

    biased = model(batch)
    plain = model(main_only)

    assert model.bias_tasks == ["click"]
    assert biased.bias_logits.shape == (len(batch), 1)
    assert torch.equal(biased.logits[:, 1], plain.logits[:, 1])
    assert torch.equal(biased.logits[:, 0], plain.logits[:, 0] + biased.bias_logits[:, 0])


def test_default_bias_tasks_are_binary(write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=200), position_bias=True, tasks=("click", "watch_time", "noise"))
    config = parse_config(raw)

    model = build_ranker(config, prepare_data(config).encoders)

    assert model.bias_tasks == ["click", "noise"]
    assert model.bias_index.tolist() == [0, 2]


def test_scorer_reads_no_position_column(tmp_path: Path, write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=300), position_bias=True, epochs=2)
    train_run(parse_config(raw), tmp_path / "run")
    scorer = Scorer.from_run(tmp_path / "run")
    with_positions = write_log("serve_with.csv", num_rows=50, seed=5)
    without_positions = write_log("serve_without.csv", num_rows=50, seed=5, drop=["position"])

    rows, predictions = scorer.score_path(str(without_positions))
    _rows, reference = scorer.score_path(str(with_positions))

    assert rows.tolist() == list(range(50))
    assert predictions.shape == (50, 2)
    assert np.isfinite(predictions).all()
    assert np.array_equal(predictions, reference)


# ----------------------------------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop_rate": 1.5}, r"`drop_rate` must be in \[0, 1\], got 1.5"),
        ({"num_position_ids": 1}, r"`num_position_ids` must be at least 2"),
        ({"num_outputs": 0}, r"`num_outputs` must be positive, got 0"),
        ({"device_vocab_sizes": [3, 0]}, r"`device_vocab_sizes\[1\]` must be positive, got 0"),
    ],
)
def test_invalid_settings_rejected(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_tower(**options)


def test_first_batch_shapes(prepared) -> None:
    config, data = prepared
    model = build_ranker(config, data.encoders).train()

    output = model(next(iterate_batches(data.train, 16)))

    assert output.logits.shape == (16, 2)
    assert output.bias_logits.shape == (16, 1)
