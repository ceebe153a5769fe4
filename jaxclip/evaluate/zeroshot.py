"""Zero-shot classification: class embeddings from prompt templates, then top-k and
mean per-class recall."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def prompt_texts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class by class."""
    return [template.format(name) for name in classnames for template in templates]


def class_embeddings(text_emb: Any, num_classes: int) -> jax.Array:
    """[num_classes, embed_dim] from the prompts' embeddings [num_classes * T, d] (in
    `prompt_texts` order): per class, the renormalised mean of the normalised prompt
    embeddings (CLIP's ensemble)."""
    text_emb = jnp.asarray(text_emb, jnp.float32).reshape(
        num_classes, -1, text_emb.shape[-1]
    )
    text_emb = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    class_emb = text_emb.mean(axis=1)
    return class_emb / jnp.linalg.norm(class_emb, axis=-1, keepdims=True)


def topk_accuracy(
    logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits, for each k."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    # Stable descending order, so ties rank the lower class index first.
    order = np.argsort(-logits, axis=-1, kind="stable")
    hits = order == labels[:, None]
    return {
        f"top{k}": float(hits[:, : min(k, logits.shape[1])].any(axis=1).mean())
        for k in ks
    }


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top5 and mean_per_class_recall (the mean over the classes present of
    the fraction of each class's images whose top-1 prediction is right)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    metrics = topk_accuracy(logits, labels, (1, 5))
    # The same tie rule as topk_accuracy: the lower class index first.
    predicted = np.argsort(-logits, axis=-1, kind="stable")[:, 0]
    metrics["mean_per_class_recall"] = mean_per_class_recall(predicted, labels)
    return metrics


def mean_per_class_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the fraction predicted right."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float(
        np.mean([np.mean(predictions[labels == c] == c) for c in np.unique(labels)])
    )
