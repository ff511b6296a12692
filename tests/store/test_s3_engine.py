"""The S3 engine the tests run against gives every guarantee repofs relies on.

repofs's S3 repositories assume exclusive create (If-None-Match: *) as the commit point,
read-after-write and list-after-write consistency, exact ranged GETs, atomic overwrite and a
sane clock; engines have had bugs exactly there, under concurrency. These tests prove it
against the real server (SeaweedFS) before any repofs test depends on it, and record the error
codes repofs maps to one-line messages.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import botocore.exceptions
import pytest

from tests.support.s3server import S3Server

MiB = 1 << 20


def _error(err: botocore.exceptions.ClientError) -> tuple[int, str]:
    return err.response["ResponseMetadata"]["HTTPStatusCode"], err.response["Error"]["Code"]


def _client_error(call: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(*args, **kwargs)
    return _error(info.value)


@pytest.fixture
def s3(s3_server: S3Server) -> Any:
    return s3_server.client(max_pool_connections=32)


class TestExclusiveCreate:
    def test_existing_key_is_refused_and_left_intact(self, s3: Any, s3_bucket: str) -> None:
        """A PUT with If-None-Match: * on an existing key fails 412 and the old body stays."""
        s3.put_object(Bucket=s3_bucket, Key="log/c-1", Body=b"first", IfNoneMatch="*")
        status, code = _client_error(
            s3.put_object, Bucket=s3_bucket, Key="log/c-1", Body=b"second", IfNoneMatch="*"
        )
        assert (status, code) == (412, "PreconditionFailed")
        assert s3.get_object(Bucket=s3_bucket, Key="log/c-1")["Body"].read() == b"first"

    def test_key_can_be_created_again_after_delete(self, s3: Any, s3_bucket: str) -> None:
        """After a DELETE, an exclusive create of the same key succeeds with the new body."""
        s3.put_object(Bucket=s3_bucket, Key="leases/x", Body=b"old", IfNoneMatch="*")
        s3.delete_object(Bucket=s3_bucket, Key="leases/x")
        s3.put_object(Bucket=s3_bucket, Key="leases/x", Body=b"new", IfNoneMatch="*")
        assert s3.get_object(Bucket=s3_bucket, Key="leases/x")["Body"].read() == b"new"

    def test_racing_creators_have_exactly_one_winner(
        self, s3_server: S3Server, s3_bucket: str
    ) -> None:
        """16 threads racing per key, 6 keys at once: one creator wins each, its body whole."""
        # All keys race at the same time: SeaweedFS makes a conditional PUT that finds the key
        # locked wait in 1 s steps, so one key after another would take ~5 s each.
        writers = 16
        sizes = [100, 4096, 64 * 1024, 1 * MiB, 3 * MiB + 17, 5 * MiB]
        s3 = s3_server.client(max_pool_connections=writers * len(sizes))
        bodies = {
            f"log/c-race-{k}": [i.to_bytes(2, "big") + os.urandom(size - 2) for i in range(writers)]
            for k, size in enumerate(sizes)
        }
        barrier = threading.Barrier(writers * len(sizes))

        def create(job: tuple[str, int]) -> tuple[str, int, str]:
            key, i = job
            barrier.wait()
            try:
                s3.put_object(Bucket=s3_bucket, Key=key, Body=bodies[key][i], IfNoneMatch="*")
            except botocore.exceptions.ClientError as err:
                status, code = _error(err)
                return key, i, f"{status} {code}"
            return key, i, "ok"

        jobs = [(key, i) for key in bodies for i in range(writers)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            outcomes = list(pool.map(create, jobs))
        for key, versions in bodies.items():
            counts = Counter(outcome for k, _, outcome in outcomes if k == key)
            assert counts == {"ok": 1, "412 PreconditionFailed": writers - 1}, (key, counts)
            winner = next(i for k, i, outcome in outcomes if k == key and outcome == "ok")
            stored = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            assert stored == versions[winner], key


class TestReadAfterWrite:
    def test_get_head_and_delete_see_the_latest_write(self, s3: Any, s3_bucket: str) -> None:
        """GET right after PUT returns the new body, HEAD its size, GET after DELETE is 404."""
        for i, size in enumerate([0, 1, 4095, 4 * MiB - 1, 4 * MiB + 1, 3 * MiB] * 3):
            body = os.urandom(size)
            s3.put_object(Bucket=s3_bucket, Key="packs/ab/obj", Body=body)
            assert s3.get_object(Bucket=s3_bucket, Key="packs/ab/obj")["Body"].read() == body, i
            head = s3.head_object(Bucket=s3_bucket, Key="packs/ab/obj")
            assert head["ContentLength"] == size
        s3.delete_object(Bucket=s3_bucket, Key="packs/ab/obj")
        status, code = _client_error(s3.get_object, Bucket=s3_bucket, Key="packs/ab/obj")
        assert (status, code) == (404, "NoSuchKey")
        status, code = _client_error(s3.head_object, Bucket=s3_bucket, Key="packs/ab/obj")
        assert status == 404  # HEAD has no body: botocore reports the code as "404"

    def test_concurrent_writers_each_read_their_own_write(self, s3: Any, s3_bucket: str) -> None:
        """16 threads each PUT then GET their own keys: every GET returns the body just PUT."""

        def work(t: int) -> int:
            bad = 0
            for i in range(15):
                body = os.urandom(1000 + 37 * i)
                key = f"log/f-{t:02d}-{i % 3}"
                s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
                bad += s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() != body
            return bad

        with ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(work, range(16))) == 0


def _list_all(s3: Any, bucket: str, **kwargs: Any) -> tuple[list[str], int]:
    keys: list[str] = []
    pages = 0
    token: str | None = None
    while True:
        args = dict(kwargs, Bucket=bucket)
        if token:
            args["ContinuationToken"] = token
        page = s3.list_objects_v2(**args)
        pages += 1
        keys += [obj["Key"] for obj in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys, pages
        token = page["NextContinuationToken"]


class TestListAfterWrite:
    def test_listing_sees_put_and_delete_at_once(self, s3: Any, s3_bucket: str) -> None:
        """A key is listed right after its PUT returns and gone right after its DELETE returns."""

        def work(t: int) -> list[str]:
            problems = []
            for i in range(10):
                key = f"repo/log/c-{t:02d}{i:02d}"
                s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
                listed, _ = _list_all(s3, s3_bucket, Prefix="repo/log/")
                if key not in listed:
                    problems.append(f"{key} missing after PUT")
                s3.delete_object(Bucket=s3_bucket, Key=key)
                listed, _ = _list_all(s3, s3_bucket, Prefix="repo/log/")
                if key in listed:
                    problems.append(f"{key} listed after DELETE")
            return problems

        with ThreadPoolExecutor(8) as pool:
            assert [p for ps in pool.map(work, range(8)) for p in ps] == []

    def test_large_listing_pages_in_order(self, s3: Any, s3_bucket: str) -> None:
        """Over 1000 keys page by continuation token, sorted bytewise; Prefix, StartAfter work."""
        keys = [
            f"repo/packs/{i % 7:02x}/{hashlib.md5(str(i).encode()).hexdigest()}.pack"
            for i in range(700)
        ]
        keys += [f"repo/log/f-{i:016x}-{i * 7919:032x}" for i in range(500)]
        keys += ["repo/config.json", "repo/key", "repo/log/c-" + "0" * 64, "other/x"]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=s3_bucket, Key=k, Body=b""), keys))

        listed, pages = _list_all(s3, s3_bucket)
        assert listed == sorted(keys)
        assert pages == 2  # MaxKeys defaults to 1000
        listed, pages = _list_all(s3, s3_bucket, Prefix="repo/", MaxKeys=250)
        assert listed == sorted(k for k in keys if k.startswith("repo/"))
        assert pages == 5
        after = sorted(keys)[600]
        listed, _ = _list_all(s3, s3_bucket, Prefix="repo/log/", StartAfter=after)
        assert listed == sorted(k for k in keys if k.startswith("repo/log/") and k > after)
        after = "repo/packs/03/" + "f" * 32
        listed, _ = _list_all(s3, s3_bucket, Prefix="repo/packs/", StartAfter=after)
        assert listed == sorted(k for k in keys if k.startswith("repo/packs/") and k > after)
        listed, _ = _list_all(s3, s3_bucket, Prefix="repo/log/c-")
        assert listed == ["repo/log/c-" + "0" * 64]

    # SeaweedFS stores keys as filer paths and lists depth-first: "p/a/b" comes before "p/a-b"
    # ('-' < '/'), and StartAfter="p/a" skips everything under "p/a/". repofs's layout has no
    # two siblings where one is "D/..." and the other "D" + a byte below "/" (hex names,
    # c-/f- in log/, fixed directory names), so it is not affected; see the test above.
    CLASHING = ["p/a-b", "p/a.b", "p/a/b", "p/a/c/d", "p/a/x-y", "p/a/x/z", "p/a0", "p/a", "p/b"]

    @pytest.mark.xfail(strict=True, reason="SeaweedFS lists depth-first, not bytewise")
    def test_order_is_bytewise_across_directory_boundaries(self, s3: Any, s3_bucket: str) -> None:
        """Keys that sort around "/" ("a-b" < "a.b" < "a/b" < "a0") list in S3's bytewise order."""
        for key in self.CLASHING:
            s3.put_object(Bucket=s3_bucket, Key=key, Body=b"")
        listed, _ = _list_all(s3, s3_bucket, Prefix="p/")
        assert listed == sorted(self.CLASHING)

    def test_token_paging_lists_every_key_once_even_when_names_clash(
        self, s3: Any, s3_bucket: str
    ) -> None:
        """Continuation-token paging one key at a time returns each key exactly once."""
        for key in self.CLASHING:
            s3.put_object(Bucket=s3_bucket, Key=key, Body=b"")
        listed, pages = _list_all(s3, s3_bucket, Prefix="p/", MaxKeys=1)
        assert sorted(listed) == sorted(self.CLASHING)
        assert pages >= len(self.CLASHING)


