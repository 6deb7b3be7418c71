"""Target patterns, names under PEFT wrappers and output-width inference."""

from __future__ import annotations

import pytest
from torch import nn

from mtrank.errors import ConfigError
from mtrank.models.mlp import MLP
from mtrank.peft import PeftModel
from mtrank.peft.targets import compile_pattern, find_site, infer_output_width, iter_sites


def _model() -> nn.Module:
    return nn.ModuleDict(
        {
            "experts": nn.ModuleList([MLP(4, [6, 5]), MLP(4, [6, 5])]),
            "towers": nn.ModuleDict({"click": MLP(5, [3], output_dim=1)}),
        }
    )


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("experts.*", "experts.0", True),
        ("experts.*", "experts.0.layers", False),
        ("experts.**", "experts.0.layers.2", True),
        ("experts.?.layers.0", "experts.1.layers.0", True),
        ("experts.?.layers.0", "experts.10.layers.0", False),
        ("towers.click", "towers.click", True),
        ("towers.click", "towers.clicks", False),
        ("re:experts\\.[01]\\.layers\\.(0|2)", "experts.1.layers.2", True),
        ("re:experts\\.[01]", "experts.1.layers.2", False),
    ],
)
def test_pattern_matching(pattern: str, name: str, matches: bool) -> None:
    assert (compile_pattern(pattern).fullmatch(name) is not None) is matches


def test_invalid_regex_rejected() -> None:
    with pytest.raises(ConfigError, match=r"PEFT target `re:experts\(` is not a valid regular expression"):
        compile_pattern("re:experts(")


def test_empty_pattern_rejected() -> None:
    with pytest.raises(ConfigError, match="a PEFT target pattern is empty"):
        compile_pattern("")


def test_targets_as_string_rejected() -> None:
    peft = PeftModel(_model())
    with pytest.raises(
        ConfigError, match="PEFT targets must be a list of patterns, got the string 'experts.*'"
    ):
        peft.inject("tune", "adapter", "experts.*")


def test_method_without_default_targets_needs_patterns() -> None:
    peft = PeftModel(_model())
    with pytest.raises(ConfigError, match="PEFT method `lora` needs target patterns"):
        peft.inject("tune", "lora")


def test_names_unchanged_by_wrappers() -> None:
    model = _model()
    names_before = [site.name for site in iter_sites(model)]
    peft = PeftModel(model)
    peft.inject("low_rank", "lora", ["experts.**"])
    peft.inject("bottleneck", "adapter", ["experts.*", "towers.click"])
    names_after = [site.name for site in iter_sites(model)]
    assert names_after == names_before


def test_second_set_reuses_wrapper() -> None:
    model = _model()
    peft = PeftModel(model)
    peft.inject("one", "lora", ["experts.0.layers.0"])
    peft.inject("two", "lora", ["experts.0.layers.0"])
    wrapper = model["experts"][0].layers[0]
    assert sorted(wrapper.peft_modules) == ["one", "two"]
    assert isinstance(wrapper.base_layer, nn.Linear)


def test_no_match_lists_candidates() -> None:
    peft = PeftModel(_model())
    with pytest.raises(
        ConfigError, match=r"PEFT target `expert\.\*` matches no module .*experts\.0\.layers\.0"
    ):
        peft.inject("tune", "lora", ["expert.*"])


def test_all_bad_patterns_reported_together() -> None:
    peft = PeftModel(_model())
    with pytest.raises(ConfigError, match="2 invalid configuration value"):
        peft.inject("tune", "lora", ["nothing", "experts.0.layers.0", "missing.**"])


@pytest.mark.parametrize(
    ("name", "width"),
    [
        ("experts.0", 5),
        ("experts.0.layers", 5),
        ("experts.0.layers.0", 6),
        ("experts.0.layers.1", 6),
        ("experts.0.layers.3", 5),
        ("towers.click", 1),
    ],
)
def test_output_width_inference(name: str, width: int) -> None:
    site = find_site(_model(), name)
    assert site is not None
    assert infer_output_width(site) == width


def test_output_width_unknown_for_lone_activation() -> None:
    site = find_site(nn.Sequential(nn.ReLU()), "0")
    assert site is not None
    assert infer_output_width(site) is None
