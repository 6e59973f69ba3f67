"""A local Google Cloud Storage for the bucket-workdir tests: gcp-storage-emulator (the `test` extra).

`running_emulator()` starts this file as a subprocess on a free port with one bucket, in memory,
waits until it answers and yields an `Emulator`: the bucket URL and the environment that points
every client at it (gcsfs / etils.epath, google-cloud-storage for tensorboardX, TensorStore for
Orbax). The environment is also set in this process while the emulator runs.

Run as a script, it serves the emulator with three gaps to GCS closed: downloads carry
`x-goog-generation` and the generation preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`)
of downloads and uploads are checked (412 Precondition Failed, 304 Not Modified), which Orbax's
TensorStore and the workdir lock rely on; and objects.move (`.../o/<name>/moveTo/o/<name>`), which
gcsfs tries first for every rename (without it, each rename waits out gcsfs's retries of a 501).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator

from helpers import free_port

BUCKET = "pl-dpo-test"  # TensorStore checks GCS's naming rules (3-63 characters, lower case)


@dataclasses.dataclass(frozen=True)
class Emulator:
    url: str  # gs://<bucket>
    endpoint: str  # http://localhost:<port>
    env: dict[str, str]  # what a subprocess needs on top of its environment
    stop: Callable[[], None]  # kills the server: the storage goes away, as a bucket out of reach does


@contextlib.contextmanager
def running_emulator(bucket: str = BUCKET, timeout: float = 30.0) -> Iterator[Emulator]:
    port = free_port()
    endpoint = f"http://localhost:{port}"
    # Its log goes to a file: a pipe nobody reads would fill up and stop the server mid-run.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--port={port}", f"--bucket={bucket}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    proc.wait()
                    log.seek(0)
                    raise RuntimeError(f"the storage emulator did not start: {log.read()[-2000:]}") from None
                time.sleep(0.1)
        env = {
            "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs and google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": endpoint,  # Orbax's TensorStore
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            # gcsfs would ask the storage-control API (absent here) for the bucket type.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield Emulator(url=f"gs://{bucket}", endpoint=endpoint, env=env, stop=proc.kill)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ----------------------------------------------------------------------------- the server


def _serve(port: int, bucket: str) -> None:
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def generation(storage, bucket_name: str, name: str) -> int:
        try:
            return int(storage.get_file_obj(bucket_name, name)["generation"])
        except NotFound:
            return 0  # GCS: ifGenerationMatch=0 means "does not exist"

    def refused(request, storage, name: str | None, not_match_status: HTTPStatus) -> HTTPStatus | None:
        q = request.query
        if name is None or not ({"ifGenerationMatch", "ifGenerationNotMatch"} & set(q)):
            return None
        gen = generation(storage, request.params["bucket_name"], name)
        if "ifGenerationMatch" in q and int(q["ifGenerationMatch"][0]) != gen:
            return HTTPStatus.PRECONDITION_FAILED
        if "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"][0]) == gen:
            return not_match_status
        return None

    original_download, original_insert = objects.download, objects.insert

    def download(request, response, storage, *args, **kwargs):
        status = refused(request, storage, request.params["object_id"], HTTPStatus.NOT_MODIFIED)
        if status is not None:
            response.status = status
            return None
        out = original_download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            gen = generation(storage, request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(gen)
        return out

    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name", [None])[0]
        if name is None and "upload_id" not in request.query and isinstance(request.data, dict):
            name = (request.data.get("meta") or request.data).get("name")  # multipart / resumable start
        status = refused(request, storage, name, HTTPStatus.PRECONDITION_FAILED)
        if status is not None:
            response.status = status
            return None
        return original_insert(request, response, storage, *args, **kwargs)

    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original_download:
                handlers[method] = download
            elif handler is original_insert:
                handlers[method] = insert
    # `objects.get` serves `?alt=media` through the module's `download`; the router falls back to `insert`.
    objects.download, objects.insert = download, insert

    def move(request, response, storage, *args, **kwargs):
        p = request.params
        try:
            moved = objects._copy(
                request.base_url, storage, p["bucket_name"], p["object_id"], p["bucket_name"], p["dest_object_id"]
            )
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        objects._delete(storage, p["bucket_name"], p["object_id"])
        response.json(moved)

    route = r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
    server.HANDLERS = ((route, {"POST": move}), *server.HANDLERS)
    server.Server("localhost", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", default=BUCKET)
    args = parser.parse_args()
    if os.environ.get("GCS_EMULATOR_LOG"):  # every request on stderr
        import logging

        logging.basicConfig(level=logging.INFO)
    _serve(args.port, args.bucket)
