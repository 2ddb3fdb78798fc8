"""Crack: search a wordlist for the password behind one PBKDF2-HMAC-SHA256 key.

The wordlist is never read whole: subtask `i` is the lines that *start* in bytes
`[i*chunk, (i+1)*chunk)` of the file, found by a seek, so the scheduler streams any size
and can resume at any subtask after a restart. Every claimed hit is re-hashed on the
controller before it counts; the first one ends the job and cancels what is left. The
scheduler reads the wordlist by path, so it must be where the scheduler runs (with compose:
on the shared data volume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..exceptions import ParamsError
from .base import JobFiles, MergedWorkGone, Prepared, Subtask, TaskPlugin, Verdict, atomic_write, keep_or_write
from .hashing import HEADER, WASM_SLOWDOWN, _int

MODE_CRACK = 1
NO_HIT = 0xFFFFFFFF
RESULT = struct.Struct("<II")  # index of the first hit (or NO_HIT), candidates hashed
TARGET_TASK_S = 1.0
AVG_LINE_BYTES = 10


class CrackParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="hex of the derived key to find")
    salt: str
    iterations: int = Field(default=100_000, ge=1, le=100_000_000)
    wordlist: str
    size: int = Field(ge=1, description="wordlist size in bytes when submitted")
    chunk: int = Field(ge=16, description="bytes of wordlist per subtask")
    ringer_every: int = Field(default=20, ge=0, description="one known-answer task per this many chunks (0: none)")
    ringer_seed: int = 0

    @field_validator("target")
    @classmethod
    def _hex(cls, v: str) -> str:
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise ValueError(f"target must be hex, got {v[:40]!r}") from None
        if not 1 <= len(raw) <= 1024:
            raise ValueError(f"target must be 1 to 1024 bytes, got {len(raw)}")
        return v.lower()

    @property
    def dklen(self) -> int:
        return len(self.target) // 2

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk)

    @property
    def ringers(self) -> int:
        return -(-self.chunks // self.ringer_every) if self.ringer_every else 0

    def ringer(self, index: int) -> tuple[int, random.Random] | None:
        """For a ringer task (the indexes after the chunks): its chunk and its chooser."""
        k = index - self.chunks
        if k < 0:
            return None
        return k * self.ringer_every, random.Random(self.ringer_seed * 1_000_003 + k)


def chunk_lines(fh: BinaryIO, index: int, chunk: int, size: int) -> list[bytes]:
    """The lines of the wordlist that start inside chunk `index` (without line endings)."""
    begin, end = index * chunk, min((index + 1) * chunk, size)
    if begin == 0:
        fh.seek(0)
    else:
        fh.seek(begin - 1)
        if fh.read(1) != b"\n":
            fh.readline()  # the rest of a line that started in the chunk before
    lines = []
    while fh.tell() < end:
        line = fh.readline()
        if not line:
            break
        lines.append(line.rstrip(b"\r\n"))
    return lines


def encode_task(params: CrackParams, candidates: list[bytes], target: bytes | None = None) -> bytes:
    salt = params.salt.encode()
    head = HEADER.pack(MODE_CRACK, params.iterations, params.dklen, len(candidates))
    body = b"".join(struct.pack("<I", len(c)) + c for c in candidates)
    return head + struct.pack("<I", len(salt)) + salt + (target or bytes.fromhex(params.target)) + body


def ringer_answer(params: CrackParams, index: int, candidates: list[bytes]) -> tuple[int, bytes]:
    """The hidden word of ringer task `index`: (first position it appears at, its key)."""
    found = params.ringer(index)
    assert found is not None
    _chunk, chooser = found
    word = candidates[chooser.randrange(len(candidates))]
    key = hashlib.pbkdf2_hmac("sha256", word, params.salt.encode(), params.iterations, params.dklen)
    return candidates.index(word), key


def decode_candidates(params: CrackParams, task_input: bytes) -> list[bytes]:
    _mode, _it, _dklen, count = HEADER.unpack_from(task_input)
    pos = HEADER.size + 4 + len(params.salt.encode()) + params.dklen
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<I", task_input, pos)
        out.append(task_input[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


class CrackPlugin(TaskPlugin[CrackParams]):
    kind = "crack"
    module = "password_hash"
    params_model = CrackParams
    adaptive = True

    RESULT = "crack.json"

    def describe(self) -> str:
        return "search a wordlist for the password behind a PBKDF2 key"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--target", required=True, help="the derived key, hex")
        parser.add_argument("--salt", required=True)
        parser.add_argument("--iterations", type=int, default=100_000)
        parser.add_argument("--wordlist", type=Path, required=True, help="one candidate per line, any size")
        parser.add_argument("--chunk", type=int, help="wordlist bytes per subtask (default: about 1 s of work)")
        parser.add_argument("-o", "--output", type=Path, help="the result summary as JSON (with --wait)")

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {
            "target": args.target,
            "salt": args.salt,
            "iterations": args.iterations,
            "wordlist": str(args.wordlist),
            "chunk": args.chunk,
        }

    def outputs_from_args(self, args: argparse.Namespace) -> dict[str, Path | None]:
        return {"json": args.output}

    def summary(self, outputs: dict[str, str]) -> list[str]:
        found = json.loads(Path(outputs["json"]).read_text())
        first = f"password found: {found['password']}" if found["found"] else "not found: no word of the list matches"
        return [
            first,
            f"{found['candidates_hashed']} candidates hashed, {found['hashed_after_hit']} of them after the hit",
        ]

    def prepare(self, raw: dict[str, Any]) -> Prepared:
        path = Path(os.path.expanduser(str(raw["wordlist"]))).resolve()
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ParamsError(f"cannot read wordlist {path}: {exc}") from None
        if size == 0:
            raise ParamsError(f"wordlist {path} is empty")
        iterations = _int(raw, "iterations", 100_000)
        chunk = _int(raw, "chunk", 0) or self._estimate_chunk(iterations, len(str(raw.get("target", ""))) // 2 or 32)
        params = {
            "target": str(raw.get("target", "")),
            "salt": str(raw.get("salt", "")),
            "iterations": iterations,
            "wordlist": str(path),
            "size": size,
            "chunk": max(16, chunk),
            "ringer_seed": random.SystemRandom().getrandbits(48),
        }
        self.parse_params(params)  # refuse a bad target here, with the model's message
        return Prepared(params=params, blocks={})

    @staticmethod
    def _estimate_chunk(iterations: int, dklen: int) -> int:
        from .hashing import estimate_batch

        return max(16, estimate_batch(iterations, min(dklen, 32)) * AVG_LINE_BYTES)

    def count(self, params: CrackParams) -> int:
        # the chunks, then the known-answer "ringer" tasks: a chunk searched for one of its
        # own words, so a node that claims "no hit" without doing the work is caught
        return params.chunks + params.ringers

    def split(self, params: CrackParams, start: int = 0) -> Iterator[Subtask]:
        with open(params.wordlist, "rb") as fh:
            for index in range(start, self.count(params)):
                ringer = params.ringer(index)
                chunk = ringer[0] if ringer else index
                # an empty chunk (inside one long line) still needs a well-formed task
                lines = chunk_lines(fh, chunk, params.chunk, params.size) or [b""]
                target = ringer_answer(params, index, lines)[1] if ringer else None
                yield Subtask(encode_task(params, lines, target))

    def verify(self, params: CrackParams, index: int, task_input: bytes, output: bytes, rng: random.Random) -> Verdict:
        if len(output) != RESULT.size:
            return Verdict.REJECT
        hit, hashed = RESULT.unpack(output)
        candidates = decode_candidates(params, task_input)
        if params.ringer(index) is not None:
            position, _key = ringer_answer(params, index, candidates)
            return Verdict.ACCEPT if (hit, hashed) == (position, position + 1) else Verdict.REJECT
        if hit == NO_HIT:
            return Verdict.ACCEPT if hashed == len(candidates) else Verdict.REJECT
        if hit >= len(candidates) or hashed != hit + 1:
            return Verdict.REJECT
        key = hashlib.pbkdf2_hmac("sha256", candidates[hit], params.salt.encode(), params.iterations, params.dklen)
        return Verdict.ACCEPT if key.hex() == params.target else Verdict.REJECT

    def merge(self, files: JobFiles, params: CrackParams, index: int, output: bytes) -> None:
        if params.ringer(index) is not None:
            return  # verified; its hit is ours, not the user's
        hit, hashed = RESULT.unpack(output)
        record: dict[str, Any] = {"chunk": index, "hashed": hashed}
        if hit != NO_HIT:
            with open(params.wordlist, "rb") as fh:
                lines = chunk_lines(fh, index, params.chunk, params.size) or [b""]
            record["password"] = lines[hit].decode("utf-8", errors="replace")
            record["line_in_chunk"] = hit
        files.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(files.path(f"chunk-{index:09d}.json"), lambda fh: fh.write(json.dumps(record).encode()))

    def finished_early(self, files: JobFiles, params: CrackParams, index: int, output: bytes) -> bool:
        hit: int = RESULT.unpack(output)[0]
        return hit != NO_HIT and params.ringer(index) is None

    def finalize(self, files: JobFiles, params: CrackParams) -> dict[str, str]:
        result = files.path(self.RESULT)
        if result.exists():  # a finalize before wrote it (the chunk records may be cleaned up since)
            return {"json": str(result)}
        records = [json.loads(p.read_text()) for p in sorted(files.directory.glob("chunk-*.json"))]
        if not records:  # at least the chunk that ended the job is merged: never report "not found" from nothing
            raise MergedWorkGone(f"no merged chunk record under {files.directory}, and no {self.RESULT}")
        hits = [r for r in records if "password" in r]
        first = min(hits, key=lambda r: (r["chunk"], r["line_in_chunk"])) if hits else None
        summary = {
            "found": first is not None,
            "password": first["password"] if first else None,
            "chunk": first["chunk"] if first else None,
            "candidates_hashed": sum(r["hashed"] for r in records),
            "hashed_after_hit": sum(r["hashed"] for r in records if first and r["chunk"] > first["chunk"]),
            "chunks_done": len(records),
            "chunks_total": params.chunks,
        }
        keep_or_write(result, lambda fh: fh.write((json.dumps(summary, indent=2) + "\n").encode()))
        return {"json": str(result)}

    def clean_up(self, files: JobFiles, params: CrackParams) -> None:
        for p in files.directory.glob("chunk-*.json"):
            p.unlink(missing_ok=True)


__all__ = ["CrackPlugin", "WASM_SLOWDOWN"]
