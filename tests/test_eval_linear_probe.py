"""Linear probe against scikit-learn's L-BFGS logistic regression (float64, tight tol).

The tolerances come from the objective being l2-strongly convex in the weights: a fit
stopped at gradient norm `tol` lies within about tol / l2 of the optimum, so the JAX
fit (float32, tol 1e-5) and scikit-learn's (float64, tol 1e-10) differ by at most
that in the weights, and by far less in the probabilities (the logits move by
||x|| * tol / l2 at worst, and a softmax moves less than its logits).
"""

import warnings

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import recall_score
from sklearn.model_selection import train_test_split

from jaxclip.evaluate import linear_probe as lp
from jaxclip.evaluate import zeroshot
from jaxclip.sharding import batch_sharding, make_mesh

NUM_CLASSES = 4
TOL = 1e-5  # the probe's default stopping gradient norm


@pytest.fixture(scope="module")
def toy():
    """Four overlapping gaussian-ish classes in 16 dims, 150 train and 90 test rows.

    Every toy test fits on 150 rows (choose_l2's train + val included), so they share
    one compiled solver; 150 rows do not split over 8 devices, so the mesh pads them.
    """
    features, labels = make_classification(
        n_samples=240,
        n_features=16,
        n_informative=6,
        n_redundant=2,
        n_classes=NUM_CLASSES,
        n_clusters_per_class=1,
        class_sep=1.0,
        flip_y=0.05,
        random_state=0,
    )
    features = features.astype(np.float32)
    return train_test_split(
        features, labels, test_size=90, stratify=labels, random_state=0
    )


