"""The live preview of an image job: the Mandelbrot canvas as the aggregators have merged it
so far, scaled down to at most `MAX_EDGE` pixels, as a PNG (`GET /jobs/{id}/preview.png`).

The merged counts live in the data directory (`tasks.mandelbrot.MandelbrotPlugin`): the
shared canvas `counts.partial.npy` while the job runs, `counts.npy` once it is finalized.
The gateway reads them where it shares the data directory with the aggregators (`up`, or
compose with the data volume mounted); elsewhere there is simply no preview (None).

A pixel with a count of 0 was never computed (every computed pixel iterates at least once):
it is painted `PENDING`, so the image fills in tile by tile. Reading a canvas an aggregator
is writing is safe: a tile half written shows half, and the next frame shows all of it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ..shared.lazy import lazy, lazy_function
from ..shared.tasks.base import JobFiles
from ..shared.tasks.mandelbrot import MandelbrotParams, MandelbrotPlugin, colourize

if TYPE_CHECKING:
    import numpy as np
    from numpy.lib.format import open_memmap
    from PIL import Image
else:
    np = lazy("numpy")
    open_memmap = lazy_function("numpy.lib.format", "open_memmap")
    Image = lazy("PIL.Image")

log = logging.getLogger(__name__)

#: The preview's longest edge, in pixels.
MAX_EDGE = 512
#: What a pixel not computed yet looks like (a light grey-blue, unlike any colour of the map).
PENDING = (221, 225, 234)
#: Previews kept, one per job (the newest done-count of each).
CACHED_JOBS = 16


def step_for(width: int, height: int, max_edge: int = MAX_EDGE) -> int:
    """The sampling stride that brings the longest edge to `max_edge` pixels or fewer."""
    return max(1, math.ceil(max(width, height) / max_edge))


def render(counts: np.ndarray, max_iter: int, max_edge: int = MAX_EDGE) -> bytes:
    """A PNG of `counts` (rows from the top), every `step`-th pixel, pending pixels grey."""
    h, w = counts.shape
    step = step_for(w, h, max_edge)
    small = np.asarray(counts[::step, ::step])
    rgb = colourize(small, max_iter)
    rgb[small == 0] = PENDING
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def read_counts(directory: Path, width: int, height: int) -> np.ndarray | None:
    """The job's merged counts (the running canvas, else the finalized raw output), or None
    when neither is there or they are not the shape the job's parameters say."""
    for name in (MandelbrotPlugin.PARTIAL, MandelbrotPlugin.RAW):
        path = directory / name
        try:
            counts = open_memmap(path, mode="r")
        except (OSError, ValueError) as exc:  # missing, being created, or truncated
            if path.exists():
                log.debug("preview: %s unreadable (%s)", path, exc)
            continue
        if counts.shape == (height, width) and counts.dtype == np.uint32:
            return counts
    return None


class Previews:
    """Rendered previews, cached per job and done-count: every dashboard polling the same
    frame costs one render."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._cache: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()  # renders run in worker threads (`asyncio.to_thread`)

    def png(self, job_id: str, params_json: str, done: int) -> bytes | None:
        """The preview of a Mandelbrot job (its `params` as JSON, its done count), or None."""
        with self._lock:
            return self._png(job_id, params_json, done)

    def _png(self, job_id: str, params_json: str, done: int) -> bytes | None:
        cached = self._cache.get(job_id)
        if cached is not None and cached[0] == done:
            self._cache.move_to_end(job_id)
            return cached[1]
        try:
            params = MandelbrotParams.model_validate(json.loads(params_json or "{}"))
        except (ValueError, ValidationError):
            return None
        counts = read_counts(JobFiles.under(self.data_dir, job_id).directory, params.width, params.height)
        if counts is None:
            return None
        data = render(counts, params.max_iter)
        del counts  # unmap now, not at the next collection
        self._cache[job_id] = (done, data)
        self._cache.move_to_end(job_id)
        while len(self._cache) > CACHED_JOBS:
            self._cache.popitem(last=False)
        return data
