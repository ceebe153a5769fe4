"""Linear probe (CLIP paper, appendix A.3): logistic regression on frozen features.

The paper trains scikit-learn's L-BFGS logistic regression (at most 1,000 iterations)
on frozen image features, picks the L2 strength on a validation split with a sweep over
{1e-6, 1e-4, ..., 1e6} refined by halving the interval around the best value, refits on
train + validation with that strength, and reports test accuracy. This module does the
same in JAX, so it runs on the mesh that produced the features.

The objective, in float32 (features are cast; nothing here depends on x64):

    mean_i w_i CE(x_i W + b, y_i) + (l2 / 2) * ||W||^2     (weighted mean over rows)

The bias is not penalised. scikit-learn minimises `C * sum_i w_i CE_i + ||W||^2 / 2`,
so the two agree when `C = 1 / (l2 * sum_i w_i)`, i.e. `C = 1 / (l2 * n)` without
sample weights (see `sklearn_equivalent_c`). Keeping l2 per mean loss makes a chosen
value mean the same thing on a small and a large train split. Features are not
standardised, which keeps that equivalence exact; the solver only centres them, an
exact change of variables since the bias is free (see `_solve`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.sharding import Mesh

from jaxclip.evaluate.zeroshot import mean_per_class_recall
from jaxclip.sharding import batch_sharding, batch_shards

# The paper's starting sweep: 1e-6, 1e-4, ..., 1e6 (two decades apart).
DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0**power for power in range(-6, 7, 2))
DEFAULT_REFINE_STEPS = 4  # half-widths of 1, 1/2, 1/4, 1/8 decades around the best


class LogisticRegressionFit(NamedTuple):
    """A fitted probe and how the solver ended."""

    weights: jax.Array  # [d, num_classes] float32
    bias: jax.Array  # [num_classes] float32; sums to zero (see `_solve`)
    iterations: int  # L-BFGS iterations taken
    grad_norm: float  # L2 norm of the gradient at the end (centred features)


def sklearn_equivalent_c(l2: float, total_weight: float) -> float:
    """scikit-learn's `C` for the same objective: 1 / (l2 * sum of row weights, or n)."""
    return 1.0 / (l2 * total_weight)


# --------------------------------------------------------------------------- checks
def _check_features(name: str, features, num_rows: int | None = None) -> None:
    if np.ndim(features) != 2:
        raise ValueError(f"{name} must be [rows, dim], got shape {np.shape(features)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if num_rows is not None and features.shape[0] != num_rows:
        raise ValueError(
            f"{name} has {features.shape[0]} rows but its labels have {num_rows}"
        )
    # Reduced where the rows live, so a sharded array is never gathered to check it.
    if not bool(jnp.all(jnp.isfinite(features))):
        bad = int(jnp.sum(~jnp.all(jnp.isfinite(features), axis=1)))
        raise ValueError(f"{name} has NaN or inf values in {bad} rows")


def _check_labels(name: str, labels, num_classes: int) -> None:
    if np.ndim(labels) != 1:
        raise ValueError(f"{name} must be [rows], got shape {np.shape(labels)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"{name} must hold integer class ids, got dtype {labels.dtype}"
        )
    if labels.shape[0] and not (
        int(jnp.min(labels)) >= 0 and int(jnp.max(labels)) < num_classes
    ):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), found values in "
            f"[{int(jnp.min(labels))}, {int(jnp.max(labels))}]"
        )


def _check_split(name: str, features, labels, num_classes: int) -> None:
    _check_labels(f"{name}_labels", labels, num_classes)
    _check_features(f"{name}_features", features, labels.shape[0])


def _check_solver_args(num_classes: int, max_iter: int, tol: float) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be at least 1")
    if not tol > 0:
        raise ValueError(f"tol={tol} must be positive")


_Split = tuple[np.ndarray, np.ndarray]  # (features [rows, dim], labels [rows])


def _checked(
    name: str, features, labels, num_classes: int, train: _Split | None = None
) -> _Split:
    """The split `name` as NumPy arrays, once it passes the checks and, given the
    train split, has train's feature dim."""
    features, labels = np.asarray(features), np.asarray(labels)
    _check_split(name, features, labels, num_classes)
    if train is not None and features.shape[1] != train[0].shape[1]:
        raise ValueError(
            f"{name}_features have dim {features.shape[1]} but train_features "
            f"have {train[0].shape[1]}"
        )
    return features, labels


