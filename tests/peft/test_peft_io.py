"""Saving and loading PEFT sets: file contents, strict loading and error messages."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtrank.errors import ArtifactError, ConfigError
from mtrank.models.mlp import MLP
from mtrank.peft import PeftModel, list_peft_sets, load_peft_set, peft_set_files, read_peft_set, save_peft_set
from mtrank.training.checkpoint import DIGEST_METADATA_KEY, tensor_digest


@pytest.fixture
def saved_lora(make_ranker, tmp_path):
    peft = PeftModel(make_ranker(seed=1))
    peft.inject("scenario", "lora", ["experts.*.layers.0", "embeddings.item"], {"rank": 2})
    files = save_peft_set(peft, "scenario", tmp_path, base_run="runs/base-7")
    return peft, files


def test_sidecar_describes_set(saved_lora) -> None:
    _, files = saved_lora
    raw = json.loads(files.config.read_text(encoding="utf-8"))
    assert raw["format"] == "mtrank-peft"
    assert raw["method"] == "lora"
    assert raw["targets"] == ["experts.*.layers.0", "embeddings.item"]
    assert raw["resolved_targets"] == ["embeddings.item", "experts.0.layers.0", "experts.1.layers.0"]
    assert raw["options"] == {"rank": 2, "alpha": None, "dropout": 0.0}
    assert raw["base_run"] == "runs/base-7"


def test_weights_hold_only_peft_tensors(saved_lora) -> None:
    peft, files = saved_lora
    with safe_open(str(files.weights), framework="pt") as handle:
        keys = sorted(handle.keys())
        metadata = handle.metadata()
    assert keys == sorted(peft.set_state_dict("scenario"))
    assert len(keys) == 6
    assert all(key.startswith("targets/") for key in keys)
    assert metadata["peft_set"] == "scenario"


def test_list_and_read_saved_sets(saved_lora, tmp_path) -> None:
    assert list_peft_sets(tmp_path) == ["scenario"]
    assert read_peft_set(tmp_path, "scenario").spec.method == "lora"


def test_base_run_mismatch_rejected(saved_lora, make_ranker, tmp_path) -> None:
    with pytest.raises(ArtifactError, match="was trained on base run 'runs/base-7', not 'runs/base-8'"):
        load_peft_set(make_ranker(seed=1), tmp_path, "scenario", expected_base_run="runs/base-8")


def test_corrupt_weights_rejected(saved_lora, make_ranker, tmp_path) -> None:
    _, files = saved_lora
    data = bytearray(files.weights.read_bytes())
    data[-1] ^= 0xFF
    files.weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="the files do not belong together or one is corrupt"):
        load_peft_set(make_ranker(seed=1), tmp_path, "scenario")


def test_missing_sidecar_rejected(make_ranker, tmp_path) -> None:
    with pytest.raises(ArtifactError, match="PEFT set description .*scenario.json not found"):
        load_peft_set(make_ranker(), tmp_path, "scenario")


def test_other_format_version_rejected(saved_lora, make_ranker, tmp_path) -> None:
    _, files = saved_lora
    raw = json.loads(files.config.read_text(encoding="utf-8"))
    raw["format_version"] = 99
    del raw["method"]
    files.config.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"`format_version` is 99(.|\n)*`method` is missing"):
        load_peft_set(make_ranker(), tmp_path, "scenario")


def test_other_architecture_rejected(saved_lora, make_ranker, tmp_path) -> None:
    model = make_ranker()
    model.experts = model.experts[:1]
    with pytest.raises(
        ArtifactError, match="build the base model with the architecture the set was trained on"
    ):
        load_peft_set(model, tmp_path, "scenario")


def _rewrite_weights(files, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weights and record the new file's SHA-256 in the sidecar."""
    save_file(tensors, str(files.weights))
    raw = json.loads(files.config.read_text(encoding="utf-8"))
    raw["weights_sha256"] = hashlib.sha256(files.weights.read_bytes()).hexdigest()
    files.config.write_text(json.dumps(raw), encoding="utf-8")


def test_unexpected_and_missing_tensors_rejected(saved_lora, make_ranker, tmp_path) -> None:
    peft, files = saved_lora
    tensors = {key: value.detach().clone() for key, value in peft.set_state_dict("scenario").items()}
    tensors.pop("targets/experts.0.layers.0/lora_A")
    tensors["targets/experts.0.layers.0/lora_C"] = torch.zeros(2)
    _rewrite_weights(files, tensors)
    model = PeftModel(make_ranker())
    with pytest.raises(ArtifactError, match=r"missing tensors: \[targets/experts.0.layers.0/lora_A\]"):
        load_peft_set(model, tmp_path, "scenario")
    assert model.set_names() == []
    assert type(model.base_model.experts[0].layers[0]).__name__ == "Linear"


