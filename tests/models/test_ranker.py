"""Tests of the composed ranker built from a config: shapes, independence of builds, position bias."""

from __future__ import annotations

import pytest
import torch

from mtrank.config import parse_config
from mtrank.data.pipeline import prepare_data
from mtrank.data.tensors import Batch, iterate_batches
from mtrank.models.builder import build_ranker

BACKBONES = ["shared_bottom", "mmoe", "ple"]


@pytest.fixture
def prepared_log(write_log, config_dict):
    """Return a builder of (config, prepared data) over one synthetic log."""
    path = write_log(num_rows=200)

    def prepare(**options):
        config = parse_config(config_dict(path, **options))
        return config, prepare_data(config)

    return prepare


def storage_pointers(module: torch.nn.Module) -> set[int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


@pytest.mark.parametrize("kind", BACKBONES)
def test_two_builds_share_no_parameters(prepared_log, kind: str) -> None:
    config, prepared = prepared_log(backbone=kind, position_bias=True)

    first = build_ranker(config, prepared.encoders)
    second = build_ranker(config, prepared.encoders)

    assert storage_pointers(first).isdisjoint(storage_pointers(second))
    assert len(list(first.parameters())) == len(list(second.parameters()))


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_per_task_for_one_row(prepared_log, kind: str, mode: str) -> None:
    config, prepared = prepared_log(backbone=kind, position_bias=True)
    model = build_ranker(config, prepared.encoders).train(mode == "train")
    one_row = next(iterate_batches(prepared.test, 1))

    output = model(one_row)

    assert output.logits.shape == (1, 2)
    assert output.bias_logits.shape == (1, 2)
    assert torch.isfinite(output.logits).all()


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_last_batch_of_one_row(prepared_log, kind: str, mode: str) -> None:
    config, prepared = prepared_log(backbone=kind)
    model = build_ranker(config, prepared.encoders).train(mode == "train")
    batch_size = len(prepared.train) - 1

    sizes = [model(batch).logits.shape for batch in iterate_batches(prepared.train, batch_size)]

    assert sizes == [(batch_size, 2), (1, 2)]


def test_gates_reported_per_row_and_task(prepared_log) -> None:
    config, prepared = prepared_log(backbone="mmoe")
    model = build_ranker(config, prepared.encoders)

    output = model(prepared.test.batch)

    assert output.gates.shape == (len(prepared.test), 2, 3)  # (B, T, E)
    assert torch.allclose(output.gates.sum(dim=-1), torch.ones(len(prepared.test), 2), atol=1e-6)


def test_regression_task_gets_its_own_tower(prepared_log) -> None:
    config, prepared = prepared_log(tasks=("click", "watch_time"))
    model = build_ranker(config, prepared.encoders)

    output = model(prepared.test.batch)

    assert list(model.towers) == ["click", "watch_time"]
    assert output.logits.shape == (len(prepared.test), 2)


def with_position(batch: Batch, value: int) -> Batch:
    return Batch(
        categorical=batch.categorical,
        numeric=batch.numeric,
        labels=batch.labels,
        position=torch.full_like(batch.position, value),
        device=batch.device,
    )


def test_eval_scores_ignore_position(prepared_log) -> None:
    config, prepared = prepared_log(position_bias=True)
    model = build_ranker(config, prepared.encoders).eval()
    batch = prepared.test.batch

    first = model(with_position(batch, 1)).logits
    last = model(with_position(batch, 5)).logits

    assert torch.equal(first, last)


def test_training_scores_use_position(prepared_log) -> None:
    config, prepared = prepared_log(position_bias=True)
    model = build_ranker(config, prepared.encoders).train()
    model.shallow_tower.drop_rate = 0.0
    batch = prepared.test.batch

    first = model(with_position(batch, 1)).logits
    last = model(with_position(batch, 5)).logits

    assert not torch.allclose(first, last)


def test_bias_added_only_to_chosen_tasks(write_log, config_dict) -> None:
    raw = config_dict(write_log(num_rows=200), position_bias=True)
    raw["model"]["position_bias"]["tasks"] = ["noise"]
    config = parse_config(raw)
    prepared = prepare_data(config)
    model = build_ranker(config, prepared.encoders).eval()
    batch = prepared.test.batch
    without_tower = Batch(categorical=batch.categorical, numeric=batch.numeric)

    biased = model(batch)
    plain = model(without_tower)

    assert biased.bias_logits.shape == (len(prepared.test), 1)
    assert torch.equal(biased.logits[:, 0], plain.logits[:, 0])
    assert torch.allclose(biased.logits[:, 1], plain.logits[:, 1] + biased.bias_logits[:, 0])


@pytest.mark.parametrize("kind", BACKBONES)
def test_last_shared_parameters_found_by_balancer(prepared_log, kind: str) -> None:
    from mtrank.balancing import default_shared_parameters

    config, prepared = prepared_log(backbone=kind)
    model = build_ranker(config, prepared.encoders)

    named = default_shared_parameters(model)

    parameters = dict(model.named_parameters())
    assert named
    assert all(parameters[name] is parameter for name, parameter in named)
    assert all(name.startswith("backbone.") for name, _ in named)
