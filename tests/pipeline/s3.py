"""A real S3-compatible server (moto's) on loopback, for `dvc push` / `dvc pull` tests.

DVC talks to S3 from its own subprocesses, which moto's in-process mock (``mock_aws``) cannot
reach, so the tests run moto's HTTP server in a thread on 127.0.0.1 (a free port) and point the
DVC remote at it. The server keeps its buckets in this process's memory: stopping it and
starting it again on the same port brings the same objects back, like an S3 outage that ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from dvc_repo import dvc
from moto.server import ThreadedMotoServer

# moto accepts any credentials; these are the conventional fake ones. They reach DVC through the
# git-ignored .dvc/config.local only, never through a tracked file.
FAKE_KEY_ID = "testing"
FAKE_SECRET = "testing"
REGION = "us-east-1"


class S3Server:
    """moto's S3 server on ``127.0.0.1``; ``port=0`` picks a free port on the first start."""

    def __init__(self, *, port: int = 0) -> None:
        self.port = port
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Serve on the port of the previous start, or on a free port the first time."""
        if self._server is not None:
            return
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        """Stop serving and close the listening socket, so clients get "connection refused"
        (``ThreadedMotoServer.stop`` alone leaves the socket open and clients hang)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()
        if server._server is not None:
            server._server.server_close()

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=FAKE_KEY_ID,
            aws_secret_access_key=FAKE_SECRET,
            region_name=REGION,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in ``bucket``."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """A started :class:`S3Server`, stopped on exit."""
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def use_remote(repo: Path, server: S3Server, url: str, *, name: str = "storage") -> None:
    """Make ``name`` the default DVC remote of ``repo``, stored on ``server``.

    The URL goes to ``.dvc/config`` (tracked, as in the project); the endpoint and the
    credentials go to ``.dvc/config.local`` (git-ignored), as the README tells users to do.
    """
    existing = dvc("remote", "list", cwd=repo).stdout.split()
    if name in existing:
        dvc("remote", "modify", name, "url", url, cwd=repo)
        dvc("remote", "default", name, cwd=repo)
    else:
        dvc("remote", "add", "--default", name, url, cwd=repo)
    point_local_config(repo, server, name=name)


def point_local_config(repo: Path, server: S3Server, *, name: str = "storage") -> None:
    """Endpoint and credentials of remote ``name`` in ``.dvc/config.local`` (a fresh clone
    has none: each user sets their own)."""
    for option, value in (
        ("endpointurl", server.endpoint),
        ("access_key_id", FAKE_KEY_ID),
        ("secret_access_key", FAKE_SECRET),
        ("region", REGION),
    ):
        dvc("remote", "modify", "--local", name, option, value, cwd=repo)