def test_unexpected_tensor_listed(saved_lora, make_ranker, tmp_path) -> None:
    peft, files = saved_lora
    tensors = {key: value.detach().clone() for key, value in peft.set_state_dict("scenario").items()}
    tensors["targets/experts.0.layers.0/lora_C"] = torch.zeros(2)
    _rewrite_weights(files, tensors)
    with pytest.raises(ArtifactError, match=r"unexpected tensors: \[targets/experts.0.layers.0/lora_C\]"):
        load_peft_set(make_ranker(), tmp_path, "scenario")


def test_wrong_shape_rejected(saved_lora, make_ranker, tmp_path) -> None:
    peft, files = saved_lora
    tensors = {key: value.detach().clone() for key, value in peft.set_state_dict("scenario").items()}
    tensors["targets/experts.0.layers.0/lora_B"] = torch.zeros(16, 3)
    _rewrite_weights(files, tensors)
    with pytest.raises(
        ArtifactError, match=r"`targets/experts.0.layers.0/lora_B` has shape \(16, 3\) in the file"
    ):
        load_peft_set(make_ranker(), tmp_path, "scenario")


def test_missing_trainable_module_rejected(make_ranker, tmp_path) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("scenario", "lora", ["experts.*.layers.0"])
    peft.add_trainable_module("scenario", "towers.watch", MLP(16, [4], output_dim=1))
    save_peft_set(peft, "scenario", tmp_path, base_run="base")
    with pytest.raises(ArtifactError, match=r"trains modules \['towers.watch'\] that the base model lacks"):
        load_peft_set(make_ranker(), tmp_path, "scenario")


def test_loading_into_taken_name_rejected(saved_lora, tmp_path) -> None:
    peft, _ = saved_lora
    with pytest.raises(ConfigError, match="the model already has a PEFT set named `scenario`"):
        load_peft_set(peft, tmp_path, "scenario")


def test_two_sets_saved_side_by_side(make_ranker, make_ids, train_steps, tmp_path) -> None:
    peft = PeftModel(make_ranker())
    peft.inject("one", "adapter", ["experts.*"])
    train_steps(peft, 2, seed=1)
    peft.inject("two", "lora", ["towers.**"])
    train_steps(peft, 2, seed=2)
    ids = make_ids(9)
    expected = {}
    for name in ("one", "two"):
        peft.set_active(name)
        with torch.no_grad():
            expected[name] = peft(ids)
        save_peft_set(peft, name, peft_set_files(tmp_path, name).weights.parent, base_run="base")

    fresh = make_ranker()
    reloaded = load_peft_set(fresh, tmp_path, "one")
    load_peft_set(reloaded, tmp_path, "two", activate=False)
    actual = {}
    for name in ("one", "two"):
        reloaded.set_active(name)
        with torch.no_grad():
            actual[name] = reloaded(ids)
    assert torch.equal(actual["one"], expected["one"])
    assert torch.equal(actual["two"], expected["two"])


def test_weights_record_tensor_digest(saved_lora) -> None:
    peft, files = saved_lora
    with safe_open(str(files.weights), framework="pt") as handle:
        metadata = handle.metadata()

    assert metadata[DIGEST_METADATA_KEY] == tensor_digest(peft.set_state_dict("scenario"))


def test_corrupt_tensor_rejected_despite_matching_sidecar(saved_lora, make_ranker, tmp_path) -> None:
    # The sidecar's file SHA-256 is rewritten to match, as when a corrupt copy is saved again with
    # its JSON. The digest in the weights file's own header still catches the changed byte.
    _, files = saved_lora
    data = bytearray(files.weights.read_bytes())
    data[-1] ^= 0x01
    files.weights.write_bytes(bytes(data))
    raw = json.loads(files.config.read_text(encoding="utf-8"))
    raw["weights_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    files.config.write_text(json.dumps(raw), encoding="utf-8")
    model = PeftModel(make_ranker(seed=1))

    with pytest.raises(ArtifactError, match=r"scenario\.safetensors is corrupt: its tensors have SHA-256"):
        load_peft_set(model, tmp_path, "scenario")
    assert model.set_names() == []


def test_weights_without_digest_still_load(saved_lora, make_ranker, tmp_path) -> None:
    peft, files = saved_lora
    tensors = {key: torch.randn_like(value) for key, value in peft.set_state_dict("scenario").items()}
    _rewrite_weights(files, tensors)
    with safe_open(str(files.weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    assert DIGEST_METADATA_KEY not in metadata

    reloaded = load_peft_set(make_ranker(seed=1), tmp_path, "scenario")

    loaded = reloaded.set_state_dict("scenario")
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key
