"""The docstring examples of the balancing modules run and print what they show."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from mtrank.balancing import base, dwa, fixed, gradnorm, shared_layer, uncertainty


@pytest.mark.parametrize(
    "module", [base, dwa, fixed, gradnorm, shared_layer, uncertainty], ids=lambda m: m.__name__
)
def test_docstring_examples_pass(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
