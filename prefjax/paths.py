"""Workdir paths that may be local or remote (gs://...), through etils.epath (what Orbax uses).

A plain `pathlib.Path` turns `gs://bucket/run` into the local path `gs:/bucket/run`, so every
module that joins workdir paths goes through `as_path`.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URIs with a scheme (gs://, s3://, ...), False for local paths."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: absolute for local paths, the URI itself for remote ones."""
    path = os.fspath(path)
    return epath.Path(path if is_remote(path) else os.path.abspath(path))


def upload(local_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the files of a local folder (one level, as save_hf writes them) into `dest`."""
    dest = as_path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(epath.Path(local_dir).iterdir()):
        f.copy(dest / f.name, overwrite=True)
