"""The controller's spot checks of a whole Mandelbrot image, tile by tile: `spot_check` on
each tile in the job's order with one seeded `rng`, as `MandelbrotPlugin.verify` meets a job's
results. For tests/test_mandelbrot_fast_paths.py and bench/compare_parts.py, which compare
the pixel routines (`escape`) by the verdicts and iterations they give."""

from __future__ import annotations

import random

import numpy as np
from processdistro.shared.tasks.base import Verdict
from processdistro.shared.tasks.mandelbrot import Escape, MandelbrotParams, MandelbrotPlugin, kernel_escape, spot_check


def check_every_tile(
    p: MandelbrotParams, counts: np.ndarray, rng: random.Random, escape: Escape = kernel_escape
) -> list[tuple[Verdict, int]]:
    """(verdict, iterations spent) of each tile of `counts` (the image's claimed counts)."""
    found = []
    for index in range(MandelbrotPlugin().count(p)):
        x0, y0, w, h = p.tile_rect(index)
        found.append(spot_check(p, x0, y0, counts[y0 : y0 + h, x0 : x0 + w], rng, escape=escape))
    return found
