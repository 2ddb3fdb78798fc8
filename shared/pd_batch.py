"""Batches of pd-ABI inputs: many small inputs in one subtask, run by a node in one call into
the module when it exports `pd_run_batch` (docs/wasm-abi.md, "Batches"). Defined here once;
`worker/runtime.py` (native) and `static/js/wasm_worker.js` (browser) implement the node's
side, `shared/tasks/wasm.py` the controller's.

Batch input, the bytes a node gets (little-endian)::

    b"PDBAT1\\xf8\\xff"                    magic, 8 bytes
    u32 count, count x (u32 n, n bytes)   the inputs, in order; exactly filling the input

Batch output, the bytes a node gives back::

    u32 count, count x (u32 status, u32 n, n bytes)   per input: pd_run's status and output

`n` is 0 when `status` is not 0. An input whose status is 3 (out of memory) fails the whole
subtask on the node instead (`MemoryCapReached`), as it fails a one-input subtask: a node with
a larger memory cap may finish it. The magic, read as a float64, is a NaN and, read as the
first u32 or byte, no valid `matrix_mul` dtype or `password_hash` mode, so no valid input of a
built-in kernel looks like a batch. A node runs an input as a batch only when the module is
pd-ABI and the input is well formed (magic and exact lengths); anything else is one input.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

MAGIC = b"PDBAT1\xf8\xff"
_U32 = struct.Struct("<I")
_ENTRY = struct.Struct("<II")
STATUS_OUT_OF_MEMORY = 3


class BatchError(ValueError):
    """Bytes that are not a well-formed batch output of the expected size."""


def encode_batch(items: Sequence[bytes]) -> bytes:
    """The batch input holding `items` in order."""
    parts = [MAGIC, _U32.pack(len(items))]
    for item in items:
        parts.append(_U32.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def split_batch(data: bytes | bytearray | memoryview) -> list[memoryview] | None:
    """The inputs of a well-formed batch input (views into `data`), or None when `data` is
    not one (then it is a single input, as it is)."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + 4 or bytes(view[: len(MAGIC)]) != MAGIC:
        return None
    (count,) = _U32.unpack_from(view, len(MAGIC))
    at = len(MAGIC) + 4
    items: list[memoryview] = []
    for _ in range(count):
        if len(view) - at < 4:
            return None
        (n,) = _U32.unpack_from(view, at)
        if len(view) - at - 4 < n:
            return None
        items.append(view[at + 4 : at + 4 + n])
        at += 4 + n
    return items if at == len(view) else None


def encode_results(results: Sequence[tuple[int, bytes]]) -> bytes:
    """The batch output of `(status, output)` per input (what `pd_run_batch` returns)."""
    parts = [_U32.pack(len(results))]
    for status, out in results:
        parts.append(_ENTRY.pack(status, len(out)))
        parts.append(out)
    return b"".join(parts)


def decode_results(data: bytes | bytearray | memoryview, expected: int | None = None) -> list[tuple[int, bytes]]:
    """`(status, output)` of each input of a batch output; BatchError if it is malformed, or
    does not hold `expected` inputs, or an input failed yet has output bytes."""
    view = memoryview(data)
    if len(view) < 4:
        raise BatchError(f"a batch output is at least 4 bytes, got {len(view)}")
    (count,) = _U32.unpack_from(view, 0)
    if expected is not None and count != expected:
        raise BatchError(f"a batch output of {count} results, expected {expected}")
    if count > (len(view) - 4) // _ENTRY.size:
        raise BatchError(f"a batch output of {len(view)} bytes cannot hold {count} results")
    at = 4
    out: list[tuple[int, bytes]] = []
    unpack = _ENTRY.unpack_from
    for _ in range(count):
        if len(view) - at < _ENTRY.size:
            raise BatchError("a batch output ends inside a result's header")
        status, n = unpack(view, at)
        at += _ENTRY.size
        if len(view) - at < n:
            raise BatchError("a batch output ends inside a result")
        if status != 0 and n:
            raise BatchError(f"a failed result (status {status}) with {n} output bytes")
        out.append((status, bytes(view[at : at + n])))
        at += n
    if at != len(view):
        raise BatchError(f"{len(view) - at} bytes after the last result of a batch output")
    return out


__all__ = ["MAGIC", "BatchError", "decode_results", "encode_batch", "encode_results", "split_batch"]
