"""key export, import and change-passphrase on a bucket: the ``key`` object, not a file."""

from __future__ import annotations

from pathlib import Path

from tests.maintenance.s3maint import new_s3_repo, second_host
from tests.support.helpers import assert_one_line_error
from tests.support.s3server import S3Server


class TestKeyCommandsOnABucket:
    def test_export_change_passphrase_import_round_trip(
        self, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
    ) -> None:
        """After change-passphrase the old one is refused; a lost key object comes back."""
        r = new_s3_repo(s3_server, s3_bucket, s3_env, tmp_path)
        r.ingest("web")
        exported = tmp_path / "exported.key"
        r.run("key", "export", r.url, str(exported))
        assert exported.read_bytes() == r.get("key")
        r.run("key", "change-passphrase", r.url, env={"REPOFS_NEW_PASSPHRASE": "new one"})
        assert r.get("key") != exported.read_bytes()
        other = second_host(r, tmp_path)  # a host that never unlocked the key
        assert_one_line_error(other.run("list", r.url, check=False), "wrong passphrase")
        assert "web" in other.run("list", r.url, env={"REPOFS_PASSPHRASE": "new one"}).stdout
        r.delete("key")
        assert_one_line_error(other.run("list", r.url, check=False), "key import")
        # The copy exported before the change still needs the old passphrase.
        proc = r.run(
            "key", "import", r.url, str(exported), check=False,
            env={"REPOFS_PASSPHRASE": "new one"},
        )
        assert_one_line_error(proc, "wrong passphrase")
        r.run("key", "import", r.url, str(exported))
        assert r.get("key") == exported.read_bytes()
        assert "web" in other.run("list", r.url).stdout
        assert "no problems found" in other.run("verify", r.url).stdout

    def test_missing_repository_is_one_line(
        self, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
    ) -> None:
        """key export of a prefix that holds no repository: one error line."""
        r = new_s3_repo(s3_server, s3_bucket, s3_env, tmp_path)
        url = f"s3://{s3_bucket}/nothing-here"
        proc = r.run("key", "export", url, str(tmp_path / "k"), check=False)
        assert_one_line_error(proc, "not a repofs repository")