def sklearn_fit(features, labels, l2: float) -> LogisticRegression:
    """The reference: the same objective through C = 1 / (l2 n), in float64."""
    c = lp.sklearn_equivalent_c(l2, len(labels))
    model = LogisticRegression(C=c, tol=1e-10, max_iter=10_000)
    return model.fit(np.asarray(features, np.float64), labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("l2", [1e-2, 1e-1])
def test_fit_matches_sklearn(toy, l2):
    train_x, test_x, train_y, test_y = toy
    fit = lp.solve_logistic_regression(train_x, train_y, NUM_CLASSES, l2)
    reference = sklearn_fit(train_x, train_y, l2)

    assert fit.weights.dtype == np.float32 and fit.bias.dtype == np.float32
    assert fit.weights.shape == (16, NUM_CLASSES) and fit.bias.shape == (NUM_CLASSES,)
    assert fit.iterations < 1000 and fit.grad_norm < TOL
    weights, bias = (
        np.asarray(fit.weights, np.float64),
        np.asarray(fit.bias, np.float64),
    )
    # Weights within the strong-convexity bound tol / l2 (doubled for float32
    # rounding); the zero-sum bias is not penalised, so it gets the logit tolerance.
    np.testing.assert_allclose(weights, reference.coef_.T, atol=2 * TOL / l2)
    np.testing.assert_allclose(bias, reference.intercept_, atol=1e-2)
    for features in (train_x, test_x):
        probs = softmax(features.astype(np.float64) @ weights + bias)
        np.testing.assert_allclose(probs, reference.predict_proba(features), atol=1e-3)
    # Same test predictions, hence the same accuracy, on the same split.
    predictions = lp.predict(test_x, fit.weights, fit.bias)
    np.testing.assert_array_equal(predictions, reference.predict(test_x))
    assert np.mean(predictions == test_y) == reference.score(test_x, test_y)


def reference_search(train_x, train_y, val_x, val_y, grid, refine_steps):
    """The paper's sweep + halving refinement, each l2 scored by a scikit-learn fit."""
    accuracies = {}

    def best_of(candidates):
        for l2 in candidates:
            if l2 not in accuracies:
                model = sklearn_fit(train_x, train_y, l2)
                accuracies[l2] = model.score(val_x.astype(np.float64), val_y)
        return max(candidates, key=lambda l2: (accuracies[l2], l2))

    best = grid_best = best_of(grid)
    half_width = 1.0  # half of the two-decade grid gap, in log10
    for _ in range(refine_steps):
        probes = [10.0 ** (np.log10(best) + s * half_width) for s in (-1, 1)]
        best = best_of([best, *(p for p in probes if grid[0] <= p <= grid[-1])])
        half_width /= 2
    return grid_best, best, accuracies


def test_choose_l2_matches_sklearn_sweep(toy):
    train_x, _, train_y, _ = toy
    fit_rows, val_rows = lp.stratified_split(train_y, val_fraction=0.25, seed=0)
    split = (train_x[fit_rows], train_y[fit_rows], train_x[val_rows], train_y[val_rows])
    best, accuracies = lp.choose_l2(*split, NUM_CLASSES, refine_steps=3)
    grid = list(lp.DEFAULT_L2_GRID)
    ref_grid_best, ref_best, ref_accuracies = reference_search(*split, grid, 3)

    # Every l2 the search visited scores the same validation accuracy as sklearn.
    assert len(accuracies) == len(ref_accuracies) > len(grid)
    for (l2, accuracy), (ref_l2, ref_accuracy) in zip(
        sorted(accuracies.items()), sorted(ref_accuracies.items())
    ):
        assert l2 == pytest.approx(ref_l2, rel=1e-12)
        assert accuracy == ref_accuracy, f"l2={l2:.3g}"
    # The grid part is a brute-force sweep: best accuracy, ties to the larger l2.
    grid_accuracies = [accuracies[l2] for l2 in grid]
    assert len(set(grid_accuracies)) > 2  # the sweep is not flat on this data
    assert max(grid, key=lambda l2: (accuracies[l2], l2)) == ref_grid_best
    assert best == pytest.approx(ref_best, rel=1e-12)
    assert accuracies[best] == max(accuracies.values())


def test_sharded_fit_matches_single_device(toy):
    train_x, _, train_y, _ = toy
    l2 = 1e-2
    mesh = make_mesh((8, 1, 1))
    # 150 rows padded to 152 = 8 x 19, the padding weighted 0.
    pad = -len(train_y) % 8
    weights = np.pad(np.ones(len(train_y), np.float32), (0, pad))
    sharded = [
        jax.device_put(array, batch_sharding(mesh, array.ndim))
        for array in (
            np.pad(train_x, ((0, pad), (0, 0))),
            np.pad(train_y.astype(np.int32), (0, pad)),
            weights,
        )
    ]
    assert len(sharded[0].sharding.device_set) == 8
    on_mesh = lp.solve_logistic_regression(
        sharded[0], sharded[1], NUM_CLASSES, l2, sample_weight=sharded[2]
    )
    single = lp.solve_logistic_regression(train_x, train_y, NUM_CLASSES, l2)
    assert on_mesh.grad_norm < TOL and single.grad_norm < TOL
    # Row sums reduce in a different order, so the two L-BFGS paths differ by
    # rounding; both end within tol / l2 of the same optimum.
    np.testing.assert_allclose(on_mesh.weights, single.weights, atol=2 * TOL / l2)
    np.testing.assert_allclose(on_mesh.bias, single.bias, atol=1e-3)


def test_linear_probe_on_mesh_matches_single_device(toy):
    train_x, test_x, train_y, test_y = toy
    kwargs = dict(grid=(1e-2, 1.0), refine_steps=1)
    on_mesh = lp.linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        NUM_CLASSES,
        mesh=make_mesh((8, 1, 1)),
        **kwargs,
    )
    single = lp.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES, **kwargs)
    assert on_mesh["linear_probe/l2"] == single["linear_probe/l2"]
    for key in ("top1", "mean_per_class_recall", "val_top1"):
        key = f"linear_probe/{key}"
        assert on_mesh[key] == pytest.approx(single[key], abs=1 / 90), key


def test_digits_linear_probe():
    digits = load_digits()  # 8x8 raw pixels in [0, 16], 10 classes
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data,
        digits.target,
        test_size=0.25,
        stratify=digits.target,
        random_state=0,
    )
    result = lp.linear_probe(train_x, train_y, test_x, test_y, 10)

    assert set(result) == {
        "linear_probe/top1",
        "linear_probe/mean_per_class_recall",
        "linear_probe/l2",
        "linear_probe/val_top1",
        "linear_probe/solver_iterations",
        "linear_probe/grad_norm",
    }
    assert all(type(value) is float for value in result.values())
    assert result["linear_probe/top1"] >= 0.9
    assert result["linear_probe/solver_iterations"] < 1000
    assert result["linear_probe/grad_norm"] < TOL
    # The paper's scikit-learn settings (L-BFGS, at most 1,000 iterations, default
    # tol) at the chosen l2, refit on the same rows (train + val = all train rows).
    c = lp.sklearn_equivalent_c(result["linear_probe/l2"], len(train_y))
    reference = LogisticRegression(C=c, max_iter=1000).fit(train_x, train_y)
    assert abs(result["linear_probe/top1"] - reference.score(test_x, test_y)) <= 0.02


