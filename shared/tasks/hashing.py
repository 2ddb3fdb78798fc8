"""Password hashing: PBKDF2-HMAC-SHA256 over the (password, salt) rows of a CSV.

The CLI (`prepare`) streams the CSV, checks its columns, and cuts the rows into batches of
about `TARGET_TASK_S` of work on a typical node. Each batch is one shared block of records
(layout: docs/wasm-abi.md, `password_hash` mode 0). Two checks, neither of which a node can
tell from work:
- the aggregator recomputes a few *real* rows of each result, chosen at random when the
  result arrives (`spot_positions`, within `CHECK_HMACS` of PBKDF2 work per result), as
  Mandelbrot pixels are recomputed;
- one known-answer row is planted at a random position of each batch (`planted_row`): its
  password and salt take the length of a random real row of the batch and characters drawn
  from the batch's own, so no byte marks it. It costs the controller nothing when checked
  (its key is computed once, at submit), so it catches a node that makes keys up even where
  the spot checks are sampled (`iterations` too large for the budget).
A node that skips work or makes up keys fails one of them, and the batch is never merged.
The output CSV keeps the input order: `id` (or `row`), `salt`, `dk_hex`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ..exceptions import ParamsError
from ..lazy import lazy, lazy_function
from .base import JobFiles, Prepared, Subtask, TaskPlugin, Verdict, keep_or_write, merged

if TYPE_CHECKING:
    import numpy as np
    from numpy.lib.format import open_memmap
else:
    np = lazy("numpy")
    open_memmap = lazy_function("numpy.lib.format", "open_memmap")

HEADER = struct.Struct("<B3xIII")  # mode, padding, iterations, dklen, count
MODE_HASH = 0
TARGET_TASK_S = 1.0
# A node's PBKDF2 time per row over OpenSSL's on this machine, with a 2x margin for slower
# devices: nodes with SIMD128 (every current browser, wasmtime) run password_hash_simd at
# ~0.75x OpenSSL's time per core, the scalar build ~2x (docs/benchmarks.md, Kernels).
WASM_SLOWDOWN = 1.5
MAX_BATCH = 5000
#: The controller's PBKDF2 budget for the spot checks of one result, in HMAC-SHA256 calls
#: (`pbkdf2_cost`): about 50 ms of hashlib on one core. `spot_positions` keeps the expected
#: cost per result at or under it, so no result (and no node) can make an aggregator stall.
CHECK_HMACS = 200_000
#: At most this many real rows (or crack candidates) are recomputed per result.
SPOT_CHECKS = 4


def pbkdf2_cost(iterations: int, dklen: int) -> int:
    """HMAC-SHA256 calls of one PBKDF2-HMAC-SHA256 key: one chain of `iterations` per 32 bytes."""
    return iterations * -(-dklen // 32)


def spot_positions(
    items: int, cost: int, rng: random.Random, *, budget: int = CHECK_HMACS, most: int = SPOT_CHECKS
) -> list[int]:
    """Which of a result's `items` (each `cost` HMAC calls to recompute) the controller
    recomputes: up to `most` of them, chosen by `rng` after the result arrived, as many as
    `budget` pays for; when even one costs more than `budget`, one with probability
    `budget / cost`, so the expected cost per result stays within the budget."""
    if items <= 0:
        return []
    k = min(items, most, budget // max(cost, 1))
    if k == 0 and rng.random() < budget / cost:
        k = 1
    return rng.sample(range(items), k)


def planted_row(rows: list[tuple[bytes, bytes]], rnd: random.Random) -> tuple[bytes, bytes]:
    """A known-answer row shaped like the batch's own `rows` (UTF-8 text, as the CSV gave
    them): the password and salt lengths of one real row picked at random, each character
    drawn from the characters of the batch's passwords (salts) with their frequencies."""
    passwords = "".join(p.decode() for p, _ in rows)
    salts = "".join(s.decode() for _, s in rows)
    like_p, like_s = rnd.choice(rows)
    password = "".join(rnd.choice(passwords) for _ in like_p.decode())
    salt = "".join(rnd.choice(salts) for _ in like_s.decode())
    return password.encode(), salt.encode()


