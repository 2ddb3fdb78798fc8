"""One peer system's turn in bench/compare.py, run in the benchmark virtualenv (.bench-venv/,
which has Dask and Ray; the project's own environment does not):

    .bench-venv/bin/python bench/peers_run.py --system dask|ray SPEC.json

SPEC names the module, its sha256, a warm-up input file and the rows (name, input file: N
64-byte tile inputs back to back, output file). The script starts the system on 2 cores
(Dask: `LocalCluster(n_workers=2, threads_per_worker=1)`, `client.map`; Ray:
`ray.init(num_cpus=2)`, remote tasks), runs the warm-up (each worker compiles the module),
then each row, timed from the first submission to the last result in hand; it writes the
outputs back to back in the row's output file and prints one JSON line of timings.

A file with a `__main__` guard: Dask's process workers re-import the main module.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INPUT_BYTES = 64

Mapper = Callable[[list[bytes]], list[bytes]]


def read_inputs(path: str) -> list[bytes]:
    raw = Path(path).read_bytes()
    return [raw[i : i + INPUT_BYTES] for i in range(0, len(raw), INPUT_BYTES)]


def with_dask(module: str, sha: str, body: Callable[[Mapper], dict[str, Any]]) -> dict[str, Any]:
    from dask.distributed import Client, LocalCluster

    from bench.peers_kernel import run_tile

    started = time.perf_counter()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        startup = time.perf_counter() - started

        def mapper(inputs: list[bytes]) -> list[bytes]:
            n = len(inputs)
            futures = client.map(run_tile, [module] * n, [sha] * n, inputs, pure=False)
            return list(client.gather(futures))

        out = body(mapper)
    out["startup_s"] = startup
    return out


def with_ray(module: str, sha: str, body: Callable[[Mapper], dict[str, Any]]) -> dict[str, Any]:
    import ray

    from bench.peers_kernel import run_tile

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        startup = time.perf_counter() - started
        remote = ray.remote(run_tile)

        def mapper(inputs: list[bytes]) -> list[bytes]:
            return list(ray.get([remote.remote(module, sha, data) for data in inputs]))

        out = body(mapper)
    finally:
        ray.shutdown()
    out["startup_s"] = startup
    return out


def main() -> None:
    system, spec_path = sys.argv[sys.argv.index("--system") + 1], sys.argv[-1]
    spec = json.loads(Path(spec_path).read_text())
    # the workers import bench.peers_kernel by name
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(REPO))

    def body(mapper: Mapper) -> dict[str, Any]:
        warm = read_inputs(spec["warmup"])
        t0 = time.perf_counter()
        mapper(warm)
        warmup_s = time.perf_counter() - t0
        rows: dict[str, float] = {}
        for row in spec["rows"]:
            inputs = read_inputs(row["inputs"])
            t0 = time.perf_counter()
            outputs = mapper(inputs)
            rows[row["name"]] = time.perf_counter() - t0
            Path(row["output"]).write_bytes(b"".join(outputs))
        return {"rows": rows, "warmup_s": warmup_s}

    runner = {"dask": with_dask, "ray": with_ray}[system]
    result = runner(spec["module"], spec["sha256"], body)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