class TestRangedGet:
    SIZE = 20 * MiB + 12345

    @pytest.fixture
    def blob(self, s3: Any, s3_bucket: str) -> bytes:
        body = os.urandom(self.SIZE)
        s3.put_object(Bucket=s3_bucket, Key="packs/00/blob.pack", Body=body)
        return body

    def _get(self, s3: Any, bucket: str, spec: str) -> tuple[bytes, str]:
        resp = s3.get_object(Bucket=bucket, Key="packs/00/blob.pack", Range=spec)
        return resp["Body"].read(), resp.get("ContentRange", "")

    def test_ranges_return_exactly_their_bytes(self, s3: Any, s3_bucket: str, blob: bytes) -> None:
        """bytes=a-b returns exactly bytes a..b, at the start, end, and across 4/8 MiB seams."""
        n = self.SIZE
        spans = [
            (0, 0),
            (0, 99),
            (n - 1, n - 1),
            (n - 4096, n - 1),
            (8 * MiB - 10, 8 * MiB + 10),
            (4 * MiB - 1, 4 * MiB),
            (3 * MiB, 13 * MiB - 1),
            (12345, 12345 + 4095),
            (0, n - 1),
        ]
        for a, b in spans:
            data, content_range = self._get(s3, s3_bucket, f"bytes={a}-{b}")
            assert data == blob[a : b + 1], (a, b)
            assert content_range == f"bytes {a}-{b}/{n}"

    def test_suffix_open_and_overlong_ranges(self, s3: Any, s3_bucket: str, blob: bytes) -> None:
        """bytes=-N gives the last N bytes, bytes=a- the rest, and an end past the size is cut."""
        n = self.SIZE
        assert self._get(s3, s3_bucket, "bytes=-1")[0] == blob[-1:]
        data, content_range = self._get(s3, s3_bucket, "bytes=-65536")
        assert data == blob[-65536:]
        assert content_range == f"bytes {n - 65536}-{n - 1}/{n}"
        assert self._get(s3, s3_bucket, f"bytes={n - 100}-")[0] == blob[-100:]
        assert self._get(s3, s3_bucket, f"bytes={n - 10}-{n + 1000}")[0] == blob[-10:]

    def test_range_past_the_end_is_416(self, s3: Any, s3_bucket: str, blob: bytes) -> None:
        """A range starting at or past the size fails with 416 InvalidRange."""
        status, code = _client_error(
            s3.get_object,
            Bucket=s3_bucket,
            Key="packs/00/blob.pack",
            Range=f"bytes={self.SIZE}-{self.SIZE + 10}",
        )
        assert (status, code) == (416, "InvalidRange")

    def test_parallel_random_ranges(self, s3: Any, s3_bucket: str, blob: bytes) -> None:
        """16 threads of random ranged GETs all get exactly the bytes they asked for."""

        def work(seed: int) -> int:
            rng = __import__("random").Random(seed)
            bad = 0
            for _ in range(25):
                a = rng.randrange(self.SIZE)
                b = min(self.SIZE - 1, a + rng.choice([0, 4095, 65535, 1 * MiB]))
                bad += self._get(s3, s3_bucket, f"bytes={a}-{b}")[0] != blob[a : b + 1]
            return bad

        with ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(work, range(16))) == 0