def encode_records(rows: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray()
    for password, salt in rows:
        out += struct.pack("<I", len(password)) + password + struct.pack("<I", len(salt)) + salt
    return bytes(out)


def decode_records(data: bytes, count: int) -> list[tuple[bytes, bytes]]:
    rows, pos = [], 0
    for _ in range(count):
        fields = []
        for _ in range(2):
            (n,) = struct.unpack_from("<I", data, pos)
            fields.append(data[pos + 4 : pos + 4 + n])
            pos += 4 + n
        rows.append((fields[0], fields[1]))
    return rows


def estimate_batch(iterations: int, dklen: int) -> int:
    """Rows per subtask: about TARGET_TASK_S on a node, from this machine's measured speed."""
    probe = max(1, min(iterations, 20_000))
    start = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"probe-password", b"probe-salt", probe, dklen)
    per_row_s = (time.perf_counter() - start) * iterations / probe * WASM_SLOWDOWN
    return max(1, min(MAX_BATCH, int(TARGET_TASK_S / max(per_row_s, 1e-9))))


def _int(raw: dict[str, Any], name: str, default: int) -> int:
    value = raw.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ParamsError(f"{name} must be a whole number, got {value!r}") from None


class HashParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(default=100_000, ge=1, le=100_000_000)
    dklen: int = Field(default=32, ge=1, le=1024)
    rows: int = Field(ge=1)
    has_ids: bool = False
    # per batch: [first row, rows, records block, ids block ("" without ids), ringer position, ringer dk hex]
    batches: list[tuple[int, int, str, str, int, str]]
    source: str = ""


