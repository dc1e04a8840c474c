"""Workdir paths: remote URIs survive (pathlib would turn gs://b into gs:/b), local ones resolve."""

from prefjax.paths import as_path, is_remote, upload


def test_remote_uri_is_kept_and_joined():
    p = as_path("gs://bucket/run") / "checkpoints"
    assert str(p) == "gs://bucket/run/checkpoints"
    assert is_remote(p) and not is_remote("/tmp/run")


def test_local_paths_become_absolute_and_upload_copies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(as_path("run")) == str(tmp_path / "run")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    upload(src, "out/export")
    assert (tmp_path / "out" / "export" / "config.json").read_text() == "{}"
