"""Tests of DeepHashEmbedding: encodings, decoder, batches, persistence, vocabulary independence."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtrank.embeddings import EMBEDDING_KINDS, build_embedding
from mtrank.embeddings.dhe import (
    _ACTIVATIONS,
    DHE_HIDDEN,
    DHE_NUM_BUCKETS,
    DHE_NUM_HASHES,
    DeepHashEmbedding,
    DHEActivation,
    gaussian_encoding,
    uniform_encoding,
)
from mtrank.errors import ConfigError, DataError
from mtrank.models.activations import build_activation

INT64_EXTREMES = [-(2**63), -1, 0, 2**63 - 1]


def small_dhe(seed: int = 0, **overrides: object) -> DeepHashEmbedding:
    """A DHE small enough for fast tests: 64 hash functions and one hidden layer of 32."""
    options: dict[str, object] = {"dim": 8, "num_hashes": 64, "hidden": [32], "seed": seed}
    options.update(overrides)
    return DeepHashEmbedding(**options)  # type: ignore[arg-type]


def train_steps(module: DeepHashEmbedding, ids: torch.Tensor, steps: int = 5) -> None:
    """Fit the embeddings of ``ids`` to a random target for a few SGD steps."""
    target = torch.randn(ids.shape[0], module.embedding_dim, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(module(ids), target)
        loss.backward()
        optimizer.step()


def test_dhe_kind_is_registered() -> None:
    assert EMBEDDING_KINDS["dhe"] is DeepHashEmbedding


def test_dhe_needs_no_vocabulary() -> None:
    assert DeepHashEmbedding.needs_vocabulary is False


def test_defaults_follow_main_setting() -> None:
    embedding = build_embedding("dhe", vocab_size=None, dim=16, options={})
    assert (embedding.num_hashes, embedding.num_buckets) == (DHE_NUM_HASHES, DHE_NUM_BUCKETS) == (1024, 10**6)


def test_default_decoder_layout() -> None:
    embedding = DeepHashEmbedding(dim=16)
    layer_types = [type(layer) for layer in embedding.decoder]
    expected = [nn.Linear, nn.BatchNorm1d, nn.Mish] * len(DHE_HIDDEN) + [nn.Linear]
    assert layer_types == expected


def test_decoder_widths() -> None:
    embedding = small_dhe(hidden=[32, 16])
    widths = [
        (layer.in_features, layer.out_features) for layer in embedding.decoder if isinstance(layer, nn.Linear)
    ]
    assert widths == [(64, 32), (32, 16), (16, 8)]


def test_decoder_without_batch_norm() -> None:
    embedding = small_dhe(batch_norm=False)
    assert not any(isinstance(layer, nn.BatchNorm1d) for layer in embedding.decoder)


def test_decoder_with_other_activation() -> None:
    embedding = small_dhe(activation="relu")
    assert isinstance(embedding.decoder[2], nn.ReLU)


def test_activation_names_match_literal() -> None:
    assert set(get_args(DHEActivation)) == set(_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_activation_names_known_to_models(name: str) -> None:
    # The decoder keeps a local copy of the names; each must mean the same module in mtrank.models.
    assert type(build_activation(name)) is type(_ACTIVATIONS[name]())


def test_empty_hidden_is_one_linear_layer() -> None:
    embedding = small_dhe(hidden=[])
    assert [type(layer) for layer in embedding.decoder] == [nn.Linear]


def test_output_shape() -> None:
    embedding = small_dhe()
    assert embedding(torch.tensor(INT64_EXTREMES)).shape == (4, 8)


def test_two_dimensional_ids() -> None:
    embedding = small_dhe().eval()
    ids = torch.arange(6).reshape(2, 3)
    assert torch.equal(embedding(ids), embedding(ids.reshape(-1)).reshape(2, 3, 8))


def test_empty_batch() -> None:
    assert small_dhe()(torch.zeros(0, dtype=torch.int64)).shape == (0, 8)


def test_batch_of_one_in_eval_mode() -> None:
    embedding = small_dhe()
    train_steps(embedding, torch.arange(32))
    embedding.eval()
    single = embedding(torch.tensor([2**63 - 1]))
    in_batch = embedding(torch.tensor([5, 2**63 - 1, -3]))[1:2]
    assert torch.allclose(single, in_batch, atol=1e-6)


def test_batch_of_one_in_training_mode_is_rejected() -> None:
    embedding = small_dhe().train()
    with pytest.raises(DataError, match="batch of 1 id in training mode"):
        embedding(torch.tensor([3]))


def test_batch_of_one_trains_without_batch_norm() -> None:
    embedding = small_dhe(batch_norm=False).train()
    assert embedding(torch.tensor([3])).shape == (1, 8)


def test_batch_of_one_trains_without_hidden_layers() -> None:
    embedding = small_dhe(hidden=[]).train()
    assert embedding(torch.tensor([3])).shape == (1, 8)


def test_rejects_float_ids() -> None:
    with pytest.raises(DataError, match="integer ids"):
        small_dhe()(torch.tensor([0.5]))


def test_uniform_encoding_endpoints() -> None:
    encoded = uniform_encoding(torch.tensor([0, 999_999]), 1_000_000)
    assert encoded.tolist() == [-1.0, 1.0]


def test_uniform_encoding_is_linear() -> None:
    encoded = uniform_encoding(torch.tensor([499_999]), 1_000_000)
    # Bucket h maps to 2 h / (m - 1) - 1.
    assert encoded.item() == pytest.approx(2 * 499_999 / 999_999 - 1, abs=1e-15)


def test_uniform_encoding_of_module_lies_in_range() -> None:
    encoded = small_dhe().encode(torch.tensor(INT64_EXTREMES))
    assert float(encoded.abs().max()) <= 1.0


def test_gaussian_encoding_box_muller_values() -> None:
    buckets = torch.tensor([[9, 250, 0, 999]])
    encoded = gaussian_encoding(buckets, 1000)
    # Box-Muller by hand: u1 = (h0 + 1) / m, u2 = h1 / m; cos terms first, then sin terms.
    radius_1 = math.sqrt(-2 * math.log(10 / 1000))
    radius_2 = math.sqrt(-2 * math.log(1 / 1000))
    expected = [
        radius_1 * math.cos(2 * math.pi * 0.25),
        radius_2 * math.cos(2 * math.pi * 0.999),
        radius_1 * math.sin(2 * math.pi * 0.25),
        radius_2 * math.sin(2 * math.pi * 0.999),
    ]
    assert encoded[0].tolist() == pytest.approx(expected, abs=1e-12)


def test_gaussian_encoding_is_standard_normal() -> None:
    encoded = small_dhe(encoding="gaussian", num_hashes=128).encode(torch.arange(4000))
    # 512,000 values: the standard error of the mean is 0.0014 and of the variance about 0.002.
    assert abs(encoded.mean().item()) < 0.01
    assert abs(encoded.var().item() - 1.0) < 0.02


def test_encoding_is_finite_at_extremes() -> None:
    encoded = small_dhe(encoding="gaussian").encode(torch.tensor(INT64_EXTREMES))
    assert bool(torch.isfinite(encoded).all())


def test_encoding_is_not_learned() -> None:
    embedding = small_dhe()
    assert all(not name.startswith("hash_family") for name, _ in embedding.named_parameters())


def test_training_updates_decoder_but_not_hashes() -> None:
    embedding = small_dhe()
    before = {name: tensor.clone() for name, tensor in embedding.state_dict().items()}
    train_steps(embedding, torch.arange(64))
    after = embedding.state_dict()
    assert torch.equal(before["hash_family.a_high"], after["hash_family.a_high"])
    assert not torch.equal(before["decoder.0.weight"], after["decoder.0.weight"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoding": "gaussian", "num_hashes": 63}, "`num_hashes` must be even, got 63"),
        ({"encoding": "laplace"}, "unknown `encoding` 'laplace'; choose one of: uniform, gaussian"),
        ({"activation": "swishy"}, "unknown `activation` 'swishy'"),
        ({"num_buckets": 1}, r"`num_buckets` must lie in \[2, 2\*\*61 - 1\], got 1"),
        ({"hidden": [32, 0]}, r"`hidden` widths must be integers of at least 1, got \[32, 0\]"),
        ({"dim": 0}, "`dim` must be at least 1, got 0"),
        ({"num_hashes": 0}, "`num_hashes` must be at least 1, got 0"),
    ],
)
def test_rejects_invalid_arguments(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        small_dhe(**overrides)


def test_reports_all_invalid_arguments_together() -> None:
    with pytest.raises(ConfigError, match="3 invalid"):
        small_dhe(dim=0, encoding="laplace", activation="swishy")


def test_safetensors_round_trip_is_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = small_dhe(seed=1, encoding="gaussian")
    train_steps(saved, torch.arange(128))  # moves the weights and the batch-norm running statistics
    saved.eval()
    path = tmp_path / "dhe.safetensors"
    save_file(saved.state_dict(), str(path))

    torch.manual_seed(1)
    restored = small_dhe(seed=2, encoding="gaussian").eval()
    ids = torch.tensor(INT64_EXTREMES + list(range(100, 200)))
    assert not torch.equal(restored(ids), saved(ids))  # a different build really differs before loading
    restored.load_state_dict(load_file(str(path)))
    assert torch.equal(restored(ids), saved(ids))


def test_parameter_count_ignores_vocabulary() -> None:
    small = build_embedding("dhe", vocab_size=10**3, dim=16, options={})
    huge = build_embedding("dhe", vocab_size=10**9, dim=16, options={})
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in huge.parameters())


def test_no_vocabulary_sized_storage() -> None:
    embedding = build_embedding("dhe", vocab_size=10**9, dim=16, options={})
    stored = sum(t.numel() for t in embedding.parameters()) + sum(t.numel() for t in embedding.buffers())
    # Everything stored is the decoder plus 3 * 1024 hash coefficients: about 5.1 million values,
    # independent of the 10**9 vocabulary.
    assert stored < 6_000_000


def test_ids_up_to_a_billion() -> None:
    embedding = build_embedding("dhe", vocab_size=10**9, dim=16, options={}).eval()
    ids = torch.tensor([0, 10**9 - 1, 10**9, 10**18])
    assert embedding(ids).shape == (4, 16)


def test_unseen_ids_get_distinct_embeddings() -> None:
    torch.manual_seed(0)
    embedding = small_dhe()
    train_steps(embedding, torch.arange(256))
    embedding.eval()
    unseen = 10**9 + torch.arange(1000)
    with torch.no_grad():
        rows = embedding(unseen)
    assert torch.unique(rows, dim=0).shape[0] == 1000


_SUBPROCESS_SCRIPT = """
import json
import torch
from mtrank.embeddings.dhe import DeepHashEmbedding
torch.manual_seed(0)
embedding = DeepHashEmbedding(dim=4, num_hashes=32, hidden=[16], encoding="gaussian", seed=5).eval()
ids = torch.tensor(json.loads({ids!r}))
with torch.no_grad():
    print(json.dumps(embedding.encode(ids).tolist()))
"""


def _encode_in_subprocess(ids: list[int], hash_seed: str) -> list[list[float]]:
    environment = dict(os.environ, PYTHONHASHSEED=hash_seed)
    script = _SUBPROCESS_SCRIPT.format(ids=json.dumps(ids))
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(completed.stdout)


def test_same_encoding_across_processes_and_hash_seeds() -> None:
    ids = INT64_EXTREMES + [12345, 10**9]
    first = _encode_in_subprocess(ids, hash_seed="1")
    second = _encode_in_subprocess(ids, hash_seed="31337")
    assert first == second