class HashPlugin(TaskPlugin[HashParams]):
    kind = "hash"
    module = "password_hash"
    params_model = HashParams
    adaptive = True

    PARTIAL = "dk.partial.npy"
    RESULT = "hashes.csv"

    def describe(self) -> str:
        return "PBKDF2-HMAC-SHA256 over a CSV of password,salt rows"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", type=Path, required=True, help="CSV with a header: password, salt, optional id")
        parser.add_argument("--iterations", type=int, default=100_000)
        parser.add_argument("--dklen", type=int, default=32)
        parser.add_argument("--batch", type=int, help="rows per subtask (default: about 1 s of work per subtask)")
        parser.add_argument("-o", "--output", type=Path, help="output CSV: id (or row), salt, dk_hex (with --wait)")

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"input": str(args.input), "iterations": args.iterations, "dklen": args.dklen, "batch": args.batch}

    def outputs_from_args(self, args: argparse.Namespace) -> dict[str, Path | None]:
        return {"csv": args.output}

    def prepare(self, raw: dict[str, Any]) -> Prepared:
        path = os.path.expanduser(str(raw["input"]))
        iterations = _int(raw, "iterations", 100_000)
        dklen = _int(raw, "dklen", 32)
        if not 1 <= iterations <= 100_000_000:
            raise ParamsError(f"iterations must be between 1 and 100000000, got {iterations}")
        if not 1 <= dklen <= 1024:
            raise ParamsError(f"dklen must be between 1 and 1024, got {dklen}")
        batch_rows = _int(raw, "batch", 0) or estimate_batch(iterations, dklen)
        if batch_rows < 0:
            raise ParamsError(f"batch must be positive, got {batch_rows}")
        blocks: dict[str, bytes] = {}
        batches: list[tuple[int, int, str, str, int, str]] = []

        def add(data: bytes) -> str:
            sha = hashlib.sha256(data).hexdigest()
            blocks[sha] = data
            return sha

        chooser = random.SystemRandom()

        def flush(start: int, rows: list[tuple[bytes, bytes]], ids: list[str] | None) -> None:
            pos = secrets.randbelow(len(rows) + 1)
            ringer = planted_row(rows, chooser)
            dk = hashlib.pbkdf2_hmac("sha256", ringer[0], ringer[1], iterations, dklen)
            records = add(encode_records(rows[:pos] + [ringer] + rows[pos:]))
            meta = add(json.dumps(ids).encode()) if ids is not None else ""
            batches.append((start, len(rows), records, meta, pos, dk.hex()))

        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise ParamsError(f"{path} is not a file: expected a CSV of password,salt rows")
            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                fields = reader.fieldnames or []
                if "password" not in fields or "salt" not in fields:
                    raise ParamsError(
                        f"{path}: expected a header with columns password and salt (id optional), got {fields}"
                    )
                has_ids = "id" in fields
                rows: list[tuple[bytes, bytes]] = []
                ids: list[str] = []
                total = 0
                for line_no, row in enumerate(reader, start=2):
                    if row["password"] is None or row["salt"] is None:
                        raise ParamsError(f"{path}, line {line_no}: expected {len(fields)} columns, got fewer")
                    rows.append((row["password"].encode(), row["salt"].encode()))
                    ids.append(row.get("id") or "")
                    if len(rows) == batch_rows:
                        flush(total, rows, ids if has_ids else None)
                        total += len(rows)
                        rows, ids = [], []
                if rows:
                    flush(total, rows, ids if has_ids else None)
                    total += len(rows)
        except OSError as exc:
            raise ParamsError(f"cannot read {path}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ParamsError(f"{path} is not UTF-8 text: {exc}") from None
        except csv.Error as exc:
            raise ParamsError(f"{path} is not valid CSV: {exc}") from None
        if total == 0:
            raise ParamsError(f"{path} has a header but no rows")
        params = {
            "iterations": iterations,
            "dklen": dklen,
            "rows": total,
            "has_ids": has_ids,
            "batches": batches,
            "source": path,
        }
        return Prepared(params=params, blocks=blocks)

    def count(self, params: HashParams) -> int:
        return len(params.batches)

    def split(self, params: HashParams, start: int = 0) -> Iterator[Subtask]:
        for _first, rows, records, _meta, _pos, _dk in params.batches[start:]:
            yield Subtask(HEADER.pack(MODE_HASH, params.iterations, params.dklen, rows + 1), (records,))

    def verify(self, params: HashParams, index: int, task_input: bytes, output: bytes, rng: random.Random) -> Verdict:
        _first, rows, _records, _meta, pos, dk_hex = params.batches[index]
        dklen = params.dklen
        if len(output) != (rows + 1) * dklen:
            return Verdict.REJECT
        if output[pos * dklen : (pos + 1) * dklen].hex() != dk_hex:
            return Verdict.REJECT  # the planted row
        records = decode_records(task_input[HEADER.size :], rows + 1)
        for k in spot_positions(rows, pbkdf2_cost(params.iterations, dklen), rng):
            at = k + (k >= pos)  # the k-th real row, past the planted one
            password, salt = records[at]
            key = hashlib.pbkdf2_hmac("sha256", password, salt, params.iterations, dklen)
            if output[at * dklen : (at + 1) * dklen] != key:
                return Verdict.REJECT
        return Verdict.ACCEPT

    def merge(self, files: JobFiles, params: HashParams, index: int, output: bytes) -> None:
        first, rows, _records, _meta, pos, _dk = params.batches[index]
        keys = np.frombuffer(output, dtype=np.uint8).reshape(rows + 1, params.dklen)
        real = np.delete(keys, pos, axis=0)
        out = files.memmap(self.PARTIAL, (params.rows, params.dklen), np.uint8)
        out[first : first + rows] = real
        files.written(out)

    def finalize(self, files: JobFiles, params: HashParams) -> dict[str, str]:
        result = files.path(self.RESULT)
        if result.exists():  # a finalize before wrote it (the keys may be cleaned up since)
            return {"csv": str(result)}
        keys = open_memmap(merged(files.path(self.PARTIAL)), mode="r")

        def write(fh: io.BufferedWriter) -> None:
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
            out = csv.writer(text)
            out.writerow(["id" if params.has_ids else "row", "salt", "dk_hex"])
            for first, rows, records, meta, pos, _dk in params.batches:
                pairs = decode_records(files.read_block(records), rows + 1)
                del pairs[pos]
                ids = json.loads(files.read_block(meta)) if meta else None
                for i, (_password, salt) in enumerate(pairs):
                    label = ids[i] if ids is not None else str(first + i)
                    out.writerow([label, salt.decode(), bytes(keys[first + i]).hex()])
            text.flush()
            text.detach()

        keep_or_write(result, write)  # type: ignore[arg-type]
        return {"csv": str(result)}

    def clean_up(self, files: JobFiles, params: HashParams) -> None:
        files.path(self.PARTIAL).unlink(missing_ok=True)
