"""Tables that rename one state dict's keys into another format's, tensor by tensor.

jaxclip's variables map mechanically onto one torch state dict, its canonical keys
(`openclip.layout`; for CLIP these are OpenCLIP's own). Other formats (HF's
`CLIPModel` and `SiglipModel`, OpenCLIP's timm-built SigLIP image tower) name the same
tensors differently and sometimes split, fuse or reshape them. A `Renaming` holds one
such format as rules `(canonical key pattern, target template, kind)`:

    copy        the same tensor
    transpose   a Linear weight stored the other way round
    qkv         a fused q/k/v projection split into three ("{{}}" -> q, k, v)
    q_kv        a fused q/k/v projection split into q and a fused kv ("{{}}" -> q, kv)
    lead1/2     the same values with one or two leading axes of size 1

A template's "{i}" is the layer index, "{0}" the pattern's next group, "{{}}" the part
of a split tensor. Every rule is
a reshape, transpose, split or concatenation, so a round trip gives the same bits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

# How each kind splits a canonical tensor along axis 0: parts and their sizes in
# units of the tensor's length / sum(sizes).
_SPLITS = {"qkv": (("q", "k", "v"), (1, 1, 1)), "q_kv": (("q", "kv"), (1, 2))}
_LEADING = {"lead1": 1, "lead2": 2}


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    template: str
    kind: str


class Renaming:
    """A format's keys as rules over the canonical keys (see the module docstring)."""

    def __init__(self, name: str, rules: Iterable[tuple[str, str, str]]):
        self.name = name
        self.rules = [Rule(re.compile(p), t, k) for p, t, k in rules]

    def targets(self, key: str) -> tuple[list[str], str]:
        """The format's keys (several for a split tensor) and the kind, for `key`."""
        for rule in self.rules:
            match = rule.pattern.fullmatch(key)
            if match is None:
                continue
            groups = match.groups()
            template = rule.template
            if "{i}" in template:
                layer, *groups = groups
                template = template.replace("{i}", layer)
            name = template.format(*groups)
            if rule.kind in _SPLITS:
                return [name.format(p) for p in _SPLITS[rule.kind][0]], rule.kind
            return [name], rule.kind
        raise ValueError(f"{key} has no {self.name} counterpart")

    def shapes(self, key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The format's keys and shapes for a canonical key of `shape`."""
        names, kind = self.targets(key)
        if kind == "transpose":
            return {names[0]: shape[::-1]}
        if kind in _SPLITS:
            sizes = _SPLITS[kind][1]
            unit = shape[0] // sum(sizes)
            return {n: (unit * s, *shape[1:]) for n, s in zip(names, sizes)}
        if kind in _LEADING:
            return {names[0]: (1,) * _LEADING[kind] + tuple(shape)}
        return {names[0]: tuple(shape)}

    def expected_shapes(
        self, canonical: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """Every key and shape of the format, from the canonical keys and shapes."""
        out: dict[str, tuple[int, ...]] = {}
        for key, shape in canonical.items():
            out.update(self.shapes(key, shape))
        return out

    def rename(self, canonical: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A canonical state dict in the format's keys and layouts."""
        out = {}
        for key, value in canonical.items():
            names, kind = self.targets(key)
            if kind == "transpose":
                out[names[0]] = np.asarray(value.T, order="C")
            elif kind in _SPLITS:
                sizes = np.cumsum(_SPLITS[kind][1])[:-1] * (
                    value.shape[0] // sum(_SPLITS[kind][1])
                )
                for name, part in zip(names, np.split(value, sizes, axis=0)):
                    out[name] = np.asarray(part, order="C")
            elif kind in _LEADING:
                out[names[0]] = value.reshape((1,) * _LEADING[kind] + value.shape)
            else:
                out[names[0]] = value
        return out

    def restore(
        self,
        tensors: Mapping[str, np.ndarray],
        canonical: Mapping[str, tuple[int, ...]],
        what: str,
        ignore: Callable[[str], bool] = lambda key: False,
    ) -> dict[str, np.ndarray]:
        """The canonical state dict from the format's tensors, checked key by key in
        the format's names (one error lists missing, unexpected and misshapen keys)."""
        from jaxclip.convert.openclip import check_keys

        check_keys(tensors, self.expected_shapes(canonical), what, ignore=ignore)
        out = {}
        for key, shape in canonical.items():
            names, kind = self.targets(key)
            parts = [np.asarray(tensors[name]) for name in names]
            if kind == "transpose":
                out[key] = parts[0].T
            elif kind in _SPLITS:
                out[key] = np.concatenate(parts)
            else:  # copy, lead1, lead2 (a [1] logit scale is fine too)
                out[key] = parts[0].reshape(shape)
        return out
