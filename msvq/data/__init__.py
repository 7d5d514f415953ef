"""Datasets: the registry of official files, download, and prepare."""

from msvq.data.download import ChecksumError, DownloadError, download
from msvq.data.formats import ArchiveError
from msvq.data.prepare import PrepareError, prepare
from msvq.data.registry import DATASETS, DatasetSpec, RemoteFile, get_spec

__all__ = [
    "DATASETS", "ArchiveError", "ChecksumError", "DatasetSpec", "DownloadError",
    "PrepareError", "RemoteFile", "download", "get_spec", "prepare",
]
