"""Global poolings of a CNN's last feature map (N, C, H, W) into one vector per image."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

#: GeM's exponent: p=3 is the value Radenović et al. (TPAMI 2019) found good across backbones
#: and datasets, and the one they recommend when p is not learned.
GEM_P = 3.0
#: Activations are clamped to this before the power, so that zeros (after ReLU) have a gradient
#: and the p-th root stays finite.
GEM_EPS = 1e-6


def gap(feature_map: torch.Tensor) -> torch.Tensor:
    """Return the global average of each channel: (N, C, H, W) -> (N, C)."""
    if feature_map.ndim != 4:
        raise ValueError(f"expected ndim to be 4, got {feature_map.ndim}")
    return feature_map.mean(dim=(2, 3))


def gem(feature_map: torch.Tensor, *, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Return generalised-mean pooling, (mean of x^p)^(1/p) per channel: (N, C, H, W) -> (N, C).

    Args:
        feature_map: non-negative activations (negatives are clamped to `eps`).
        p: 1 is the average, larger values move towards the maximum.
        eps: the floor applied before the power.

    Returns:
        A (N, C) tensor.
    """
    if feature_map.ndim != 4:
        raise ValueError(f"expected ndim to be 4, got {feature_map.ndim}")
    return feature_map.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


#: Every pooling computed from one forward pass; cached features hold one vector per entry.
POOLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gap": gap, "gem": gem}


def combine_scales(per_scale: list[np.ndarray]) -> np.ndarray:
    """Average one (n, d) descriptor array per input scale, each L2-normalised first.

    Normalising each scale first gives every scale the same vote, as in multi-scale GeM.
    """
    if not per_scale:
        raise ValueError("expected at least one scale")
    total = np.zeros_like(per_scale[0], dtype=np.float32)
    for vectors in per_scale:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        total += vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return total / len(per_scale)