class TestOverwrite:
    def test_readers_see_old_or_new_body_whole(self, s3: Any, s3_bucket: str) -> None:
        """While one key is overwritten again and again, every GET returns one whole version."""
        size = 5 * MiB  # several 4 MiB chunks in SeaweedFS
        key = "repo/config.json"
        versions: dict[str, int] = {}
        first = os.urandom(size)
        versions[hashlib.sha256(first).hexdigest()] = 0
        s3.put_object(Bucket=s3_bucket, Key=key, Body=first)
        stop = threading.Event()
        seen: Counter[int | str] = Counter()
        lock = threading.Lock()

        def writer() -> None:
            for i in range(1, 16):
                body = os.urandom(size)
                with lock:
                    versions[hashlib.sha256(body).hexdigest()] = i
                s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
            stop.set()

        def reader() -> None:
            while not stop.is_set():
                digest = hashlib.sha256(
                    s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
                ).hexdigest()
                with lock:
                    seen[versions.get(digest, "torn")] += 1

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(writer)] + [pool.submit(reader) for _ in range(4)]
            for future in futures:
                future.result()
        assert "torn" not in seen, seen
        assert len(seen) > 1  # the readers did overlap the overwrites


class TestClock:
    def test_last_modified_is_close_to_our_clock(self, s3: Any, s3_bucket: str) -> None:
        """LastModified from LIST and HEAD is within a few seconds of this machine's clock."""
        before = dt.datetime.now(dt.UTC)
        s3.put_object(Bucket=s3_bucket, Key="leases/clock", Body=b"x")
        after = dt.datetime.now(dt.UTC)
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="leases/")["Contents"][0]
        head = s3.head_object(Bucket=s3_bucket, Key="leases/clock")
        slack = dt.timedelta(seconds=2)
        for stamp in (listed["LastModified"], head["LastModified"]):
            assert before - slack <= stamp <= after + slack, (before, stamp, after)


