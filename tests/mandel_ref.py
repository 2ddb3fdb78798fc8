"""Independent NumPy reference for the Mandelbrot task's exact output semantics.

See the `mandelbrot` section of docs/wasm-abi.md. Every step is a separate float64 NumPy
operation (one rounding each, never a fused multiply-add), so the result must equal the WASM
kernel's output bit for bit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def reference_counts(
    width: int,
    height: int,
    xmin: float,
    xmax: float,
    ymin: float,
    ymax: float,
    max_iter: int,
) -> npt.NDArray[np.uint32]:
    """Escape counts of the whole ``width x height`` image: uint32 array, shape (height, width).

    Pixel column ``i``, row ``j`` (row 0 at the top)::

        dx = (xmax - xmin) / W;  dy = (ymax - ymin) / H
        cx = xmin + (i + 0.5) * dx;  cy = ymax - (j + 0.5) * dy
        n = 0; x = y = 0.0
        while n < M and x*x + y*y <= 4.0: x, y = (x*x - y*y) + cx, (2.0*x)*y + cy; n += 1
    """
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    xmin, xmax, ymin, ymax = (np.float64(v) for v in (xmin, xmax, ymin, ymax))
    dx = (xmax - xmin) / np.float64(width)
    dy = (ymax - ymin) / np.float64(height)
    cx_row = xmin + (np.arange(width, dtype=np.float64) + np.float64(0.5)) * dx
    cy_col = ymax - (np.arange(height, dtype=np.float64) + np.float64(0.5)) * dy

    counts = np.zeros(height * width, dtype=np.uint32)
    # Points still iterating: flat index, c, and z. Escaped points are dropped as we go.
    idx = np.arange(height * width)
    cx = np.tile(cx_row, height)
    cy = np.repeat(cy_col, width)
    x = np.zeros_like(cx)
    y = np.zeros_like(cy)
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(int(max_iter)):
            xx = x * x
            yy = y * y
            alive = (xx + yy) <= np.float64(4.0)  # False for NaN, like the spec's loop test
            if not alive.all():
                idx = idx[alive]
                if idx.size == 0:
                    break
                cx, cy, x, y, xx, yy = (a[alive] for a in (cx, cy, x, y, xx, yy))
            x, y = (xx - yy) + cx, (np.float64(2.0) * x) * y + cy
            counts[idx] += np.uint32(1)
    return counts.reshape(height, width)
