"""Downloading the paper's data on a machine with internet: ``deepsim data download stl10 DIR``.

STL-10 comes from torchvision's STL10 release: its URL, the archive's MD5 and the MD5 of every ``*.bin``
file (``torchvision.datasets.STL10``), fetched and unpacked with torchvision's download utilities. The
binary folder lands at ``DIR/stl10_binary``, the folder :mod:`deepsim.data.stl10` reads (``--data
DIR/stl10_binary``).

Nothing half-written is left behind: the archive is fetched and unpacked in a temporary folder inside DIR,
every checksum is verified there, and only then are the verified files moved into ``DIR/stl10_binary``
(one rename each); on any failure (bad checksum, truncated or interrupted download, full disk) the
temporary folder is removed and DIR is as it was.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = ["DownloadError", "ArchiveRelease", "stl10_release", "download_stl10", "DATASETS"]

DATASETS = ("stl10",)


class DownloadError(DataError):
    """A dataset download failed or did not verify; nothing of it was kept."""


@dataclass(frozen=True)
class ArchiveRelease:
    """A dataset published as one archive that unpacks to one folder.

    Attributes:
        url: where the archive is.
        archive: its file name; archive_md5: its MD5.
        folder: the folder the archive unpacks to (and the one created under the target).
        files: (file name in ``folder``, MD5) of each file that must be there after unpacking.
    """

    url: str
    archive: str
    archive_md5: str
    folder: str
    files: tuple[tuple[str, str], ...]


def stl10_release() -> ArchiveRelease:
    """STL-10 as torchvision's ``STL10`` dataset class describes it (URL, archive MD5, per-file MD5s)."""
    from torchvision.datasets import STL10

    return ArchiveRelease(
        url=STL10.url,
        archive=STL10.filename,
        archive_md5=STL10.tgz_md5,
        folder=STL10.base_folder,
        files=tuple((name, md5) for name, md5 in STL10.train_list + STL10.test_list),
    )


def _verified(folder: Path, files) -> bool:
    from torchvision.datasets.utils import check_integrity

    return all(check_integrity(str(folder / name), md5) for name, md5 in files)


def download_stl10(
    root: str | os.PathLike,
    *,
    url: str | None = None,
    release: ArchiveRelease | None = None,
    keep_archive: bool = False,
) -> Path:
    """Download and unpack STL-10 into ``root/stl10_binary``, every checksum verified; returns that folder.

    Args:
        root: the folder to put ``stl10_binary`` in (created if needed).
        url: another location of the same archive: a mirror, or a ``file://`` URL of a local copy (copied, not
            fetched); the checksums still apply.
        release: what to fetch (default: :func:`stl10_release`).
        keep_archive: also keep the archive as ``root/<archive>`` (default: removed once unpacked).

    Returns:
        the binary folder. When it already holds every file with the right checksum, nothing is fetched.

    Raises:
        DownloadError: the download failed, was truncated, or a checksum did not match (the message names
            the URL or file, the expected and the actual MD5); nothing of the failed download is kept.
    """
    from torchvision.datasets.utils import calculate_md5, check_integrity, download_url, extract_archive

    release = release or stl10_release()
    url = url or release.url
    root = Path(root)
    target = root / release.folder
    if target.is_dir() and _verified(target, release.files):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{release.folder}.download-", dir=root))
    try:
        archive = staging / release.archive
        try:
            if url.startswith("file:"):  # a local mirror (torchvision's fetch reads HTTP responses only)
                shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), archive)
            else:
                download_url(url, str(staging), filename=release.archive)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise DownloadError(f"downloading {url} failed: {error}; nothing was kept in {root}") from error
        actual = calculate_md5(str(archive))
        if actual != release.archive_md5:
            raise DownloadError(
                f"{url}: the downloaded archive ({archive.stat().st_size} bytes) has MD5 {actual}, expected "
                f"{release.archive_md5}: truncated or corrupt; nothing was kept in {root}. Retry the download."
            )
        try:
            extract_archive(str(archive), str(staging))
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DownloadError(
                f"{url}: unpacking {release.archive} failed: {error}; nothing was kept"
            ) from error
        unpacked = staging / release.folder
        for name, md5 in release.files:
            if not check_integrity(str(unpacked / name), md5):
                found = calculate_md5(str(unpacked / name)) if (unpacked / name).is_file() else "no such file"
                raise DownloadError(
                    f"{url}: {release.folder}/{name} in the archive: MD5 {found}, expected {md5}; nothing was kept"
                )
        target.mkdir(exist_ok=True)
        for path in sorted(unpacked.iterdir()):  # verified: one rename each into the target folder
            os.replace(path, target / path.name)
        if keep_archive:
            os.replace(archive, root / release.archive)
    except OSError as error:  # a full disk or a permission problem while unpacking or moving
        raise DownloadError(
            f"writing STL-10 into {root} failed: {error}; the partial download was removed"
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
