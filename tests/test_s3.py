"""S3 tier against a real S3-compatible HTTP server (moto in server mode) on loopback."""

import boto3
import pytest
import torch
from helpers import key, make_chunk

from kvshelf.codecs import get_codec
from kvshelf.errors import ConfigError
from kvshelf.storage.s3 import S3Backend, parse_s3_url

RAW = get_codec("none")


@pytest.fixture
def bucket(s3_server, request):
    name = "kv-" + request.node.name.replace("_", "-").lower()[:40]
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=name)
    return name


def make(s3_server, bucket, **kw) -> S3Backend:
    return S3Backend.from_url(f"s3://{bucket}/cache/v1?endpoint={s3_server.endpoint}", RAW, **kw)


def test_round_trip_contains_many_clear(s3_server, bucket):
    b = make(s3_server, bucket)
    chunks = {key(i): make_chunk(seed=i) for i in range(4)}
    for k, c in chunks.items():
        assert b.put(k, c)
    assert b.contains_many([key(0), key(9), key(3)]) == [True, False, True]
    for k, c in chunks.items():
        assert torch.equal(b.get(k).kv, c.kv)
    assert b.get(key(9)) is None
    keys = [o["Key"] for o in b.client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert all(k.startswith("cache/v1/") for k in keys)
    b.clear()
    assert not any(b.contains_many(list(chunks)))
    b.close()


def test_multipart_upload_of_large_chunks(s3_server, bucket):
    b = make(s3_server, bucket, multipart_bytes=5 << 20)  # S3's smallest part size
    c = make_chunk(tokens=256, dim=256, heads=4, layers=6)  # ~12.6 MB: three parts
    b.put(key(1), c)
    head = b.client.head_object(Bucket=bucket, Key=b._object(b.name_of(key(1))))
    assert "-" in head["ETag"]  # multipart objects have an ETag of the form "<md5>-<parts>"
    assert torch.equal(b.get(key(1)).kv, c.kv)
    b.close()


def test_corrupted_object_is_a_miss_and_deleted(s3_server, bucket):
    b = make(s3_server, bucket)
    b.put(key(1), make_chunk())
    name = b._object(b.name_of(key(1)))
    body = bytearray(b.client.get_object(Bucket=bucket, Key=name)["Body"].read())
    body[-3] ^= 0x20
    b.client.put_object(Bucket=bucket, Key=name, Body=bytes(body))
    assert b.get(key(1)) is None and not b.contains(key(1)) and b.corrupt_objects == 1
    b.close()


def test_url_parsing():
    assert parse_s3_url("s3://b/p/q?endpoint=http://h:1&region=eu-west-1") == {
        "bucket": "b",
        "prefix": "p/q/",
        "endpoint_url": "http://h:1",
        "region": "eu-west-1",
    }
    assert parse_s3_url("s3://b")["prefix"] == ""
    with pytest.raises(ConfigError, match="remote_url"):
        parse_s3_url("s3:///nobucket")
    with pytest.raises(ConfigError, match="unknown S3 option"):
        parse_s3_url("s3://b?endpiont=x")
