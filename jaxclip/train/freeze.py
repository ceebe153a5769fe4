"""Locked parameters (LiT): `train.freeze` and `train.unlock_last`.

`train.freeze` is a list of regular expressions, each matched against the whole
"/"-joined path of every parameter (`re.fullmatch`): `['visual/.*']` locks the image
tower, as in LiT (Zhai et al. 2022), `['text/.*']` the text tower. A locked parameter

- gets no gradient: the step differentiates only the trainable *view* of the params
  (`Freeze.view`), so nothing is computed for a locked tower's backward pass, and its
  output is wrapped in `stop_gradient` to say so;
- gets no optimizer state: the optimizer is initialised on the view, so the AdamW
  moments (and the checkpoint) hold only trainable parameters;
- stays bit for bit: the step writes the updated view back (`Freeze.merge`) and leaves
  the locked arrays as they were;
- for a locked ResNet image tower, normalises with its BatchNorm running statistics
  (inference mode), which it no longer updates, as OpenCLIP's `freeze_bn_stats`.

`train.unlock_last = N` then unlocks, in every tower that `train.freeze` locks whole,
its last N residual blocks and everything after them (the final LayerNorm, the
projection, SigLIP's attention-pooling head): the blocks are stored stacked on a
leading `layers` axis, so such a parameter is partly trainable, its rows from L - N
on, and only those rows have optimizer state. (OpenCLIP's `--lock-image-unlocked-
groups N` counts the head as one of its N groups: its N is this N + 1.) The stem (patch
or token embedding, positions, class token, `ln_pre`) stays locked. Partial unlocking
needs a transformer tower; OpenCLIP refuses it for ModifiedResNet too.

With the stack run as one `lax.scan` (TPU and GPU), the backward pass of a partly
unlocked tower runs through all its blocks (a scan's backward is all or nothing); the
locked rows' gradients are computed and dropped. Unrolled (the CPU), XLA drops them.
docs/performance.md has the measured FLOPs and memory.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from jaxclip.config_rules import ConfigError

TOWERS = ("visual", "text")
# The parameters a tower has before its block stack: never unlocked by `unlock_last`.
STEM = {
    "visual": ("conv1", "class_embedding", "positional_embedding", "ln_pre"),
    "text": ("token_embedding", "positional_embedding"),
}
STACK = "transformer"  # a tower's stacked residual blocks, `[layers, ...]` each

TRAIN, LOCKED = "train", "locked"


def path_name(path: tuple) -> str:
    """A tree path as "/"-joined keys ("visual/conv1/kernel")."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _unboxed(x: Any) -> Any:
    return x.unbox() if _is_leaf(x) else x


