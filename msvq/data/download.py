"""Fetch a dataset's raw files into ROOT/raw/<dataset>/: mirrors first, then URLs.

Every file is checksum-verified before it is renamed into place, so the raw
directory only ever contains complete, verified copies. An interrupted HTTP transfer
leaves ``<name>.part`` behind and the next run resumes it with a Range request.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import requests
from tqdm import tqdm

from msvq.data.registry import MIRROR_ENV, DatasetSpec, RemoteFile, mirror_dirs
from msvq.io import fsync_dir, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
STREAM_CHUNK = 1 << 16
STAMP = "checksums.json"


class DownloadError(RuntimeError):
    """No source could provide a verified copy of a raw file."""


class ChecksumError(ValueError):
    """A file's digest does not match the published one."""


def md5_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"md5 {path.name}",
        disable=not progress, leave=False,
    ) as bar:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def md5_gzip_content(path: Path) -> str | None:
    """Return the MD5 of a gzip file's decompressed stream, or None if it is not valid gzip."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def verify(path: Path, remote: RemoteFile) -> str:
    """Return the file's MD5 if it is a good copy of ``remote``; raise ChecksumError otherwise."""
    actual = md5_file(path, progress=path.stat().st_size > 64 * CHUNK)
    if actual == remote.md5:
        return actual
    if remote.content_md5 is not None and md5_gzip_content(path) == remote.content_md5:
        return actual
    expected = remote.md5
    if remote.content_md5:
        expected += f" (or decompressed content MD5 {remote.content_md5})"
    raise ChecksumError(f"checksum mismatch for {path}: expected MD5 {expected}, got {actual}")


def read_stamps(raw_dir: Path) -> dict[str, dict]:
    stamp = raw_dir / STAMP
    if not stamp.is_file():
        return {}
    try:
        return json.loads(stamp.read_text())
    except ValueError:
        return {}


def stamp_matches(path: Path, entry: dict | None) -> bool:
    if not entry or not path.is_file():
        return False
    stat = path.stat()
    return entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns


def record_stamp(raw_dir: Path, name: str, md5: str, source: str) -> None:
    stamps = read_stamps(raw_dir)
    stat = (raw_dir / name).stat()
    stamps[name] = {"md5": md5, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "source": source}
    write_json(raw_dir / STAMP, stamps)


def verified_md5(raw_dir: Path, remote: RemoteFile) -> str:
    """Return the MD5 of the raw copy of ``remote``, verifying it unless its stamp is current."""
    path = raw_dir / remote.name
    entry = read_stamps(raw_dir).get(remote.name)
    if stamp_matches(path, entry):
        return entry["md5"]
    md5 = verify(path, remote)
    record_stamp(raw_dir, remote.name, md5, source="verified in place")
    return md5


def copy_from_mirror(source: Path, target: Path) -> None:
    part = target.with_name(target.name + ".mirror.part")
    try:
        with source.open("rb") as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(part, target)
        fsync_dir(target.parent)
    finally:
        part.unlink(missing_ok=True)


def http_fetch(url: str, part: Path, timeout: tuple[float, float], retries: int) -> None:
    """Stream ``url`` into ``part``, resuming from its current size; retry transient errors."""
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
                if response.status_code == 416:
                    # The .part is at least as long as the file: let the checksum decide.
                    return
                if response.status_code == 200 and offset:
                    log.info("%s ignored the Range request; restarting from byte 0", url)
                    offset = 0
                elif response.status_code not in (200, 206):
                    raise DownloadError(f"HTTP {response.status_code} {response.reason}")
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                mode = "ab" if offset else "wb"
                with part.open(mode) as handle, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                ) as bar:
                    # Small chunks keep what arrived before a dropped connection.
                    for chunk in response.iter_content(STREAM_CHUNK):
                        handle.write(chunk)
                        bar.update(len(chunk))
                    handle.flush()
                    os.fsync(handle.fileno())
                if total is not None and part.stat().st_size < total:
                    raise DownloadError(f"connection closed after {part.stat().st_size} of {total} bytes")
                return
        except (requests.RequestException, DownloadError) as error:
            last_error = error
            if isinstance(error, DownloadError) and str(error).startswith("HTTP 4"):
                break
            if attempt < retries:
                wait = 2 ** (attempt - 1)
                log.warning("%s: attempt %d/%d failed (%s); retrying in %ds", url, attempt, retries, error, wait)
                time.sleep(wait)
    raise DownloadError(str(last_error))


