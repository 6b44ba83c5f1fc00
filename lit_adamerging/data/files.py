"""Which files a task reads: the image files of a class folder, and the fingerprint that says when they changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "class_folders", "fingerprint", "images_in", "is_visible"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
"""Image file extensions read by :class:`~lit_adamerging.ImageFolderTask` (compared case-insensitively)."""


def is_visible(path: Path) -> bool:
    """Whether ``path`` is not hidden (its name does not start with ``.``)."""
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.is_file() and is_visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def class_folders(directory: Path) -> list[Path]:
    """The visible folders directly in ``directory``, sorted by name: a class per folder, labels in this order."""
    return sorted((p for p in directory.iterdir() if p.is_dir() and is_visible(p)), key=lambda p: p.name)


def images_in(folder: Path) -> list[Path]:
    """The visible files directly in ``folder`` with one of :data:`IMAGE_EXTENSIONS` (any case), sorted by name."""
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def fingerprint(*paths: Path) -> str:
    """SHA-256 of the names, sizes and modification times of every file under ``paths`` (files or folders).

    Symbolic links are followed, to files and to folders: a file is keyed by its target's real path, size
    and time, so a task whose class folder links elsewhere gets a new fingerprint when the images behind
    the link change or the link is pointed elsewhere.
    """
    digest = hashlib.sha256()
    for top in paths:
        top = top.expanduser()
        for path in _files_under(top):
            stat = path.stat()  # follows links: the target's size and time
            shown = path.relative_to(top.parent).as_posix()
            digest.update(f"{shown}\0{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _files_under(top: Path) -> list[Path]:
    """``top`` if it is a file, else the files under it in sorted order, through linked folders (each folder
    once, so a link back up the tree cannot loop)."""
    if top.is_file():
        return [top]
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(top, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders.sort()
        files.extend(path for path in (Path(folder) / name for name in names) if path.is_file())
    return sorted(files)
