"""Cold/shared tier: an S3-compatible object store through boto3 (AWS, MinIO, Ceph, ...).

URL: s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1. Credentials come from the usual
AWS sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles). Objects above
`multipart_bytes` go up in parallel parts; batched lookups and reads run on a small thread pool. Space is
the store's business (bucket lifecycle rules).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from kvshelf.codecs import Codec
from kvshelf.errors import ConfigError
from kvshelf.metrics import Metrics
from kvshelf.storage.auth import ObjectAuth
from kvshelf.storage.serialized import ByteStore, ObjectTooLarge

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> dict:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"remote_url: {url!r} is not of the form s3://bucket/prefix?endpoint=URL")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise ConfigError(f"remote_url: unknown S3 option(s) {sorted(unknown)}; known: endpoint, region")
    prefix = parts.path.strip("/")
    return {
        "bucket": parts.netloc,
        "prefix": f"{prefix}/" if prefix else "",
        "endpoint_url": query.get("endpoint"),
        "region": query.get("region"),
    }


def _content_total(resp: dict) -> int | None:
    """The object's size from a GET's Content-Range ("bytes a-b/total") or Content-Length; None if unknown."""
    rng = resp.get("ContentRange") or ""
    total = rng.rpartition("/")[2]
    if total.isdigit():
        return int(total)
    return None if rng else resp.get("ContentLength")


class S3Backend(ByteStore):
    name = "s3"

    def __init__(
        self,
        bucket: str,
        codec: Codec,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_bytes: int = 16 << 20,
        concurrency: int = 8,
        timeout_s: float = 5.0,
        auth: ObjectAuth | None = None,
        metrics: Metrics | None = None,
    ):
        super().__init__(codec, auth=auth, metrics=metrics)
        self.bucket = bucket
        self.prefix = prefix
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or "us-east-1",
            config=Config(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=max(10, 2 * concurrency),
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes, max_concurrency=concurrency
        )
        self.multipart_bytes = multipart_bytes
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kvshelf-s3")

    @classmethod
    def from_url(cls, url: str, codec: Codec, **kw) -> S3Backend:
        return cls(codec=codec, **parse_s3_url(url), **kw)

    def _object(self, name: str) -> str:
        return f"{self.prefix}{name}.kvs"

    def _put_bytes(self, name: str, parts: list) -> bool:
        blob = b"".join(parts)
        if len(blob) < self.multipart_bytes:
            self.client.put_object(Bucket=self.bucket, Key=self._object(name), Body=blob)
        else:
            self.client.upload_fileobj(io.BytesIO(blob), self.bucket, self._object(name), Config=self.transfer)
        return True

    def _get_bytes(self, name: str, limit: int) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._object(name))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return None
            raise
        body = resp["Body"]
        size = resp.get("ContentLength")
        if size is not None and size > limit:  # refused on the response headers: the body is never read
            body.close()
            raise ObjectTooLarge(f"object of {size} bytes; no expected chunk is larger than {limit}")
        blob = body.read(limit + 1)  # bounded even where a server sends no length
        body.close()
        if len(blob) > limit:
            raise ObjectTooLarge(f"object is larger than {limit} bytes")
        return blob

    def _get_range(self, name: str, start: int, length: int, limit: int) -> bytes | None:
        """A Range GET; a server that ignores the range (a whole 200 answer) is cut here."""
        if length <= 0:
            return b""
        try:
            resp = self.client.get_object(
                Bucket=self.bucket, Key=self._object(name), Range=f"bytes={start}-{start + length - 1}"
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code in _NOT_FOUND:
                return None
            if code == "InvalidRange":  # the object ends before `start`: the format's checks refuse it
                return b""
            raise
        body = resp["Body"]
        try:
            total = _content_total(resp)
            if total is not None and total > limit:
                raise ObjectTooLarge(f"object of {total} bytes; no expected chunk is larger than {limit}")
            if resp.get("ContentRange"):
                return body.read(length + 1)  # more than asked: the checks refuse it
            blob = body.read(limit + 1)  # no range applied: bounded, then cut
            if len(blob) > limit:
                raise ObjectTooLarge(f"object is larger than {limit} bytes")
            return blob[start : start + length]
        finally:
            body.close()

    def _delete_name(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(name))

    def contains(self, key: bytes) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(self.name_of(key)))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return False
            raise

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        return list(self._pool.map(self.contains, keys))

    def clear(self) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["Key"].endswith(".kvs")]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