def fetch_file(
    remote: RemoteFile,
    raw_dir: Path,
    mirrors: list[Path],
    timeout: tuple[float, float],
    retries: int,
    tried: list[str],
) -> bool:
    """Place a verified copy of ``remote`` in ``raw_dir``; append each failed source to ``tried``."""
    target = raw_dir / remote.name

    if not mirrors:
        tried.append("mirrors: none configured")
    for directory in mirrors:
        candidate = directory / remote.name
        if not directory.is_dir():
            tried.append(f"mirror {directory}: directory does not exist")
            continue
        if not candidate.is_file():
            tried.append(f"mirror {candidate}: not found")
            continue
        try:
            md5 = verify(candidate, remote)
        except ChecksumError as error:
            tried.append(f"mirror {candidate}: {error}")
            continue
        log.info("copying %s from mirror %s", remote.name, directory)
        copy_from_mirror(candidate, target)
        record_stamp(raw_dir, remote.name, md5, source=str(candidate))
        return True

    part = raw_dir / (remote.name + ".part")
    for url in remote.urls:
        try:
            http_fetch(url, part, timeout, retries)
            md5 = verify(part, remote)
        except DownloadError as error:
            tried.append(f"url {url}: {error}")
            continue
        except ChecksumError as error:
            part.unlink(missing_ok=True)
            tried.append(f"url {url}: {error}; the partial file was deleted")
            continue
        os.replace(part, target)
        fsync_dir(raw_dir)
        record_stamp(raw_dir, remote.name, md5, source=url)
        return True
    return False


def download(
    spec: DatasetSpec,
    root: str | Path,
    extra_mirrors: tuple[str, ...] | list[str] = (),
    timeout: tuple[float, float] = (10.0, 60.0),
    retries: int = 3,
) -> Path:
    """Make ROOT/raw/<dataset>/ hold a verified copy of each of the dataset's files.

    Files already there and verified are left alone. Raises DownloadError listing
    every source tried when a file cannot be obtained.
    """
    raw_dir = Path(root) / "raw" / spec.name
    raw_dir.mkdir(parents=True, exist_ok=True)
    mirrors = mirror_dirs(spec, extra_mirrors)
    fetched = 0

    for remote in spec.files:
        target = raw_dir / remote.name
        if target.is_file():
            try:
                verified_md5(raw_dir, remote)
                continue
            except ChecksumError as error:
                log.warning("%s; fetching it again", error)
                target.unlink()
        tried: list[str] = []
        if not fetch_file(remote, raw_dir, mirrors, timeout, retries, tried):
            if not any(raw_dir.iterdir()):
                raw_dir.rmdir()
            sources = "\n".join(f"  - {line}" for line in tried)
            raise DownloadError(
                f"could not obtain {remote.name} for {spec.name}. Sources tried:\n{sources}\n"
                f"To provide it by hand, download {remote.urls[0]} on a machine with internet "
                f"access and put it in {raw_dir}/ or in a mirror directory "
                f"(--mirror DIR, ${MIRROR_ENV} or data.mirrors in the params file), "
                f"then run `msvq download {spec.name}` again."
            )
        fetched += 1

    if fetched:
        log.info("%s: fetched %d file(s) into %s", spec.name, fetched, raw_dir)
    else:
        log.info("%s: all %d raw file(s) already present and verified in %s; nothing to do",
                 spec.name, len(spec.files), raw_dir)
    return raw_dir
