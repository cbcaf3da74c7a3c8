"""Downloading the paper's data on a machine with internet: ``deepsim data download stl10 DIR``.

STL-10 comes from torchvision's STL10 release: its URL, the archive's MD5 and the MD5 of every ``*.bin``
file (``torchvision.datasets.STL10``), unpacked with torchvision's archive utilities. The binary folder
lands at ``DIR/stl10_binary``, the folder :mod:`deepsim.data.stl10` reads (``--data DIR/stl10_binary``).

The fetch has a connect and a read timeout (a server that accepts and then stalls fails the attempt) and is
retried a few times. Nothing half-written is left behind: the archive is fetched and unpacked in a temporary
folder inside DIR, every checksum is verified there, and only then are the verified files moved into
``DIR/stl10_binary`` (one rename each); on any failure (bad checksum, truncated or stalled download, full
disk) or stop signal (SIGINT, SIGTERM, SIGHUP) the temporary folder is removed and DIR is as it was. A
temporary folder left by a killed process (SIGKILL cannot be caught) is removed by the next download.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets import STL10
from torchvision.datasets.utils import calculate_md5, check_integrity, extract_archive

from .errors import DataError
from .interrupt import interruptible, uninterrupted

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
    return ArchiveRelease(
        url=STL10.url,
        archive=STL10.filename,
        archive_md5=STL10.tgz_md5,
        folder=STL10.base_folder,
        files=tuple((name, md5) for name, md5 in STL10.train_list + STL10.test_list),
    )


def _verified(folder: Path, files) -> bool:
    return all(check_integrity(str(folder / name), md5) for name, md5 in files)


_CHUNK = 1 << 20
_USER_AGENT = "deepsim"


def _connection(url: str, connect_timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """An open connection for ``url`` (through the environment's proxy, if any) and the request target."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"{url}: expected an http://, https:// or file:// URL")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and urllib.request.proxy_bypass(parts.hostname):
        proxy = None
    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    if proxy:
        via = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if https:
            conn = kind(via.hostname, via.port or 80, timeout=connect_timeout)
            conn.set_tunnel(parts.hostname, port)
        else:
            conn, target = (
                http.client.HTTPConnection(via.hostname, via.port or 80, timeout=connect_timeout),
                url,
            )
    else:
        conn = kind(parts.hostname, port, timeout=connect_timeout)
    conn.connect()
    return conn, target


class _Retry(Exception):
    """One attempt failed in a way another attempt may not (a timeout, a dropped connection, HTTP 5xx)."""


def _fetch_once(url: str, dest: Path, connect_timeout: float, read_timeout: float, hops: int = 5) -> None:
    for _ in range(hops):
        try:
            conn, target = _connection(url, connect_timeout)
        except TimeoutError as error:
            raise _Retry(f"no connection within --connect-timeout {connect_timeout:g} s ({error})") from None
        except (ConnectionError, OSError, http.client.HTTPException) as error:
            raise _Retry(f"cannot connect: {error}") from None
        try:
            conn.sock.settimeout(read_timeout)
            try:
                conn.request("GET", target, headers={"User-Agent": _USER_AGENT})
                response = conn.getresponse()
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location"))
                    continue
                if response.status >= 500:
                    raise _Retry(f"HTTP Error {response.status}: {response.reason}")
                if response.status != 200:
                    raise DownloadError(
                        f"downloading {url} failed: HTTP Error {response.status}: {response.reason}"
                    )
                expected = response.getheader("Content-Length")
                received = 0
                with open(dest, "wb") as out:
                    while chunk := response.read1(_CHUNK):
                        out.write(chunk)
                        received += len(chunk)
                if expected is not None and expected.isdigit() and received != int(expected):
                    raise _Retry(f"received {received} of {expected} bytes (the connection dropped)")
                return
            except TimeoutError:
                raise _Retry(f"no data for --read-timeout {read_timeout:g} s (the server stalled)") from None
            except (ConnectionError, http.client.HTTPException) as error:
                raise _Retry(f"the connection failed: {error or type(error).__name__}") from None
        finally:
            conn.close()
    raise DownloadError(f"downloading {url} failed: more than {hops} redirects")


def _fetch(
    url: str, dest: Path, *, connect_timeout: float, read_timeout: float, retries: int, retry_wait: float
) -> None:
    """``url`` into ``dest``, with timeouts, retried ``retries`` times (waits of ``retry_wait`` s,
    doubling)."""
    for attempt in range(retries + 1):
        try:
            return _fetch_once(url, dest, connect_timeout, read_timeout)
        except _Retry as error:
            if attempt == retries:
                tries = f"{retries + 1} attempt" + ("s" if retries else "")
                raise DownloadError(f"downloading {url} failed after {tries}: {error}") from None
            time.sleep(retry_wait * 2**attempt)


def _remove_abandoned(root: Path, folder: str) -> None:
    """Remove the temporary folders of downloads whose process is gone (killed with SIGKILL)."""
    for stale in root.glob(f".{folder}.download-*"):
        pid = stale.name.split("-")[1] if stale.name.count("-") >= 2 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def download_stl10(
    root: str | os.PathLike,
    *,
    url: str | None = None,
    release: ArchiveRelease | None = None,
    keep_archive: bool = False,
    connect_timeout: float = 30.0,
    read_timeout: float = 60.0,
    retries: int = 3,
    retry_wait: float = 2.0,
) -> Path:
    """Download and unpack STL-10 into ``root/stl10_binary``, every checksum verified; returns that folder.

    Args:
        root: the folder to put ``stl10_binary`` in (created if needed).
        url: another location of the same archive: a mirror, or a ``file://`` URL of a local copy (copied, not
            fetched); the checksums still apply.
        release: what to fetch (default: :func:`stl10_release`).
        keep_archive: also keep the archive as ``root/<archive>`` (default: removed once unpacked).
        connect_timeout: seconds to connect; read_timeout: seconds without a byte before the attempt fails.
        retries: attempts after a failed one (a timeout, a dropped connection, HTTP 5xx), ``retry_wait`` s
            apart, doubling.

    Returns:
        the binary folder. When it already holds every file with the right checksum, nothing is fetched.

    Raises:
        DownloadError: the download failed, was truncated, or a checksum did not match (the message names
            the URL or file, the expected and the actual MD5); nothing of the failed download is kept.
        Interrupted: a stop signal arrived; nothing of the download is kept.
    """
    for name, value in (("--connect-timeout", connect_timeout), ("--read-timeout", read_timeout)):
        if not value > 0:
            raise DownloadError(f"{name} {value}: expected a positive number of seconds")
    if retries < 0:
        raise DownloadError(f"--retries {retries}: expected 0 or more")
    fetch = dict(
        connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries, retry_wait=retry_wait
    )
    release = release or stl10_release()
    url = url or release.url
    root = Path(root)
    target = root / release.folder
    if target.is_dir() and _verified(target, release.files):
        return target
    with interruptible():
        created = [p for p in (root, *root.parents) if not p.exists()]
        try:
            return _download(root, target, url, release, keep_archive, fetch)
        except BaseException:
            for folder in created:  # the folders this call made, if they stayed empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise


def _download(
    root: Path, target: Path, url: str, release: ArchiveRelease, keep_archive: bool, fetch: dict
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root, release.folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{release.folder}.download-{os.getpid()}-", dir=root))
    try:
        archive = staging / release.archive
        try:
            if url.startswith("file:"):  # a local mirror (torchvision's fetch reads HTTP responses only)
                shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), archive)
            else:
                _fetch(url, archive, **fetch)
        except DownloadError as error:
            raise DownloadError(f"{error}; nothing was kept in {root}") from None
        except (urllib.error.URLError, OSError) as error:
            raise DownloadError(f"downloading {url} failed: {error}; nothing was kept in {root}") from error
        actual = calculate_md5(str(archive))
        if actual != release.archive_md5:
            raise DownloadError(
                f"{url}: the downloaded archive ({archive.stat().st_size} bytes) has MD5 {actual}, expected "
                f"{release.archive_md5}: truncated or corrupt; nothing was kept in {root}. Retry the "
                "download."
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
                    f"{url}: {release.folder}/{name} in the archive: MD5 {found}, expected {md5}; nothing "
                    "was kept"
                )
        with uninterrupted():  # all of the verified files move, or none (a stop signal waits for the renames)
            target.mkdir(exist_ok=True)
            for path in sorted(unpacked.iterdir()):  # one rename each into the target folder
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
