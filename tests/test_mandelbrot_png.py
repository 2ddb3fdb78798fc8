"""The image finalize writes (`mandelbrot.write_image` through `png.write_png`: no row filters,
bands compressed apart): any PNG reader decodes it to `colourize` of the counts, pixel for
pixel; its zlib stream is whole (zlib's own decoder checks the combined Adler-32); its bytes do
not depend on how many threads compressed it."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from processdistro.shared.tasks.mandelbrot import _palette, colourize, write_image
from processdistro.shared.tasks.png import BAND_ROWS, adler32_combine, write_png


def _idat(png: bytes) -> bytes:
    at = png.index(b"IDAT")
    (length,) = struct.unpack(">I", png[at - 4 : at])
    (crc,) = struct.unpack(">I", png[at + 4 + length : at + 8 + length])
    assert zlib.crc32(png[at : at + 4 + length]) == crc
    return png[at + 4 : at + 4 + length]


@pytest.mark.parametrize(
    ("height", "width", "max_iter"),
    [
        pytest.param(1, 1, 3, id="one-pixel"),
        pytest.param(7, 5, 2000, id="fewer-pixels-than-colours"),
        pytest.param(BAND_ROWS, 64, 50, id="exactly-one-band"),
        pytest.param(BAND_ROWS + 1, 33, 500, id="one-band-and-a-row"),
        pytest.param(3 * BAND_ROWS + 17, 129, 2000, id="several-bands-odd-width"),
        pytest.param(300, 300, 10**7, id="huge-max-iter-unique-counts"),
    ],
)
def test_the_png_decodes_to_the_colouring_of_the_counts(height: int, width: int, max_iter: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    counts = rng.integers(0, max_iter + 1, size=(height, width), dtype=np.uint32)
    counts[0, 0] = max_iter  # black, as every point that reaches the cap
    buf = io.BytesIO()
    write_image(buf, counts, max_iter)
    png = buf.getvalue()
    with Image.open(io.BytesIO(png)) as img:
        assert (img.mode, img.size) == ("RGB", (width, height))
        decoded = np.asarray(img)
    expected = _palette(counts.reshape(-1), max_iter).reshape(height, width, 3)
    assert np.array_equal(decoded, expected)
    assert np.array_equal(colourize(counts, max_iter), expected)
    scanlines = zlib.decompress(_idat(png))  # raises if the combined Adler-32 were wrong
    assert len(scanlines) == height * (1 + 3 * width)
    assert scanlines[:: 1 + 3 * width] == bytes(height), "every row has filter type 0"


def test_the_bytes_do_not_depend_on_the_threads() -> None:
    counts = np.random.default_rng(5).integers(0, 256, size=(2 * BAND_ROWS + 3, 40, 3), dtype=np.uint8)

    def rows(start: int, stop: int) -> np.ndarray:
        out: np.ndarray = counts[start:stop].reshape(stop - start, -1)
        return out

    files = []
    for threads in (1, 2, 4):
        buf = io.BytesIO()
        write_png(buf, 40, counts.shape[0], rows, threads=threads)
        files.append(buf.getvalue())
    assert files[0] == files[1] == files[2]
    with Image.open(io.BytesIO(files[0])) as img:
        assert np.array_equal(np.asarray(img), counts)


def test_adler32_combine_is_zlibs() -> None:
    rng = random.Random(3)
    cases = [(b"", b""), (b"a", b""), (b"", b"b"), (b"\xff" * 70_000, b"\xff" * 70_000)]
    cases += [(rng.randbytes(rng.randrange(6000)), rng.randbytes(rng.randrange(90_000))) for _ in range(50)]
    for a, b in cases:
        assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


def test_an_empty_image_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        write_png(io.BytesIO(), 0, 3, lambda a, b: np.zeros((b - a, 0), np.uint8))