# --------------------------------------------------------------------------- solver
def _objective(params, features, labels, row_weights, l2):
    """Weighted mean cross-entropy + (l2/2)||W||^2; sums over rows, so jit can shard."""
    # HIGHEST: on TPU/GPU the default matmul precision would round features to bf16.
    logits = (
        jnp.matmul(features, params["weights"], precision=jax.lax.Precision.HIGHEST)
        + params["bias"]
    )  # [rows, num_classes]
    label_logits = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    cross_entropy = jax.nn.logsumexp(logits, axis=1) - label_logits  # [rows]
    mean_loss = jnp.sum(row_weights * cross_entropy) / jnp.sum(row_weights)
    return mean_loss + 0.5 * l2 * jnp.sum(jnp.square(params["weights"]))


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _solve(features, labels, row_weights, l2, tol, max_iter, *, num_classes):
    """L-BFGS (zoom line search) from zeros until ||grad|| < tol or max_iter steps.

    The unpenalised bias is only defined up to a constant added to every class; the
    returned one sums to zero, as scikit-learn's does (its gradient, softmax minus
    one-hot, sums to zero over classes, so a solver started at zero stays there up
    to rounding, which the final centring removes).
    """
    features = features.astype(jnp.float32)
    row_weights = row_weights.astype(jnp.float32)
    l2 = jnp.asarray(l2, jnp.float32)
    # Solve on centred features: x W + b = (x - mean) W + (b + mean W), and the bias is
    # not penalised, so the optimum W is the same. Raw pixels or un-centred embeddings
    # otherwise couple W to the bias so strongly that float32 L-BFGS stalls.
    feature_mean = jnp.sum(row_weights[:, None] * features, axis=0) / jnp.sum(
        row_weights
    )  # [d]
    features = features - feature_mean

    def objective(params):
        return _objective(params, features, labels, row_weights, l2)

    params = {
        "weights": jnp.zeros((features.shape[1], num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
    # The line search stores the gradient at the accepted point, i.e. at `params`.
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    bias = params["bias"] - feature_mean @ params["weights"]
    bias = bias - jnp.mean(bias)
    return params["weights"], bias, otu.tree_get(state, "count"), grad_norm


def solve_logistic_regression(
    features: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    num_classes: int,
    l2: float,
    *,
    sample_weight: jax.Array | np.ndarray | None = None,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> LogisticRegressionFit:
    """Fit the probe and report the solver's iterations and final gradient norm.

    features: [n, d], labels: [n] int in [0, num_classes). Either may be a global
    jax.Array sharded over the batch axes; the loss only sums over rows, so jit
    partitions it and all-reduces the sums. sample_weight: [n], 0 drops a row (used
    for rows padded to fill the mesh). The solver stops once the gradient's L2 norm
    is below tol; the objective is l2-strongly convex in W, so W is then about tol/l2
    from the optimum.
    """
    _check_solver_args(num_classes, max_iter, tol)
    if not (np.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2={l2} must be finite and non-negative")
    features = features if isinstance(features, jax.Array) else np.asarray(features)
    labels = labels if isinstance(labels, jax.Array) else np.asarray(labels)
    _check_split("train", features, labels, num_classes)
    weights, bias, iterations, grad_norm = _solve(
        features,
        labels.astype(jnp.int32),
        _row_weights(sample_weight, labels.shape),
        # Fixed dtypes, so an int l2 (say 1) does not trigger a second compile.
        np.float32(l2),
        np.float32(tol),
        np.int32(max_iter),
        num_classes=num_classes,
    )
    iterations, grad_norm = int(iterations), float(grad_norm)
    if not np.isfinite(grad_norm):
        raise FloatingPointError(
            f"L-BFGS diverged at l2={l2} (gradient norm {grad_norm})"
        )
    if iterations >= max_iter and grad_norm >= tol:
        warnings.warn(
            f"linear probe: L-BFGS stopped at max_iter={max_iter} with gradient norm "
            f"{grad_norm:.2e} >= tol={tol:.0e} (l2={l2:.3g})",
            stacklevel=2,
        )
    return LogisticRegressionFit(weights, bias, iterations, grad_norm)


def _row_weights(sample_weight, shape: tuple[int]) -> jax.Array | np.ndarray:
    """`sample_weight`, once it is one non-negative weight a row with a positive sum;
    ones without it."""
    if sample_weight is None:
        return jnp.ones(shape, jnp.float32)
    if (
        np.shape(sample_weight) != shape
        or not bool(jnp.all(sample_weight >= 0))
        or not float(jnp.sum(sample_weight)) > 0
    ):
        raise ValueError(
            f"sample_weight must be [{shape[0]}], non-negative, with a positive "
            f"sum; got shape {np.shape(sample_weight)}"
        )
    return sample_weight


def fit_logistic_regression(
    features: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """(weights [d, C], bias [C]) minimising mean CE + (l2/2)||W||^2 (C_sk = 1/(l2 n))."""
    fit = solve_logistic_regression(
        features, labels, num_classes, l2, max_iter=max_iter, tol=tol
    )
    return fit.weights, fit.bias


@jax.jit
def _predict(features, weights, bias):
    logits = jnp.matmul(
        features.astype(jnp.float32), weights, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.argmax(logits + bias, axis=1)  # ties: lowest class id, like np.argmax


def predict(features: jax.Array | np.ndarray, weights, bias) -> np.ndarray:
    """[n] predicted class ids of a fitted probe."""
    return np.asarray(_predict(features, weights, bias))


# --------------------------------------------------------------------------- rows
class _Rows(NamedTuple):
    """Train and validation rows together on the devices, padded to fill the mesh.

    Fitting on train only is the same array with validation rows weighted 0, so the
    search and the final refit on train + val share one compiled solver.
    """

    features: jax.Array  # [padded_rows, d] float32
    labels: jax.Array  # [padded_rows] int32
    host_labels: np.ndarray  # [rows] int32, unpadded
    mesh: Mesh | None

    def weights(self, rows: np.ndarray) -> jax.Array:
        """[padded_rows] float32: 1 on the given row indices, 0 elsewhere."""
        weights = np.zeros(self.labels.shape[0], np.float32)
        weights[rows] = 1.0
        return _put(weights, self.mesh)

    def fit(
        self, rows: np.ndarray, num_classes: int, l2: float, max_iter: int, tol: float
    ) -> LogisticRegressionFit:
        return solve_logistic_regression(
            self.features,
            self.labels,
            num_classes,
            l2,
            sample_weight=self.weights(rows),
            max_iter=max_iter,
            tol=tol,
        )

    def predict(self, fit: LogisticRegressionFit) -> np.ndarray:
        """[rows] predicted class ids, padding dropped."""
        predictions = predict(self.features, fit.weights, fit.bias)
        return predictions[: len(self.host_labels)]


def _train_then_val(train: _Split, val: _Split) -> tuple[np.ndarray, ...]:
    """(features, labels, train_rows, val_rows): train's rows, then val's, in one."""
    num_train = len(train[1])
    features = np.concatenate([train[0], val[0]])
    labels = np.concatenate([train[1], val[1]])
    return features, labels, np.arange(num_train), np.arange(num_train, len(labels))


def _put(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array)
    return jax.device_put(array, batch_sharding(mesh, array.ndim))


def _place(features: np.ndarray, labels: np.ndarray, mesh: Mesh | None) -> _Rows:
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int32)
    pad = 0 if mesh is None else -len(labels) % batch_shards(mesh)
    padded_features = np.pad(features, ((0, pad), (0, 0)))
    padded_labels = np.pad(labels, (0, pad))
    return _Rows(_put(padded_features, mesh), _put(padded_labels, mesh), labels, mesh)


# --------------------------------------------------------------------------- search
def _search(
    rows: _Rows,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    num_classes: int,
    grid: Sequence[float],
    refine_steps: int,
    max_iter: int,
    tol: float,
) -> tuple[float, dict[float, float]]:
    grid = sorted(float(l2) for l2 in grid)
    if not grid or any(not (np.isfinite(l2) and l2 > 0) for l2 in grid):
        raise ValueError(f"grid={grid} must be a non-empty list of positive l2 values")
    if refine_steps < 0:
        raise ValueError(f"refine_steps={refine_steps} must be non-negative")
    val_labels = rows.host_labels[val_rows]
    accuracies: dict[float, float] = {}

    def best_of(candidates: Sequence[float]) -> float:
        for l2 in candidates:
            if l2 not in accuracies:
                fit = rows.fit(train_rows, num_classes, l2, max_iter, tol)
                correct = rows.predict(fit)[val_rows] == val_labels
                accuracies[l2] = float(np.mean(correct))
        # Ties go to the larger l2: the more regularised probe is the safer guess.
        return max(candidates, key=lambda l2: (accuracies[l2], l2))

    best = best_of(grid)
    # Refine in log10 space: probe half a grid gap either side of the best, keep the
    # best of the three, halve the gap, repeat (the paper's "parametric binary
    # search"). Probes stay inside the grid's range.
    half_width = float(np.min(np.diff(np.log10(grid)))) / 2 if len(grid) > 1 else 0.0
    for _ in range(refine_steps if half_width > 0 else 0):
        probes = [10.0 ** (np.log10(best) + sign * half_width) for sign in (-1, 1)]
        best = best_of([best, *(float(p) for p in probes if grid[0] <= p <= grid[-1])])
        half_width /= 2
    return best, accuracies


def choose_l2(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    *,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    refine_steps: int = DEFAULT_REFINE_STEPS,
    max_iter: int = 1000,
    tol: float = 1e-5,
    mesh: Mesh | None = None,
) -> tuple[float, dict[float, float]]:
    """(best l2, {l2: validation top-1}) from the grid sweep plus halving refinement.

    Each l2 is fit on train and scored on val; ties go to the larger l2 (stronger
    regularisation). With a mesh, rows are split over its batch axes.
    """
    _check_solver_args(num_classes, max_iter, tol)
    train = _checked("train", train_features, train_labels, num_classes)
    val = _checked("val", val_features, val_labels, num_classes, train)
    features, labels, train_rows, val_rows = _train_then_val(train, val)
    return _search(
        _place(features, labels, mesh),
        train_rows,
        val_rows,
        num_classes,
        grid,
        refine_steps,
        max_iter,
        tol,
    )


# --------------------------------------------------------------------------- protocol
def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows), sorted: round(val_fraction * n_c) random rows of class c.

    Every class keeps at least one train row, so a class seen once stays in train.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly in (0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        class_rows = rng.permutation(np.flatnonzero(labels == label))
        num_val = min(round(val_fraction * len(class_rows)), len(class_rows) - 1)
        val_parts.append(class_rows[:num_val])
    val_rows = np.sort(np.concatenate(val_parts))
    if len(val_rows) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} of {len(labels)} train rows leaves an empty "
            "validation split; pass more rows, a larger fraction or an explicit split"
        )
    return np.setdiff1d(np.arange(len(labels)), val_rows), val_rows


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    val_fraction: float = 0.2,
    val_features: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    seed: int = 0,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    refine_steps: int = DEFAULT_REFINE_STEPS,
    max_iter: int = 1000,
    tol: float = 1e-5,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """The paper's protocol: choose l2 on validation, refit on train+val, score test.

    Validation is `val_features`/`val_labels` when given, otherwise a stratified
    `val_fraction` of train drawn with `seed`. With a mesh, rows are padded (weight 0)
    to a multiple of the batch shards and split over the batch axes. Returns floats:
    test top-1 and mean per-class recall, the chosen l2, the validation top-1 at that
    l2, and the final fit's L-BFGS iterations and gradient norm.
    """
    _check_solver_args(num_classes, max_iter, tol)
    train = _checked("train", train_features, train_labels, num_classes)
    test_features, test_labels = _checked(
        "test", test_features, test_labels, num_classes, train
    )
    if (val_features is None) != (val_labels is None):
        raise ValueError("pass both val_features and val_labels, or neither")
    if val_features is None:
        features, labels = train
        train_rows, val_rows = stratified_split(labels, val_fraction, seed)
    else:
        val = _checked("val", val_features, val_labels, num_classes, train)
        features, labels, train_rows, val_rows = _train_then_val(train, val)

    rows = _place(features, labels, mesh)
    best_l2, val_accuracies = _search(
        rows, train_rows, val_rows, num_classes, grid, refine_steps, max_iter, tol
    )
    final = rows.fit(np.arange(len(labels)), num_classes, best_l2, max_iter, tol)
    predictions = _place(test_features, test_labels, mesh).predict(final)
    return {
        "linear_probe/top1": float(np.mean(predictions == test_labels)),
        "linear_probe/mean_per_class_recall": mean_per_class_recall(
            predictions, test_labels
        ),
        "linear_probe/l2": best_l2,
        "linear_probe/val_top1": val_accuracies[best_l2],
        "linear_probe/solver_iterations": float(final.iterations),
        "linear_probe/grad_norm": final.grad_norm,
    }
