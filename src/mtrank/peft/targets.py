"""Find PEFT target modules by name pattern, and infer a target's output width.

Names are the ones ``model.named_modules()`` gives for the base model before any injection. PEFT
wrappers keep that naming: a wrapped module keeps its name, and the modules under it keep theirs
(the wrapper's ``base_layer`` level is skipped and its injected modules are not targets).

Patterns are globs over the dotted names, matched against the whole name: ``*`` matches within one
name part (``experts.*`` is every expert but not ``experts.0.layers``), ``**`` matches across parts,
``?`` matches one character in a part. A pattern starting with ``re:`` is a Python regular
expression matched against the whole name instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from mtrank.errors import ConfigError
from mtrank.peft.wrapper import unwrap

REGEX_PREFIX = "re:"
# How many candidate names an error message lists when a pattern matches nothing.
MAX_NAMES_IN_ERROR = 12


@dataclasses.dataclass
class TargetSite:
    """A module of the base model together with where it is attached.

    Attributes:
        name: dotted name of the module in the base model, ignoring PEFT wrappers.
        module: the module there now, possibly a PEFT wrapper.
        parent: the module that contains it.
        attribute: its attribute name in ``parent`` (``"0"`` for the first entry of a Sequential).
    """

    name: str
    module: nn.Module
    parent: nn.Module
    attribute: str


def iter_sites(model: nn.Module) -> Iterator[TargetSite]:
    """Yield every module below ``model`` (the root excluded) with its name and parent, in order."""
    yield from _walk(model, "")


def _walk(module: nn.Module, prefix: str) -> Iterator[TargetSite]:
    # A wrapper shares its name with the module it wraps, so its children are walked from there.
    inner = unwrap(module)
    for attribute, child in inner.named_children():
        name = f"{prefix}.{attribute}" if prefix else attribute
        yield TargetSite(name=name, module=child, parent=inner, attribute=attribute)
        yield from _walk(child, name)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a glob or ``re:`` pattern into a regular expression matched with ``fullmatch``.

    Raises:
        ConfigError: the pattern is empty or an invalid regular expression.
    """
    if not pattern:
        raise ConfigError(["a PEFT target pattern is empty; give a module name such as `towers.*`"])
    if pattern.startswith(REGEX_PREFIX):
        try:
            return re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as error:
            raise ConfigError(
                [f"PEFT target `{pattern}` is not a valid regular expression: {error}"]
            ) from error
    parts = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append(r"[^.]*")
            index += 1
        elif pattern[index] == "?":
            parts.append(r"[^.]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts))


def resolve_targets(
    model: nn.Module,
    patterns: Sequence[str],
    accepts: Callable[[nn.Module], bool],
    method: str,
) -> list[TargetSite]:
    """Return the sites whose names match any of ``patterns`` and whose module ``accepts`` takes.

    ``accepts`` receives the module with any PEFT wrapper removed. Matched modules of a type the
    method cannot handle are skipped, so ``towers.**`` with LoRA selects the towers' linear layers.

    Args:
        model: the base model.
        patterns: glob or ``re:`` patterns, see the module docstring.
        accepts: whether the method can target a module.
        method: the method name, for error messages.

    Returns:
        Matched sites in ``named_modules`` order, each once.

    Raises:
        ConfigError: no patterns, or a pattern that selects no module the method accepts; the message
            lists names the method could target.
    """
    if not patterns:
        raise ConfigError([f"PEFT method `{method}` needs at least one target pattern"])
    compiled = [(pattern, compile_pattern(pattern)) for pattern in patterns]
    candidates = [site for site in iter_sites(model) if accepts(unwrap(site.module))]
    matched: list[TargetSite] = []
    problems = []
    for pattern, regex in compiled:
        hits = [site for site in candidates if regex.fullmatch(site.name)]
        if not hits:
            names = [site.name for site in candidates[:MAX_NAMES_IN_ERROR]]
            more = ", ..." if len(candidates) > MAX_NAMES_IN_ERROR else ""
            available = ", ".join(names) + more if names else "none"
            problems.append(
                f"PEFT target `{pattern}` matches no module that method `{method}` can target; "
                f"modules it can target: {available}"
            )
        matched.extend(site for site in hits if all(site.name != seen.name for seen in matched))
    if problems:
        raise ConfigError(problems)
    order = {site.name: index for index, site in enumerate(candidates)}
    return sorted(matched, key=lambda site: order[site.name])


def find_site(model: nn.Module, name: str) -> TargetSite | None:
    """Return the site named ``name`` (wrappers ignored), or ``None`` when there is none."""
    for site in iter_sites(model):
        if site.name == name:
            return site
    return None


def infer_output_width(site: TargetSite) -> int | None:
    """Return the last-dimension width of the output of the module at ``site``, or ``None``.

    The width comes from ``out_dim`` (mtrank modules), ``out_features`` (``nn.Linear``),
    ``embedding_dim``, ``num_features`` (batch norm) or ``normalized_shape`` (layer norm). For a
    ``Sequential`` it is the last child's width that can be inferred. For a module without a
    width, such as an activation or dropout inside a Sequential, it is the width of the nearest
    earlier sibling that has one, because those modules keep the width.
    """
    width = _own_width(unwrap(site.module))
    if width is not None:
        return width
    parent = site.parent
    if isinstance(parent, nn.Sequential):
        siblings = list(parent.named_children())
        position = [attribute for attribute, _ in siblings].index(site.attribute)
        for _, sibling in reversed(siblings[:position]):
            width = _own_width(unwrap(sibling))
            if width is not None:
                return width
    return None


def _own_width(module: nn.Module) -> int | None:
    for attribute in ("out_dim", "out_features", "embedding_dim", "num_features"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module)):
            width = _own_width(unwrap(child))
            if width is not None:
                return width
    return None
