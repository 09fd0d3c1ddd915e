"""Region-of-interest map operations shared by the label rules and RoI inference."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def gaussian_kernel1d(size: int = 3, sigma: float = 1.0) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(map2d: np.ndarray, size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (edge not repeated), as torchvision's `gaussian_blur`."""
    k = gaussian_kernel1d(size, sigma)
    out = ndimage.convolve1d(np.asarray(map2d, dtype=np.float64), k, axis=0, mode="mirror")
    return ndimage.convolve1d(out, k, axis=1, mode="mirror")


def tight_box(mask2d: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (row0, col0, row1, col1) around the True cells, or None when there are none."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())