@dataclasses.dataclass(frozen=True)
class Freeze:
    """Which parameters train: the config's rules, applied to any params-shaped tree.

    `plan(tree)` says, per leaf path, TRAIN, LOCKED, or the first trainable row of a
    stacked leaf; `view(tree)` is the tree of what trains (locked leaves left out,
    partly trainable ones sliced); `merge(view, tree)` puts a view back. With no
    patterns every method is the identity, and nothing changes in the step or the
    checkpoint.
    """

    patterns: tuple[str, ...] = ()
    unlock_last: int = 0

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Freeze:
        return cls(tuple(config.train.freeze), config.train.unlock_last)

    @property
    def off(self) -> bool:
        return not self.patterns

    def plan(self, tree: Any) -> dict[str, str | int]:
        """Per "/"-joined leaf path: TRAIN, LOCKED, or the first trainable layer (an
        int) of a stacked leaf. Raises ConfigError for rules that cannot work."""
        leaves = {
            path_name(path): _unboxed(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=_is_leaf
            )
        }
        compiled = []
        for pattern in self.patterns:
            try:
                compiled.append(re.compile(pattern))
            except re.error as e:
                raise ConfigError(
                    f"train.freeze: {pattern!r} is not a regular expression ({e})"
                ) from None
        plan: dict[str, str | int] = {}
        for name in leaves:
            plan[name] = LOCKED if any(p.fullmatch(name) for p in compiled) else TRAIN
        for pattern, regex in zip(self.patterns, compiled):
            if not any(regex.fullmatch(name) for name in leaves):
                raise ConfigError(
                    f"train.freeze: {pattern!r} matches no parameter path (matched "
                    f"whole, e.g. {sorted(leaves)[0]!r}, 'visual/.*', 'text/.*')"
                )
        if self.unlock_last:
            self._unlock(plan, leaves)
        if all(plan[name] == LOCKED for name in plan if "/" in name):
            raise ConfigError(
                f"train.freeze={list(self.patterns)} locks every parameter of both "
                "towers: nothing would train (lock one tower, e.g. ['visual/.*'])"
            )
        return plan

    def _unlock(self, plan: dict[str, str | int], leaves: dict[str, Any]) -> None:
        """Unlock the last `unlock_last` blocks and the head of each wholly locked
        tower, in place."""
        locked = _wholly_locked(plan)
        if not locked:
            raise ConfigError(
                f"train.unlock_last={self.unlock_last} unlocks the last blocks of a "
                f"locked tower, but train.freeze={list(self.patterns)} locks no "
                "tower whole (e.g. train.freeze=['visual/.*'])"
            )
        for tower in locked:
            stack = [n for n in plan if n.startswith(f"{tower}/{STACK}/")]
            if not stack:
                raise ConfigError(
                    f"train.unlock_last={self.unlock_last}: the locked {tower} tower "
                    "has no transformer blocks (a ResNet); lock it whole, or name "
                    "what trains with train.freeze (e.g. 'visual/(?!attnpool/).*')"
                )
            layers = leaves[stack[0]].shape[0]
            if self.unlock_last > layers:
                raise ConfigError(
                    f"train.unlock_last={self.unlock_last} is more than the "
                    f"{layers} blocks of the {tower} tower"
                )
            for name in plan:
                parts = name.split("/")
                if parts[0] != tower or parts[1] in STEM[tower]:
                    continue
                first = layers - self.unlock_last
                plan[name] = first if parts[1] == STACK and first else TRAIN

    def locked_towers(self, tree: Any) -> tuple[str, ...]:
        """The towers none of whose parameters train."""
        if self.off:
            return ()
        return _wholly_locked(self.plan(tree))

    def view(self, tree: Any) -> Any:
        """The trainable part of a params-shaped tree (boxed or not): locked leaves
        left out, partly trainable stacked leaves sliced to their trainable rows."""
        if self.off:
            return tree
        plan = self.plan(tree)

        def keep(path, leaf):
            state = plan[path_name(path)]
            if state == LOCKED:
                return None
            if state == TRAIN:
                return leaf
            if _is_leaf(leaf):
                return leaf.replace_boxed(leaf.unbox()[state:])
            return leaf[state:]

        kept = jax.tree_util.tree_map_with_path(keep, tree, is_leaf=_is_leaf)
        return _prune(kept)

    def merge(self, view: Any, tree: Any) -> Any:
        """`tree` with the view's arrays in place of its trainable parts (the inverse
        of `view`); locked leaves are `tree`'s own arrays, untouched."""
        if self.off:
            return view
        plan = self.plan(tree)
        flat_view = {
            path_name(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(view)
        }

        def put(path, leaf):
            name = path_name(path)
            state = plan[name]
            if state == LOCKED:
                return leaf
            if state == TRAIN:
                return flat_view[name]
            return leaf.at[state:].set(flat_view[name].astype(leaf.dtype))

        return jax.tree_util.tree_map_with_path(put, tree)

    def describe(self, tree: Any) -> str:
        """One line for the log: how many parameters train, and where."""
        plan = self.plan(tree)
        leaves = {
            path_name(path): _unboxed(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=_is_leaf
            )
        }
        total = sum(leaf.size for leaf in leaves.values())
        trained = sum(
            leaves[name].size
            if state == TRAIN
            else leaves[name][state:].size
            if isinstance(state, int)
            else 0
            for name, state in plan.items()
        )
        whole = ", ".join(self.locked_towers(tree)) or "none"
        return (
            f"train.freeze: {trained:,} of {total:,} parameters train "
            f"({total - trained:,} locked; towers locked whole: {whole})"
        )


def _wholly_locked(plan: dict[str, str | int]) -> tuple[str, ...]:
    """The towers every parameter of which the plan locks."""
    return tuple(
        tower
        for tower in TOWERS
        if all(
            state == LOCKED
            for name, state in plan.items()
            if name.startswith(tower + "/")
        )
    )


def _prune(tree: Any) -> Any:
    """A nested dict without its None leaves and the dicts left empty."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        value = _prune(value)
        if value is None or (isinstance(value, dict) and not value):
            continue
        out[key] = value
    return out


def stop_locked_towers(out: dict[str, jax.Array], locked: tuple[str, ...]) -> dict:
    """The model's outputs with the embeddings of wholly locked towers wrapped in
    `stop_gradient` (their parameters are constants of the step already; this keeps
    any later change from differentiating into them)."""
    keys = {"visual": "image_emb", "text": "text_emb"}
    return {
        key: jax.lax.stop_gradient(value)
        if key in {keys[tower] for tower in locked}
        else value
        for key, value in out.items()
    }


def check_resumable(config: ml_collections.ConfigDict, saved: Any) -> None:
    """A run resumes with the locking it was saved with (`saved`: the checkpoint's
    config, None for none): its optimizer state covers what that left trainable."""
    if saved is None:
        return
    train = saved.get("train", {})
    before = Freeze(tuple(train.get("freeze", ())), train.get("unlock_last", 0))
    if before != Freeze.of(config):
        raise ConfigError(
            f"train.freeze={list(config.train.freeze)}, train.unlock_last="
            f"{config.train.unlock_last}: the workdir's checkpoint was saved with "
            f"train.freeze={list(before.patterns)}, train.unlock_last="
            f"{before.unlock_last}, and its optimizer state holds what those left "
            "trainable; resume with them, or start a new workdir with "
            "model.init_from=<this workdir> to change what is locked"
        )


def optimize_trainable(
    tx: optax.GradientTransformation, freeze: Freeze
) -> optax.GradientTransformation:
    """`tx` keeping state for the trainable parameters only: its `init` takes the
    whole params and initialises on `freeze.view(params)`; its `update` takes the
    view's gradients and params, as the train step passes them."""
    if freeze.off:
        return tx
    return optax.GradientTransformation(
        lambda params: tx.init(freeze.view(params)), tx.update
    )


NOTHING_LOCKED = Freeze()  # every parameter trains