def test_split_and_metrics():
    labels = np.repeat(np.arange(5), [10, 10, 10, 4, 1])
    train_rows, val_rows = lp.stratified_split(labels, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(
        np.bincount(labels[val_rows], minlength=5), [2, 2, 2, 1, 0]
    )
    assert np.intersect1d(train_rows, val_rows).size == 0
    assert len(train_rows) + len(val_rows) == len(labels)
    again = lp.stratified_split(labels, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again[1], val_rows)

    rng = np.random.default_rng(0)
    truth, predictions = rng.integers(0, 6, 200), rng.integers(0, 6, 200)
    assert zeroshot.mean_per_class_recall(predictions, truth) == pytest.approx(
        recall_score(truth, predictions, average="macro")
    )
    assert lp.sklearn_equivalent_c(0.5, 8) == 0.25


def _bad(case: str):
    """(train_x, train_y, test_x, test_y, num_classes, kwargs) broken one way."""
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(40, 4)).astype(np.float32)
    train_y = np.arange(40) % 2
    test_x, test_y = train_x[:10].copy(), train_y[:10].copy()
    kwargs = {}
    if case == "nan":
        train_x[3, 1] = np.nan
    elif case == "inf":
        test_x[2, 0] = np.inf
    elif case == "label_high":
        train_y[5] = 2
    elif case == "label_negative":
        test_y[0] = -1
    elif case == "float_labels":
        train_y = train_y.astype(np.float32)
    elif case == "empty_train":
        train_x, train_y = train_x[:0], train_y[:0]
    elif case == "empty_test":
        test_x, test_y = test_x[:0], test_y[:0]
    elif case == "empty_val_split":
        train_x, train_y = train_x[:2], train_y[:2]  # one row per class
    elif case == "empty_val_given":
        kwargs = dict(val_features=train_x[:0], val_labels=train_y[:0])
    elif case == "row_mismatch":
        train_y = train_y[:-1]
    elif case == "dim_mismatch":
        test_x = test_x[:, :3]
    elif case == "one_class":
        return train_x, train_y, test_x, test_y, 1, kwargs
    return train_x, train_y, test_x, test_y, 2, kwargs


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", r"train_features has NaN or inf values in 1 rows"),
        ("inf", r"test_features has NaN or inf"),
        ("label_high", r"train_labels must lie in \[0, num_classes=2\)"),
        ("label_negative", r"test_labels must lie in"),
        ("float_labels", r"train_labels must hold integer class ids"),
        ("empty_train", r"train_features is empty"),
        ("empty_test", r"test_features is empty"),
        ("empty_val_split", r"empty validation split"),
        ("empty_val_given", r"val_features is empty"),
        ("row_mismatch", r"train_features has 40 rows but its labels have 39"),
        ("dim_mismatch", r"test_features have dim 3 but train_features have 4"),
        ("one_class", r"num_classes=1 must be at least 2"),
    ],
)
def test_bad_input_is_refused(case, message):
    train_x, train_y, test_x, test_y, num_classes, kwargs = _bad(case)
    with pytest.raises(ValueError, match=message):
        lp.linear_probe(train_x, train_y, test_x, test_y, num_classes, **kwargs)


def test_bad_fit_arguments_are_refused():
    features, labels = np.ones((8, 2), np.float32), np.arange(8) % 2
    with pytest.raises(ValueError, match=r"l2=-1.0 must be finite and non-negative"):
        lp.fit_logistic_regression(features, labels, 2, -1.0)
    with pytest.raises(ValueError, match=r"sample_weight must be \[8\], non-negative"):
        lp.solve_logistic_regression(
            features, labels, 2, 1.0, sample_weight=-np.ones(8, np.float32)
        )
    with pytest.raises(ValueError, match=r"grid=.* positive l2 values"):
        lp.choose_l2(features, labels, features, labels, 2, grid=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"val_fraction=1.5"):
        lp.stratified_split(labels, val_fraction=1.5)


def test_fit_warns_when_max_iter_stops_it(toy):
    train_x, _, train_y, _ = toy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights, bias = lp.fit_logistic_regression(
            train_x, train_y, NUM_CLASSES, 1e-2, max_iter=3
        )
    assert any("stopped at max_iter=3" in str(w.message) for w in caught)
    assert weights.shape == (16, NUM_CLASSES) and bias.shape == (NUM_CLASSES,)
