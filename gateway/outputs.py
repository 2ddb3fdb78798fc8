"""`GET /jobs/<id>/outputs/<name>`: a finished job's output file over HTTP, for the operator.

Under compose the outputs live in the aggregator's data volume, which the gateway mounts
read-only; `processdistro result` on another machine fetches them here with the operator's
token (`gateway/operator.py`). What may be served is narrow on purpose:

- only with the operator's token (401 without one, 403 with a wrong one);
- only a name the job recorded as an output role (`JobRecord.outputs`: `image`, `raw`, ...),
  never a path from the request;
- only a file that resolves (symlinks followed) under the gateway's data directory
  (`Settings.data_path`): a record naming anything else is not served.

The file is streamed (starlette's `FileResponse`: chunked reads, `Content-Length`, a
content type guessed from the name), so a large output never sits in memory.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..shared.jobs import JobState
from ..shared.settings import Settings
from ..shared.store.gateway import GatewayStore
from .operator import NEED_TOKEN, is_operator, presented_token

log = logging.getLogger(__name__)

mimetypes.add_type("application/x-npy", ".npy")
mimetypes.add_type("application/x-ndjson", ".jsonl")


def servable(path: str, data_dir: Path) -> Path | None:
    """The recorded output `path` as a file under `data_dir` (both resolved), else None."""
    try:
        root = data_dir.resolve()
        target = Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def output_routes(settings: Settings, store: GatewayStore) -> list[Route]:
    """The route to mount in the gateway's app."""

    async def output(request: Request) -> Response:
        if not is_operator(request, settings.operator_token):
            status = 403 if presented_token(request) else 401
            return JSONResponse({"error": NEED_TOKEN}, status_code=status)
        job_id, name = request.path_params["job"], request.path_params["name"]
        job = await store.job_record(job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id!r}"}, status_code=404)
        if job.state is not JobState.DONE:
            return JSONResponse({"error": f"job {job_id} is {job.state.value}, no outputs yet"}, status_code=409)
        recorded = job.outputs.get(name)
        if recorded is None:
            roles = ", ".join(sorted(job.outputs)) or "none"
            return JSONResponse({"error": f"job {job_id} has no output {name!r} (it has: {roles})"}, status_code=404)
        path = servable(recorded, settings.data_path)
        if path is None:
            log.warning(
                "output %s of job %s not served: %s is not a file under %s", name, job_id, recorded, settings.data_path
            )
            return JSONResponse(
                {"error": f"output {name!r} of job {job_id} is not in this gateway's data directory"}, status_code=404
            )
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        log.info("output %s of job %s served (%d bytes)", name, job_id, path.stat().st_size)
        return FileResponse(path, media_type=media, filename=path.name, headers={"Cache-Control": "private, no-store"})

    return [Route("/jobs/{job:str}/outputs/{name:str}", output)]
