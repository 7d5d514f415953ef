"""Download and prepare, on tiny archives built in each dataset's official format."""

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from msvq.cli import main
from msvq.data import ArchiveError, DownloadError, PrepareError, download, get_spec, prepare
from msvq.data.prepared import open_prepared
from msvq.io import current_umask
from tests import archives
from tests.tiny import tiny_spec

BUILDERS = {
    "cifar10": archives.make_cifar10,
    "cifar100": archives.make_cifar100,
    "stl10": archives.make_stl10,
    "tinyimagenet": archives.make_tinyimagenet,
    "fashionmnist": archives.make_fashionmnist,
}
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_env_mirror(monkeypatch):
    monkeypatch.delenv("MSVQ_DATA_MIRROR", raising=False)


def assert_prepared_equals(root: Path, name: str, expected: dict):
    data = open_prepared(root, name)
    assert data.classes == expected["classes"]
    for split in ("train", "test", "unlabeled"):
        if split not in expected:
            assert not data.has_split(split)
            continue
        images, labels = expected[split]
        prepared_images = data.images(split)
        assert prepared_images.dtype == np.uint8
        assert prepared_images.shape == images.shape
        np.testing.assert_array_equal(prepared_images, images)
        np.testing.assert_array_equal(data.labels(split), labels)
        assert data.labels(split).dtype == np.int64
        assert data.meta["splits"][split] == len(images)
    train = expected["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, train.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(data.std, train.std(axis=(0, 1, 2)), rtol=1e-6)
    assert data.channels == expected["train"][0].shape[-1]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prepare_from_mirror_matches_source(tmp_path, name):
    mirror = tmp_path / "mirror"
    expected = BUILDERS[name](mirror)
    spec = tiny_spec(name, mirror)
    root = tmp_path / "data"

    download(spec, root, extra_mirrors=[str(mirror)], retries=1)
    prepare(spec, root)

    assert_prepared_equals(root, name, expected)
    meta = json.loads((root / "prepared" / name / "meta.json").read_text())
    assert meta["raw_files"] == {remote.name: remote.md5 for remote in spec.files}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_download_over_http_then_prepare(tmp_path, http_server, name):
    expected = BUILDERS[name](http_server.root)
    spec = tiny_spec(name, http_server.root, url_base=http_server.url)
    root = tmp_path / "data"

    download(spec, root, retries=1)
    prepare(spec, root)

    assert_prepared_equals(root, name, expected)
    assert not list((root / "raw" / name).glob("*.part"))


def test_second_run_does_nothing(tmp_path, http_server, caplog):
    archives.make_cifar10(http_server.root)
    spec = tiny_spec("cifar10", http_server.root, url_base=http_server.url)
    root = tmp_path / "data"
    download(spec, root, retries=1)
    prepare(spec, root)
    requests_after_first = len(http_server.requests)
    prepared_mtime = (root / "prepared" / "cifar10" / "train_images.npy").stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level("INFO"):
        download(spec, root, retries=1)
        prepare(spec, root)

    assert len(http_server.requests) == requests_after_first
    assert (root / "prepared" / "cifar10" / "train_images.npy").stat().st_mtime_ns == prepared_mtime
    assert "nothing to do" in caplog.text
    assert caplog.text.count("nothing to do") == 2


def test_truncated_download_resumes(tmp_path, http_server):
    archives.make_cifar10(http_server.root, per_batch=50)
    name = "cifar-10-python.tar.gz"
    size = (http_server.root / name).stat().st_size
    http_server.fail_after_bytes[name] = size // 3
    http_server.fail_times[name] = 1
    spec = tiny_spec("cifar10", http_server.root, url_base=http_server.url)

    raw = download(spec, tmp_path / "data", retries=2)

    assert archives.md5_of(raw / name) == spec.files[0].md5
    ranges = [header for path, header in http_server.requests if path == name]
    assert len(ranges) == 2
    assert ranges[0] is None
    resumed_from = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_from <= size // 3


def test_partial_file_from_earlier_run_resumes(tmp_path, http_server):
    archives.make_cifar10(http_server.root, per_batch=50)
    name = "cifar-10-python.tar.gz"
    raw_dir = tmp_path / "data" / "raw" / "cifar10"
    raw_dir.mkdir(parents=True)
    head = (http_server.root / name).read_bytes()[:1000]
    (raw_dir / (name + ".part")).write_bytes(head)
    spec = tiny_spec("cifar10", http_server.root, url_base=http_server.url)

    download(spec, tmp_path / "data", retries=1)

    assert http_server.requests == [(name, "bytes=1000-")]
    assert archives.md5_of(raw_dir / name) == spec.files[0].md5


def test_corrupt_download_is_rejected_and_deleted(tmp_path, http_server):
    archives.make_cifar10(http_server.root)
    spec = tiny_spec("cifar10", http_server.root, url_base=http_server.url)
    good_md5 = spec.files[0].md5
    path = http_server.root / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    bad_md5 = archives.md5_of(path)

    with pytest.raises(DownloadError) as error:
        download(spec, tmp_path / "data", retries=1)

    message = str(error.value)
    assert good_md5 in message
    assert bad_md5 in message
    assert "cifar-10-python.tar.gz" in message
    assert not (tmp_path / "data" / "raw" / "cifar10").exists()


def test_corrupt_raw_archive_leaves_nothing_prepared(tmp_path):
    mirror = tmp_path / "mirror"
    archives.make_cifar10(mirror)
    spec = tiny_spec("cifar10", mirror)
    root = tmp_path / "data"
    download(spec, root, extra_mirrors=[str(mirror)])
    raw = root / "raw" / "cifar10" / "cifar-10-python.tar.gz"
    data = bytearray(raw.read_bytes())
    data[len(data) // 2] ^= 0xFF
    raw.write_bytes(bytes(data))

    with pytest.raises(PrepareError) as error:
        prepare(spec, root)

    message = str(error.value)
    assert str(raw) in message
    assert spec.files[0].md5 in message
    assert archives.md5_of(raw) in message
    assert "msvq download cifar10" in message
    assert not (root / "prepared").exists() or not any((root / "prepared").iterdir())
    assert not (root / ".staging").exists()


def test_corrupt_mirror_copy_is_skipped_with_reason(tmp_path):
    mirror = tmp_path / "mirror"
    archives.make_fashionmnist(mirror)
    spec = tiny_spec("fashionmnist", mirror)
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")

    with pytest.raises(DownloadError) as error:
        download(spec, tmp_path / "data", extra_mirrors=[str(mirror)], retries=1)

    message = str(error.value)
    assert f"mirror {mirror / 't10k-labels-idx1-ubyte.gz'}: checksum mismatch" in message
    assert "http://127.0.0.1:9/t10k-labels-idx1-ubyte.gz" in message
    assert not (tmp_path / "data" / "raw" / "fashionmnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_offline_without_mirror_lists_sources(tmp_path, capsys):
    """The real cifar10 spec with no network: every source and the manual fix are named."""
    code = main(["download", "cifar10", "--root", str(tmp_path / "data"), "--retries", "1", "--timeout", "2",
                 "--mirror", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 1
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err
    assert f"mirror {tmp_path / 'nowhere'}: directory does not exist" in err
    assert "put it in" in err
    assert "raw/cifar10" in err
    assert not (tmp_path / "data" / "raw" / "cifar10").exists()


def test_http_error_is_reported(tmp_path, http_server):
    archives.make_fashionmnist(http_server.root)
    spec = tiny_spec("fashionmnist", http_server.root, url_base=http_server.url)
    http_server.error_paths.add("train-labels-idx1-ubyte.gz")

    with pytest.raises(DownloadError, match="HTTP 500"):
        download(spec, tmp_path / "data", retries=1)


def add_member(archive: Path, member: str, data: bytes) -> None:
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "a") as handle:
            handle.writestr(member, data)
        return
    with tarfile.open(archive, "r:gz") as src:
        members = [(info, src.extractfile(info).read() if info.isfile() else None) for info in src.getmembers()]
    with tarfile.open(archive, "w:gz") as dst:
        for info, payload in members:
            dst.addfile(info, None if payload is None else __import__("io").BytesIO(payload))
        extra = tarfile.TarInfo(member)
        extra.size = len(data)
        dst.addfile(extra, __import__("io").BytesIO(data))


@pytest.mark.parametrize("name,archive,member", [
    ("cifar10", "cifar-10-python.tar.gz", "../evil.txt"),
    ("cifar100", "cifar-100-python.tar.gz", "/tmp/evil.txt"),
    ("tinyimagenet", "tiny-imagenet-200.zip", "tiny-imagenet-200/../../evil.txt"),
])
def test_traversal_member_is_rejected(tmp_path, name, archive, member):
    mirror = tmp_path / "mirror"
    BUILDERS[name](mirror)
    add_member(mirror / archive, member, b"payload")
    spec = tiny_spec(name, mirror)
    root = tmp_path / "work" / "data"
    download(spec, root, extra_mirrors=[str(mirror)])

    with pytest.raises(ArchiveError, match="outside the target directory") as error:
        prepare(spec, root)

    assert member in str(error.value)
    assert not (root / "prepared").exists() or not any((root / "prepared").iterdir())
    assert not (tmp_path / "work" / "evil.txt").exists()
    assert not Path("/tmp/evil.txt").exists()


def test_tar_symlink_escaping_is_rejected(tmp_path):
    mirror = tmp_path / "mirror"
    archives.make_cifar10(mirror)
    archive = mirror / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "r:gz") as src:
        members = [(info, src.extractfile(info).read() if info.isfile() else None) for info in src.getmembers()]
    with tarfile.open(archive, "w:gz") as dst:
        link = tarfile.TarInfo("cifar-10-batches-py/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "../../../etc/passwd"
        dst.addfile(link)
        for info, payload in members:
            dst.addfile(info, None if payload is None else __import__("io").BytesIO(payload))
    spec = tiny_spec("cifar10", mirror)
    download(spec, tmp_path / "data", extra_mirrors=[str(mirror)])

    with pytest.raises(ArchiveError, match="outside the target directory"):
        prepare(spec, tmp_path / "data")


def test_prepare_without_raw_files_says_what_to_run(tmp_path):
    with pytest.raises(PrepareError, match="msvq download stl10"):
        prepare(get_spec("stl10"), tmp_path / "data")


def test_split_counts_are_checked(tmp_path):
    mirror = tmp_path / "mirror"
    archives.make_fashionmnist(mirror, n_train=20, n_test=10)
    spec = tiny_spec("fashionmnist", mirror, counts={"train": 60000, "test": 10000})
    download(spec, tmp_path / "data", extra_mirrors=[str(mirror)])

    with pytest.raises(ArchiveError, match="differ from the expected"):
        prepare(spec, tmp_path / "data")
    assert not (tmp_path / "data" / "prepared" / "fashionmnist").exists()


def test_tinyimagenet_val_image_without_annotation_is_rejected(tmp_path):
    mirror = tmp_path / "mirror"
    archives.make_tinyimagenet(mirror)
    archive = mirror / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive) as handle:
        jpeg = handle.read("tiny-imagenet-200/val/images/val_0.JPEG")
    add_member(archive, "tiny-imagenet-200/val/images/val_999.JPEG", jpeg)
    spec = tiny_spec("tinyimagenet", mirror)
    download(spec, tmp_path / "data", extra_mirrors=[str(mirror)])

    with pytest.raises(ArchiveError, match="val_999.JPEG has no line"):
        prepare(spec, tmp_path / "data")


def test_env_mirror_is_searched(tmp_path, monkeypatch):
    mirror = tmp_path / "envmirror"
    archives.make_fashionmnist(mirror / "fashionmnist")
    spec = tiny_spec("fashionmnist", mirror / "fashionmnist")
    monkeypatch.setenv("MSVQ_DATA_MIRROR", str(mirror))

    raw = download(spec, tmp_path / "data", retries=1)

    assert sorted(path.name for path in raw.glob("*.gz")) == sorted(remote.name for remote in spec.files)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashionmnist_from_debian_package(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["download", "fashionmnist", "--root", str(root)]) == 0
    assert main(["prepare", "fashionmnist", "--root", str(root)]) == 0

    data = open_prepared(root, "fashionmnist")
    assert data.images("train").shape == (60000, 28, 28, 1)
    assert data.images("test").shape == (10000, 28, 28, 1)
    assert np.bincount(data.labels("train")).tolist() == [6000] * 10
    assert np.bincount(data.labels("test")).tolist() == [1000] * 10
    assert data.classes[0] == "T-shirt/top"
    assert data.classes[9] == "Ankle boot"
    np.testing.assert_allclose(data.mean, [0.2860], atol=1e-4)
    np.testing.assert_allclose(data.std, [0.3530], atol=1e-4)


def test_prepared_files_get_usual_permissions(tmp_path):
    mirror = tmp_path / "mirror"
    archives.make_fashionmnist(mirror)
    spec = tiny_spec("fashionmnist", mirror)
    download(spec, tmp_path / "data", extra_mirrors=[str(mirror)])
    prepare(spec, tmp_path / "data")

    mode = (tmp_path / "data" / "prepared" / "fashionmnist" / "meta.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~current_umask()


def test_corrupt_gzip_stream_is_a_checksum_error(tmp_path):
    mirror = tmp_path / "mirror"
    archives.make_fashionmnist(mirror, n_train=200)
    spec = get_spec("fashionmnist")
    root = tmp_path / "data"
    raw_dir = root / "raw" / "fashionmnist"
    raw_dir.mkdir(parents=True)
    for remote in spec.files:
        data = bytearray((mirror / remote.name).read_bytes())
        if remote.name.startswith("train-images"):
            data[len(data) // 2 : len(data) // 2 + 10] = bytes(10)
        (raw_dir / remote.name).write_bytes(bytes(data))

    with pytest.raises(PrepareError) as error:
        prepare(spec, root)

    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "checksum mismatch" in message
    assert not (root / "prepared").exists()
