"""Losses and accuracy counts shared by training, validation and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

TOP_K = 5  # the paper reports top-1 and top-5 error


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 where the label is among the k highest scores.

  Ties count in the label's favour (rank = classes scoring strictly higher),
  so the result does not depend on how a sort breaks ties.

  Args:
    scores: ``(N, classes)`` logits or posteriors.
    labels: ``(N,)`` int.
    k: clipped to the number of classes.
  """
  k = min(k, scores.shape[-1])
  label_score = jnp.take_along_axis(scores, labels[:, None], axis=-1)
  rank = (scores > label_score).sum(axis=-1)
  return (rank < k).astype(jnp.float32)


def topk_hits(scores: jax.Array, labels: jax.Array, mask: jax.Array,
              k: int = TOP_K) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Counts of top-1 and top-k hits and of counted examples.

  Args:
    scores: ``(N, classes)``.
    labels: ``(N,)`` int.
    mask: ``(N,)`` bool; False rows (padding) are not counted.
    k: the top-k (clipped to the number of classes).

  Returns:
    ``(top1, topk, count)`` int32 scalars.
  """
  mask = mask.astype(jnp.int32)
  top1 = (topk_correct(scores, labels, 1).astype(jnp.int32) * mask).sum()
  topk = (topk_correct(scores, labels, k).astype(jnp.int32) * mask).sum()
  return top1, topk, mask.sum()