class TestErrors:
    def test_missing_bucket(self, s3: Any) -> None:
        """A missing bucket is 404: NoSuchBucket on LIST/GET/PUT, a bare 404 on HEAD."""
        assert _client_error(s3.head_bucket, Bucket="repofs-no-such-bucket") == (404, "404")
        assert _client_error(s3.list_objects_v2, Bucket="repofs-no-such-bucket") == (
            404,
            "NoSuchBucket",
        )
        assert _client_error(s3.get_object, Bucket="repofs-no-such-bucket", Key="k") == (
            404,
            "NoSuchBucket",
        )

    def test_wrong_credentials(self, s3_server: S3Server, s3_bucket: str) -> None:
        """A wrong secret is 403 SignatureDoesNotMatch, an unknown key id 403 InvalidAccessKeyId."""
        wrong_secret = s3_server.client(secret_key="not-the-secret", retries=0)
        unknown_id = s3_server.client(access_key="nobody", secret_key="x", retries=0)
        for client, code in (
            (wrong_secret, "SignatureDoesNotMatch"),
            (unknown_id, "InvalidAccessKeyId"),
        ):
            assert _client_error(client.list_objects_v2, Bucket=s3_bucket) == (403, code)
            assert _client_error(client.get_object, Bucket=s3_bucket, Key="k") == (403, code)
            assert _client_error(
                client.put_object, Bucket=s3_bucket, Key="k", Body=b"", IfNoneMatch="*"
            ) == (403, code)
            assert _client_error(client.head_bucket, Bucket=s3_bucket) == (403, "403")

    def test_unreachable_endpoint(self, s3_server: S3Server) -> None:
        """Nothing listening at the endpoint: botocore raises EndpointConnectionError."""
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = s3_server.client(endpoint=f"http://127.0.0.1:{port}", retries=0)
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            client.list_objects_v2(Bucket="repofs-any")


class TestCrash:
    def test_acknowledged_writes_survive_a_kill(self, own_s3_server: S3Server) -> None:
        """PUTs acknowledged before SIGKILL survive a restart; exclusive create still holds."""
        server = own_s3_server
        bucket = server.create_bucket("repofs-crash")
        s3 = server.client()
        bodies = {f"packs/{i:02x}/p.pack": os.urandom(i * 300_000 + 1) for i in range(12)}
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), bodies.items()
                )
            )
        s3.put_object(Bucket=bucket, Key="log/c-1", Body=b"commit", IfNoneMatch="*")
        server.kill()
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            server.client(retries=0).list_objects_v2(Bucket=bucket)
        server.start()
        for key, body in bodies.items():
            assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body
        listed, _ = _list_all(s3, bucket)
        assert listed == sorted([*bodies, "log/c-1"])
        assert _client_error(
            s3.put_object, Bucket=bucket, Key="log/c-1", Body=b"other", IfNoneMatch="*"
        ) == (412, "PreconditionFailed")
