"""Adaptive gradient clipping in numpy, from the paper's formula (Brock et al., 2021, eq. 3) and optax's
definition of a unit (`optax.unitwise_norm`): the oracle of `distclip.AGC`.

    G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i    where ||G_i|| / max(||W_i||, eps) > lambda
"""
import numpy as np


def unit_norms(x: np.ndarray) -> np.ndarray:
    """Each unit's L2 norm, broadcast to `x`'s shape: the whole array when at most one dimension exceeds 1;
    columns (summed over axis 0) at rank 2 and 3; output channels (axes 0, 1, 2) at rank 4."""
    x = np.asarray(x, np.float64)
    if np.squeeze(x).ndim <= 1:
        return np.full(x.shape, np.sqrt(np.sum(x * x)))
    axes = {2: (0,), 3: (0,), 4: (0, 1, 2)}[x.ndim]
    return np.broadcast_to(np.sqrt(np.sum(x * x, axis=axes, keepdims=True)), x.shape)


def agc(grads, weights, clipping: float, eps: float = 1e-3):
    """The clipped gradients (float64) and, per gradient, how many of its elements lie in a clipped unit."""
    out, clipped = [], []
    for g, w in zip(grads, weights):
        g = np.asarray(g, np.float64)
        bound = clipping * np.maximum(unit_norms(w), eps)
        norm = unit_norms(g)
        over = norm / np.maximum(unit_norms(w), eps) > clipping
        out.append(np.where(over, g * bound / np.where(over, norm, 1.0), g))
        clipped.append(int(np.sum(over)))
    return out, clipped


def global_clip(grads, clip_norm):
    """`tf.clip_by_global_norm`'s math in float64: the gradients times min(1, clip_norm / norm), and the norm."""
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in grads)))
    scale = 1.0 if clip_norm is None else min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [g * scale for g in grads], norm
