"""The image store's content on disk: blobs by digest and layers unpacked by diff_id.

Layout under the store's root::

    blobs/sha256/<hex>       manifests, configs and layer blobs, named by their digest
    layers/<diff_id hex>/    each layer unpacked once, shared by every image that has it
    downloads/pull-*/        blobs being pulled, each directory flock(2)ed while in use

Which image needs what is the store's business (repositories.json): it calls everything here
with its lock held. New files and trees appear under temporary names and are renamed into
place; each commit appends what it created to a list, so a failed load can take it all back.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from engine.images.archive import PendingLayer
from engine.images.image import ImageLoadError
from engine.images.layers import LayerError, diff_id_of, unpack_layer
from engine.images.oci import digest_hex, sha256_bytes


def _tree_size(root: Path) -> int:
    """Bytes of regular-file content under ``root``, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_if_unlocked(path: Path) -> None:
    """Remove a download directory unless a live download holds its flock(2)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(path, ignore_errors=True)
    except BlockingIOError:
        pass  # in use
    finally:
        os.close(fd)


def undo(created: list[Path]) -> None:
    """Remove what a failed commit created, newest first."""
    for path in reversed(created):
        _remove(path)


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.layers = root / "layers"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.layers.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest, "blob")

    def layer_path(self, diff_id: str) -> Path:
        return self.layers / digest_hex(diff_id, "layer")

    def has_layer(self, diff_id: str) -> bool:
        return self.layer_path(diff_id).is_dir()

    # -- adding

    def commit_layer(
        self, layer: PendingLayer, layer_sizes: dict[str, Any], created: list[Path]
    ) -> None:
        """Unpack (or reuse) ``layer``; ``layer_sizes`` is the store's {diff_id: {"size": n}}."""
        dest = self.layer_path(layer.diff_id)
        if layer.blob is None:  # a pull skipped the blob because the layer was here
            if not dest.is_dir():
                raise ImageLoadError(f"layer {layer.diff_id} was removed meanwhile; pull again")
            layer_sizes.setdefault(layer.diff_id, {"size": _tree_size(dest)})
            return
        if dest.is_dir():
            # Already unpacked: still make sure this blob really is that layer.
            actual = diff_id_of(layer.blob)
            if actual != layer.diff_id:
                raise ImageLoadError(
                    f"layer {layer.blob_digest}: diff_id is {actual}, config says {layer.diff_id}"
                )
            if layer.diff_id not in layer_sizes:  # an orphan left by a crash, reused
                layer_sizes[layer.diff_id] = {"size": _tree_size(dest)}
            return
        tmp = self.layers / f".tmp-{dest.name}-{secrets.token_hex(4)}"
        try:
            unpacked = unpack_layer(layer.blob, tmp)
            if unpacked.diff_id != layer.diff_id:
                raise ImageLoadError(
                    f"layer {layer.blob_digest}: diff_id is {unpacked.diff_id}, "
                    f"config says {layer.diff_id}"
                )
        except LayerError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ImageLoadError(f"layer {layer.diff_id}: {e}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, dest)
        created.append(dest)
        layer_sizes[layer.diff_id] = {"size": unpacked.size}

    def commit_blob_file(self, source: Path, digest: str, created: list[Path]) -> None:
        dest = self.blob_path(digest)
        if dest.exists():
            return
        # The staging directory is on the same filesystem: a hard link is a free copy.
        os.link(source, dest)
        os.chmod(dest, 0o644)
        created.append(dest)

    def commit_blob_bytes(self, data: bytes, created: list[Path]) -> None:
        dest = self.blob_path(sha256_bytes(data))
        if dest.exists():
            return
        tmp = self.blobs / f".tmp-{dest.name}-{secrets.token_hex(4)}"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, dest)
        created.append(dest)

    def new_download_dir(self) -> tuple[Path, int]:
        """A fresh directory under ``downloads/`` and a descriptor holding its flock(2).

        The ones a killed daemon left behind (nobody holds their lock) are removed first.
        """
        parent = self.root / "downloads"
        parent.mkdir(exist_ok=True)
        for entry in parent.iterdir():
            _remove_if_unlocked(entry)
        path = Path(tempfile.mkdtemp(prefix="pull-", dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return path, fd

    # -- removing

    def remove_temporaries(self) -> None:
        """Leftovers of a load or removal that crashed."""
        for directory, prefixes in (
            (self.root, (".tmp-",)),
            (self.layers, (".tmp-", ".trash-")),
            (self.blobs, (".tmp-",)),
        ):
            for entry in directory.iterdir():
                if entry.name.startswith(prefixes):
                    _remove(entry)

    def keep_only(self, blobs: set[str], diff_ids: set[str]) -> None:
        """Delete every blob and unpacked layer whose digest is not in ``blobs``/``diff_ids``."""
        self.remove_temporaries()
        for entry in self.blobs.iterdir():
            if f"sha256:{entry.name}" not in blobs:
                entry.unlink(missing_ok=True)
        for entry in self.layers.iterdir():
            if f"sha256:{entry.name}" in diff_ids:
                continue
            if entry.is_dir() and not entry.is_symlink():
                # Renamed first, so a half-deleted tree never sits under a layer's name.
                trash = self.layers / f".trash-{entry.name}-{secrets.token_hex(4)}"
                os.rename(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
