"""Crack: search a wordlist for the password behind one PBKDF2-HMAC-SHA256 key.

The wordlist is never read whole: subtask `i` is the lines that *start* in bytes
`[i*chunk, (i+1)*chunk)` of the file, found by a seek, so the scheduler streams any size
and can resume at any subtask after a restart. The scheduler reads the wordlist by path, so
it must be where the scheduler runs (with compose: on the shared data volume).

Nodes never see the target. A subtask is the kernel's *hash* mode (docs/wasm-abi.md,
`password_hash` mode 0) over the records `(candidate, salt)` with `dklen = prefix` (the
first `PREFIX` bytes of the target's length; a PBKDF2 key with a shorter `dklen` is a prefix
of the longer one), and a node returns one short key prefix per candidate. The controller
compares them with the target, so a node cannot know which candidate is the hit and cannot
hide it selectively; it recomputes a few random candidates of every result
(`hashing.spot_positions`, within `hashing.CHECK_HMACS`), so a node that makes prefixes up
is caught; and a prefix that matches is re-hashed in full before it counts (`first_hit`).
The first hit in list order ends the job and cancels what is left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..exceptions import ParamsError
from .base import JobFiles, MergedWorkGone, Prepared, Subtask, TaskPlugin, Verdict, atomic_write, keep_or_write
from .hashing import HEADER, MODE_HASH, WASM_SLOWDOWN, _int, decode_records, encode_records, pbkdf2_cost, spot_positions

#: Bytes of derived key a node returns per candidate (fewer when the target is shorter):
#: enough that an honest prefix matches by chance once in 2**64 candidates.
PREFIX = 8
TARGET_TASK_S = 1.0
AVG_LINE_BYTES = 10
MAX_CHUNK = 4 * 1024 * 1024


class CrackParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="hex of the derived key to find")
    salt: str
    iterations: int = Field(default=100_000, ge=1, le=100_000_000)
    wordlist: str
    size: int = Field(ge=1, description="wordlist size in bytes when submitted")
    # bounded so that a result (PREFIX bytes per line, 2 bytes at least per line) stays far
    # below the gateway's frame cap (PD_MAX_MESSAGE_BYTES, 32 MiB by default, base64)
    chunk: int = Field(ge=16, le=MAX_CHUNK, description="bytes of wordlist per subtask")

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
    def prefix(self) -> int:
        """Bytes of key per candidate that a node computes and returns."""
        return min(self.dklen, PREFIX)

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk)


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


def read_chunk(params: CrackParams, index: int) -> list[bytes]:
    """Chunk `index`'s candidates; an empty chunk (inside one long line) is one empty word,
    so that it still makes a well-formed task."""
    with open(params.wordlist, "rb") as fh:
        return chunk_lines(fh, index, params.chunk, params.size) or [b""]


def encode_task(params: CrackParams, candidates: list[bytes]) -> bytes:
    """A node's input: `password_hash` mode 0 over `(candidate, salt)`, `dklen = prefix`."""
    salt = params.salt.encode()
    head = HEADER.pack(MODE_HASH, params.iterations, params.prefix, len(candidates))
    return head + encode_records([(c, salt) for c in candidates])


def decode_candidates(task_input: bytes) -> list[bytes]:
    _mode, _it, _dklen, count = HEADER.unpack_from(task_input)
    return [candidate for candidate, _salt in decode_records(task_input[HEADER.size :], count)]


def prefix_matches(params: CrackParams, output: bytes) -> list[int]:
    """Positions whose returned prefix equals the target's (no hashing: bytes compared)."""
    d = params.prefix
    want = bytes.fromhex(params.target)[:d]
    found, at = [], output.find(want)
    while at >= 0:
        if at % d == 0:
            found.append(at // d)
        at = output.find(want, at + 1)
    return found


def first_hit(params: CrackParams, candidates: list[bytes], output: bytes) -> tuple[int | None, bool]:
    """(the first candidate whose full key is the target, or None; whether every prefix
    re-hashed on the way was honest). Matches are re-hashed in order: a dishonest one ends
    the search at once, so a node claiming many matches costs one PBKDF2, not many; an
    honest prefix whose full key differs (a 64-bit coincidence) is not a hit."""
    d = params.prefix
    for p in prefix_matches(params, output):
        key = hashlib.pbkdf2_hmac("sha256", candidates[p], params.salt.encode(), params.iterations, params.dklen)
        if key[:d] != output[p * d : (p + 1) * d]:
            return None, False
        if key.hex() == params.target:
            return p, True
    return None, True


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
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                raise ParamsError(f"wordlist {path} is a directory: expected a file with one candidate per line")
            if not stat.S_ISREG(mode):
                raise ParamsError(f"wordlist {path} is not a regular file: expected one candidate per line")
            with open(path, "rb") as fh:  # readable by us, hence (usually) by the scheduler
                fh.read(1)
                size = os.fstat(fh.fileno()).st_size
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
        }
        self.parse_params(params)  # refuse a bad target here, with the model's message
        return Prepared(params=params, blocks={})

    @staticmethod
    def _estimate_chunk(iterations: int, dklen: int) -> int:
        from .hashing import estimate_batch

        return max(16, estimate_batch(iterations, min(dklen, 32)) * AVG_LINE_BYTES)

    def count(self, params: CrackParams) -> int:
        return params.chunks

    def split(self, params: CrackParams, start: int = 0) -> Iterator[Subtask]:
        with open(params.wordlist, "rb") as fh:
            for index in range(start, self.count(params)):
                # an empty chunk (inside one long line) still needs a well-formed task
                lines = chunk_lines(fh, index, params.chunk, params.size) or [b""]
                yield Subtask(encode_task(params, lines))

    def verify(self, params: CrackParams, index: int, task_input: bytes, output: bytes, rng: random.Random) -> Verdict:
        candidates = decode_candidates(task_input)
        d = params.prefix
        if len(output) != len(candidates) * d:
            return Verdict.REJECT
        _hit, honest = first_hit(params, candidates, output)
        if not honest:
            return Verdict.REJECT  # claimed a match that is not one
        salt = params.salt.encode()
        for p in spot_positions(len(candidates), pbkdf2_cost(params.iterations, d), rng):
            if hashlib.pbkdf2_hmac("sha256", candidates[p], salt, params.iterations, d) != output[p * d : (p + 1) * d]:
                return Verdict.REJECT  # made up (or miscomputed): it could have hidden the hit
        return Verdict.ACCEPT

    def _hit(self, params: CrackParams, index: int, output: bytes) -> tuple[int, bytes] | None:
        """A verified result's first hit and its word (the chunk is read again, and the match
        re-hashed, only when a prefix matches: a hit, bar 64-bit coincidences)."""
        if not prefix_matches(params, output):
            return None
        candidates = read_chunk(params, index)
        hit = first_hit(params, candidates, output)[0]
        return None if hit is None else (hit, candidates[hit])

    def merge(self, files: JobFiles, params: CrackParams, index: int, output: bytes) -> None:
        found = self._hit(params, index, output)
        # `hashed`: the candidates the search needed, as the kernel's mode 1 counts them
        hashed = len(output) // params.prefix if found is None else found[0] + 1
        record: dict[str, Any] = {"chunk": index, "hashed": hashed}
        if found is not None:
            record["password"] = found[1].decode("utf-8", errors="replace")
            record["line_in_chunk"] = found[0]
        files.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(files.path(f"chunk-{index:09d}.json"), lambda fh: fh.write(json.dumps(record).encode()))

    def finished_early(self, files: JobFiles, params: CrackParams, index: int, output: bytes) -> bool:
        return self._hit(params, index, output) is not None

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
