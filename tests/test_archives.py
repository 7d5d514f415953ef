"""Self-tests of the official-format archive builders and of the test HTTP server.

The builders are read back here with the standard library, and where it is cheap
with torchvision's own dataset readers, so that the expected arrays they return
can be trusted by the tests of msvq's readers.
"""

import gzip
import http.client
import io
import pickle
import pickletools
import shutil
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.archives import (
    CIFAR10_CLASSES,
    CIFAR100_COARSE_CLASSES,
    CIFAR100_FINE_CLASSES,
    CIFAR100_SUPERCLASSES,
    FASHIONMNIST_CLASSES,
    STL10_CLASSES,
    dumps_python2_pickle,
    make_cifar10,
    make_cifar100,
    make_fashionmnist,
    make_stl10,
    make_tinyimagenet,
    md5_of,
)

# ---------------------------------------------------------------------------
# Python 2 pickles
# ---------------------------------------------------------------------------


def read_tar_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(name)
        assert member is not None, f"{name} is not a regular file in {archive}"
        return member.read()


def opcode_names(data: bytes) -> set[str]:
    return {opcode.name for opcode, _, _ in pickletools.genops(data)}


def test_python2_pickle_uses_python2_string_opcodes():
    data = dumps_python2_pickle({"key": "value", "raw": b"\xff" * 300, "array": np.zeros(3, np.uint8)})

    opcodes = opcode_names(data)
    assert "SHORT_BINSTRING" in opcodes
    assert "BINSTRING" in opcodes
    assert not opcodes & {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES"}


def test_python2_pickle_keys_follow_encoding():
    value = {"name": "text", "numbers": [0, 255, 256, 70000, -3, 2**40], "flag": True, "none": None}
    data = dumps_python2_pickle(value)

    assert pickle.loads(data, encoding="latin1") == value
    assert pickle.loads(data, encoding="bytes") == {
        b"name": b"text",
        b"numbers": [0, 255, 256, 70000, -3, 2**40],
        b"flag": True,
        b"none": None,
    }


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32])
def test_python2_pickle_array_round_trips(dtype):
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4) * 11
    data = dumps_python2_pickle(array)

    for encoding in ("latin1", "bytes"):
        loaded = pickle.loads(data, encoding=encoding)
        assert loaded.dtype == array.dtype
        assert loaded.shape == (2, 3, 4)
        np.testing.assert_array_equal(loaded, array)


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

CIFAR10_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def test_cifar10_archive_members(tmp_path):
    make_cifar10(tmp_path)

    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "r:gz") as tar:
        names = set(tar.getnames())
        assert tar.getmember("cifar-10-batches-py").isdir()
    expected = {"cifar-10-batches-py"} | {
        f"cifar-10-batches-py/{name}" for name in [*CIFAR10_BATCHES, "batches.meta", "readme.html"]
    }
    assert names == expected


def test_cifar10_batches_load_as_python2_pickles(tmp_path):
    make_cifar10(tmp_path, per_batch=3)
    archive = tmp_path / "cifar-10-python.tar.gz"

    for name in CIFAR10_BATCHES:
        data = read_tar_member(archive, f"cifar-10-batches-py/{name}")
        as_bytes = pickle.loads(data, encoding="bytes")
        as_text = pickle.loads(data, encoding="latin1")

        assert set(as_bytes) == {b"data", b"labels", b"batch_label", b"filenames"}
        assert set(as_text) == {"data", "labels", "batch_label", "filenames"}
        assert isinstance(as_bytes[b"batch_label"], bytes)
        assert isinstance(as_text["batch_label"], str)
        assert all(isinstance(filename, bytes) for filename in as_bytes[b"filenames"])
        assert as_text["data"].dtype == np.uint8
        assert as_text["data"].shape == (3, 3072)
        np.testing.assert_array_equal(as_bytes[b"data"], as_text["data"])
        # Like the real files, the raw image bytes are not ASCII.
        with pytest.raises(UnicodeDecodeError):
            pickle.loads(data)


def test_cifar10_data_decodes_to_expected(tmp_path):
    expected = make_cifar10(tmp_path, per_batch=4, seed=3)
    archive = tmp_path / "cifar-10-python.tar.gz"

    decoded = {}
    for name in CIFAR10_BATCHES:
        batch = pickle.loads(read_tar_member(archive, f"cifar-10-batches-py/{name}"), encoding="bytes")
        images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        decoded[name] = (images, np.array(batch[b"labels"], dtype=np.int64))
    train_images = np.concatenate([decoded[f"data_batch_{number}"][0] for number in range(1, 6)])
    train_labels = np.concatenate([decoded[f"data_batch_{number}"][1] for number in range(1, 6)])

    assert expected["train"].images.shape == (20, 32, 32, 3)
    assert expected["train"].images.dtype == np.uint8
    assert expected["train"].labels.dtype == np.int64
    np.testing.assert_array_equal(expected["train"].images, train_images)
    np.testing.assert_array_equal(expected["train"].labels, train_labels)
    np.testing.assert_array_equal(expected["test"].images, decoded["test_batch"][0])
    np.testing.assert_array_equal(expected["test"].labels, decoded["test_batch"][1])
    assert len(np.unique(train_labels)) >= 4


def test_cifar10_channel_planar_layout(tmp_path):
    expected = make_cifar10(tmp_path, per_batch=2)
    batch = pickle.loads(
        read_tar_member(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py/data_batch_1"), encoding="latin1"
    )
    first = expected["train"].images[0]

    np.testing.assert_array_equal(batch["data"][0, :32], first[0, :, 0])
    np.testing.assert_array_equal(batch["data"][0, 1024:1056], first[0, :, 1])
    np.testing.assert_array_equal(batch["data"][0, 2048 + 32 : 2048 + 64], first[1, :, 2])


def test_cifar10_meta(tmp_path):
    expected = make_cifar10(tmp_path, per_batch=5)
    data = read_tar_member(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py/batches.meta")

    meta = pickle.loads(data, encoding="latin1")
    assert meta == {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 5, "num_vis": 3072}
    assert pickle.loads(data, encoding="bytes")[b"label_names"][0] == b"airplane"
    assert expected["classes"] == CIFAR10_CLASSES


def test_cifar10_is_deterministic(tmp_path):
    make_cifar10(tmp_path / "first", seed=7)
    make_cifar10(tmp_path / "second", seed=7)
    make_cifar10(tmp_path / "other", seed=8)

    first = md5_of(tmp_path / "first" / "cifar-10-python.tar.gz")
    assert md5_of(tmp_path / "second" / "cifar-10-python.tar.gz") == first
    assert md5_of(tmp_path / "other" / "cifar-10-python.tar.gz") != first


def test_cifar10_agrees_with_torchvision(tmp_path, monkeypatch):
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    expected = make_cifar10(tmp_path / "raw")
    with tarfile.open(tmp_path / "raw" / "cifar-10-python.tar.gz", "r:gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    # torchvision verifies the official MD5s, which a tiny archive cannot match.
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)

    for split, train in [("train", True), ("test", False)]:
        dataset = cifar.CIFAR10(str(tmp_path / "extracted"), train=train, download=False)
        np.testing.assert_array_equal(dataset.data, expected[split].images)
        np.testing.assert_array_equal(np.array(dataset.targets), expected[split].labels)
        assert dataset.classes == expected["classes"]


# ---------------------------------------------------------------------------
# CIFAR-100
# ---------------------------------------------------------------------------


def test_cifar100_class_names():
    assert len(CIFAR100_FINE_CLASSES) == 100
    assert len(set(CIFAR100_FINE_CLASSES)) == 100
    assert len(CIFAR100_COARSE_CLASSES) == 20
    assert CIFAR100_FINE_CLASSES[:3] == ["apple", "aquarium_fish", "baby"]
    assert CIFAR100_FINE_CLASSES[-1] == "worm"
    assert all(len(fines) == 5 for fines in CIFAR100_SUPERCLASSES.values())


def test_cifar100_archive_members(tmp_path):
    make_cifar100(tmp_path)

    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "r:gz") as tar:
        names = set(tar.getnames())
    assert names == {"cifar-100-python", "cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"}


def test_cifar100_pickles_decode_to_expected(tmp_path):
    expected = make_cifar100(tmp_path, n_train=12, n_test=6, seed=2)
    archive = tmp_path / "cifar-100-python.tar.gz"

    for split, count in [("train", 12), ("test", 6)]:
        data = read_tar_member(archive, f"cifar-100-python/{split}")
        as_bytes = pickle.loads(data, encoding="bytes")
        as_text = pickle.loads(data, encoding="latin1")

        assert set(as_bytes) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
        assert set(as_text) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
        images = as_text["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        assert images.shape == (count, 32, 32, 3)
        np.testing.assert_array_equal(images, expected[split].images)
        np.testing.assert_array_equal(np.array(as_text["fine_labels"]), expected[split].labels)
        for fine, coarse in zip(as_text["fine_labels"], as_text["coarse_labels"], strict=True):
            assert CIFAR100_FINE_CLASSES[fine] in CIFAR100_SUPERCLASSES[CIFAR100_COARSE_CLASSES[coarse]]

    assert len(np.unique(expected["train"].labels)) == 12


def test_cifar100_meta(tmp_path):
    expected = make_cifar100(tmp_path)
    data = read_tar_member(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python/meta")

    meta = pickle.loads(data, encoding="latin1")
    assert meta == {"fine_label_names": CIFAR100_FINE_CLASSES, "coarse_label_names": CIFAR100_COARSE_CLASSES}
    assert set(pickle.loads(data, encoding="bytes")) == {b"fine_label_names", b"coarse_label_names"}
    assert expected["classes"] == CIFAR100_FINE_CLASSES


def test_cifar100_agrees_with_torchvision(tmp_path, monkeypatch):
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    expected = make_cifar100(tmp_path / "raw")
    with tarfile.open(tmp_path / "raw" / "cifar-100-python.tar.gz", "r:gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    monkeypatch.setattr(cifar.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)

    for split, train in [("train", True), ("test", False)]:
        dataset = cifar.CIFAR100(str(tmp_path / "extracted"), train=train, download=False)
        np.testing.assert_array_equal(dataset.data, expected[split].images)
        np.testing.assert_array_equal(np.array(dataset.targets), expected[split].labels)
        assert dataset.classes == expected["classes"]


# ---------------------------------------------------------------------------
# STL-10
# ---------------------------------------------------------------------------

STL10_FILES = [
    "train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
    "unlabeled_X.bin", "class_names.txt", "fold_indices.txt",
]  # fmt: skip


def test_stl10_archive_members(tmp_path):
    make_stl10(tmp_path)

    with tarfile.open(tmp_path / "stl10_binary.tar.gz", "r:gz") as tar:
        names = set(tar.getnames())
    assert names == {"stl10_binary"} | {f"stl10_binary/{name}" for name in STL10_FILES}


def test_stl10_binaries_decode_with_transpose(tmp_path):
    expected = make_stl10(tmp_path, n_train=6, n_test=5, n_unlabeled=4, seed=1)
    archive = tmp_path / "stl10_binary.tar.gz"

    for split, count in [("train", 6), ("test", 5), ("unlabeled", 4)]:
        raw = np.frombuffer(read_tar_member(archive, f"stl10_binary/{split}_X.bin"), dtype=np.uint8)
        assert raw.size == count * 3 * 96 * 96
        images = raw.reshape(count, 3, 96, 96).transpose(0, 3, 2, 1)
        assert expected[split].images.shape == (count, 96, 96, 3)
        np.testing.assert_array_equal(images, expected[split].images)
    np.testing.assert_array_equal(expected["unlabeled"].labels, np.full(4, -1))

    for split in ("train", "test"):
        labels = np.frombuffer(read_tar_member(archive, f"stl10_binary/{split}_y.bin"), dtype=np.uint8)
        assert labels.min() >= 1
        assert labels.max() <= 10
        np.testing.assert_array_equal(labels.astype(np.int64) - 1, expected[split].labels)
        assert expected[split].labels.dtype == np.int64


def test_stl10_planes_are_column_major(tmp_path):
    expected = make_stl10(tmp_path, n_train=2, n_test=1, n_unlabeled=1)
    raw = np.frombuffer(read_tar_member(tmp_path / "stl10_binary.tar.gz", "stl10_binary/train_X.bin"), np.uint8)
    first = expected["train"].images[0]

    # The first 96 bytes are the red plane's first column, top to bottom.
    np.testing.assert_array_equal(raw[:96], first[:, 0, 0])
    np.testing.assert_array_equal(raw[96:192], first[:, 1, 0])
    np.testing.assert_array_equal(raw[96 * 96 : 96 * 96 + 96], first[:, 0, 1])


def test_stl10_text_files(tmp_path):
    expected = make_stl10(tmp_path, n_train=10)
    archive = tmp_path / "stl10_binary.tar.gz"

    class_names = read_tar_member(archive, "stl10_binary/class_names.txt").decode("ascii").splitlines()
    assert class_names == STL10_CLASSES
    assert expected["classes"] == STL10_CLASSES

    folds = read_tar_member(archive, "stl10_binary/fold_indices.txt").decode("ascii").splitlines()
    assert len(folds) == 10
    for line in folds:
        indices = [int(token) for token in line.split()]
        assert len(indices) == 2
        assert all(0 <= index < 10 for index in indices)


def test_stl10_image_size_option(tmp_path):
    expected = make_stl10(tmp_path, n_train=2, n_test=2, n_unlabeled=2, image_size=8)
    raw = np.frombuffer(read_tar_member(tmp_path / "stl10_binary.tar.gz", "stl10_binary/test_X.bin"), np.uint8)

    assert expected["test"].images.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(raw.reshape(2, 3, 8, 8).transpose(0, 3, 2, 1), expected["test"].images)


def test_stl10_agrees_with_torchvision(tmp_path, monkeypatch):
    stl10 = pytest.importorskip("torchvision.datasets.stl10")
    expected = make_stl10(tmp_path / "raw", n_train=5, n_test=3, n_unlabeled=4)
    with tarfile.open(tmp_path / "raw" / "stl10_binary.tar.gz", "r:gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    monkeypatch.setattr(stl10.STL10, "_check_integrity", lambda self: True)

    train = stl10.STL10(str(tmp_path / "extracted"), split="train+unlabeled", download=False)
    np.testing.assert_array_equal(
        train.data.transpose(0, 2, 3, 1),
        np.concatenate([expected["train"].images, expected["unlabeled"].images]),
    )
    np.testing.assert_array_equal(train.labels, np.concatenate([expected["train"].labels, np.full(4, -1)]))
    assert train.classes == expected["classes"]

    test = stl10.STL10(str(tmp_path / "extracted"), split="test", download=False)
    np.testing.assert_array_equal(test.data.transpose(0, 2, 3, 1), expected["test"].images)
    np.testing.assert_array_equal(test.labels, expected["test"].labels)


# ---------------------------------------------------------------------------
# Tiny ImageNet
# ---------------------------------------------------------------------------


def decode_jpeg(data: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, np.asarray(image.convert("RGB"))


def test_tinyimagenet_archive_members(tmp_path):
    expected = make_tinyimagenet(tmp_path, n_classes=2, per_class=2, n_val=3)

    with zipfile.ZipFile(tmp_path / "tiny-imagenet-200.zip") as archive:
        names = set(archive.namelist())
    first, second = expected["wnids"]
    for name in [
        "tiny-imagenet-200/",
        "tiny-imagenet-200/wnids.txt",
        "tiny-imagenet-200/words.txt",
        f"tiny-imagenet-200/train/{first}/images/{first}_0.JPEG",
        f"tiny-imagenet-200/train/{second}/images/{second}_1.JPEG",
        f"tiny-imagenet-200/train/{second}/{second}_boxes.txt",
        "tiny-imagenet-200/val/images/val_2.JPEG",
        "tiny-imagenet-200/val/val_annotations.txt",
        "tiny-imagenet-200/test/images/test_0.JPEG",
    ]:
        assert name in names
    jpegs = [name for name in names if name.endswith(".JPEG")]
    assert len(jpegs) == 2 * 2 + 3 + 2


def test_tinyimagenet_text_files(tmp_path):
    expected = make_tinyimagenet(tmp_path, n_classes=3)

    with zipfile.ZipFile(tmp_path / "tiny-imagenet-200.zip") as archive:
        wnids = archive.read("tiny-imagenet-200/wnids.txt").decode("ascii").split()
        words = dict(
            line.split("\t") for line in archive.read("tiny-imagenet-200/words.txt").decode("utf-8").splitlines()
        )
        boxes = archive.read(f"tiny-imagenet-200/train/{wnids[0]}/{wnids[0]}_boxes.txt").decode("ascii")

    assert wnids != sorted(wnids)
    assert sorted(wnids) == expected["wnids"]
    assert set(words) > set(wnids)
    assert expected["classes"] == [words[wnid].split(",")[0] for wnid in expected["wnids"]]
    assert expected["classes"] == ["goldfish", "European fire salamander", "bullfrog"]
    assert boxes.splitlines()[0].split("\t")[0] == f"{wnids[0]}_0.JPEG"
    assert len(boxes.splitlines()[0].split("\t")) == 5


def test_tinyimagenet_images_decode_to_expected(tmp_path):
    # 11 images per class and 11 val images make numeric and text order differ (2 < 10, "10" < "2").
    expected = make_tinyimagenet(tmp_path, n_classes=2, per_class=11, n_val=11, seed=4)

    with zipfile.ZipFile(tmp_path / "tiny-imagenet-200.zip") as archive:
        train_names = sorted(
            (name for name in archive.namelist() if "/train/" in name and name.endswith(".JPEG")),
            key=lambda name: (name.split("/")[2], int(name.rsplit("_", 1)[1].split(".")[0])),
        )
        train = [decode_jpeg(archive.read(name)) for name in train_names]
        annotations = [
            line.split("\t") for line in archive.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
        ]
        val = [decode_jpeg(archive.read(f"tiny-imagenet-200/val/images/val_{index}.JPEG")) for index in range(11)]

    assert expected["train"].images.shape == (22, 64, 64, 3)
    assert expected["train"].images.dtype == np.uint8
    np.testing.assert_array_equal(expected["train"].images, np.stack([pixels for _, pixels in train]))
    np.testing.assert_array_equal(expected["train"].labels, np.repeat([0, 1], 11))
    assert [mode for mode, _ in train].count("L") == 1

    assert [row[0] for row in annotations] == [f"val_{index}.JPEG" for index in range(11)]
    assert all(len(row) == 6 for row in annotations)
    val_labels = [expected["wnids"].index(row[1]) for row in annotations]
    np.testing.assert_array_equal(expected["test"].labels, val_labels)
    np.testing.assert_array_equal(expected["test"].images, np.stack([pixels for _, pixels in val]))
    assert val[-1][0] == "L"
    assert set(val_labels) == {0, 1}


def test_tinyimagenet_grayscale_expected_as_rgb(tmp_path):
    expected = make_tinyimagenet(tmp_path, n_classes=2, per_class=2, n_val=2)

    gray = expected["train"].images[1]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    color = expected["train"].images[0]
    assert not np.array_equal(color[..., 0], color[..., 1])


def test_tinyimagenet_rejects_too_many_classes(tmp_path):
    with pytest.raises(ValueError, match="n_classes"):
        make_tinyimagenet(tmp_path, n_classes=11)


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------

FASHIONMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def test_fashionmnist_idx_files_parse(tmp_path):
    expected = make_fashionmnist(tmp_path, n_train=20, n_test=10)

    for split, count in [("train", 20), ("test", 10)]:
        image_file, label_file = FASHIONMNIST_FILES[split]
        images = gzip.decompress((tmp_path / image_file).read_bytes())
        labels = gzip.decompress((tmp_path / label_file).read_bytes())

        assert struct.unpack(">IIII", images[:16]) == (2051, count, 28, 28)
        assert struct.unpack(">II", labels[:8]) == (2049, count)
        assert len(images) == 16 + count * 28 * 28
        assert len(labels) == 8 + count
        pixels = np.frombuffer(images[16:], dtype=np.uint8).reshape(count, 28, 28, 1)
        np.testing.assert_array_equal(pixels, expected[split].images)
        np.testing.assert_array_equal(np.frombuffer(labels[8:], dtype=np.uint8), expected[split].labels)
        assert expected[split].labels.dtype == np.int64

    assert len(np.unique(expected["train"].labels)) == 10
    assert expected["classes"] == FASHIONMNIST_CLASSES


def test_fashionmnist_agrees_with_torchvision(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    expected = make_fashionmnist(tmp_path / "gz", n_train=6, n_test=4)
    # torchvision reads the uncompressed files from <root>/FashionMNIST/raw.
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for image_file, label_file in FASHIONMNIST_FILES.values():
        for name in (image_file, label_file):
            with gzip.open(tmp_path / "gz" / name) as source, open(raw / name.removesuffix(".gz"), "wb") as target:
                shutil.copyfileobj(source, target)

    for split, train in [("train", True), ("test", False)]:
        dataset = datasets.FashionMNIST(str(tmp_path / "root"), train=train, download=False)
        np.testing.assert_array_equal(dataset.data.numpy(), expected[split].images[..., 0])
        np.testing.assert_array_equal(dataset.targets.numpy(), expected[split].labels)
        assert dataset.classes == expected["classes"]


def test_md5_of_matches_known_digest(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"abc")

    assert md5_of(path) == "900150983cd24fb0d6963f7d28e17f72"


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------


def serve_file(server, name: str, size: int = 5000) -> bytes:
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    (server.root / name).parent.mkdir(parents=True, exist_ok=True)
    (server.root / name).write_bytes(data)
    return data


def get(url: str, range_header: str | None = None):
    request = urllib.request.Request(url)
    if range_header is not None:
        request.add_header("Range", range_header)
    return urllib.request.urlopen(request, timeout=10)


def get_http_error(url: str, range_header: str | None = None) -> urllib.error.HTTPError:
    with pytest.raises(urllib.error.HTTPError) as error:
        get(url, range_header)
    error.value.close()
    return error.value


def test_server_full_get(http_server):
    data = serve_file(http_server, "archive.tar.gz")

    with get(http_server.url + "archive.tar.gz") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.read() == data
    assert http_server.url.startswith("http://127.0.0.1:")
    assert http_server.url.endswith("/")
    assert http_server.requests == [("archive.tar.gz", None)]


def test_server_range_get_returns_tail(http_server):
    data = serve_file(http_server, "mirror/archive.zip")

    with get(http_server.url + "mirror/archive.zip", "bytes=1234-") as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1234-{len(data) - 1}/{len(data)}"
        assert response.headers["Content-Length"] == str(len(data) - 1234)
        assert response.read() == data[1234:]
    with get(http_server.url + "mirror/archive.zip", "bytes=10-19") as response:
        assert response.status == 206
        assert response.read() == data[10:20]
    assert http_server.requests == [("mirror/archive.zip", "bytes=1234-"), ("mirror/archive.zip", "bytes=10-19")]
    assert http_server.request_count("mirror/archive.zip") == 2


def test_server_unsatisfiable_range(http_server):
    data = serve_file(http_server, "archive.tar.gz")

    error = get_http_error(http_server.url + "archive.tar.gz", f"bytes={len(data)}-")
    assert error.code == 416
    assert error.headers["Content-Range"] == f"bytes */{len(data)}"


def test_server_truncated_transfer_raises(http_server):
    data = serve_file(http_server, "archive.tar.gz")
    http_server.fail_after_bytes["archive.tar.gz"] = 100

    with get(http_server.url + "archive.tar.gz") as response:
        assert response.headers["Content-Length"] == str(len(data))
        with pytest.raises(http.client.IncompleteRead) as error:
            response.read()
    assert error.value.partial == data[:100]

    with get(http_server.url + "archive.tar.gz", "bytes=100-") as response:
        with pytest.raises(http.client.IncompleteRead) as error:
            response.read()
    assert error.value.partial == data[100:200]


def test_server_fail_times_limits_truncation(http_server):
    data = serve_file(http_server, "archive.tar.gz")
    http_server.fail_after_bytes["archive.tar.gz"] = 100
    http_server.fail_times["archive.tar.gz"] = 1

    with get(http_server.url + "archive.tar.gz") as response:
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    with get(http_server.url + "archive.tar.gz", "bytes=100-") as response:
        assert response.read() == data[100:]
    assert http_server.fail_times["archive.tar.gz"] == 0


def test_server_truncated_transfer_raises_in_requests(http_server):
    requests = pytest.importorskip("requests")
    serve_file(http_server, "archive.tar.gz", size=200_000)
    http_server.fail_after_bytes["archive.tar.gz"] = 70_000

    with pytest.raises(requests.exceptions.RequestException):
        with requests.get(http_server.url + "archive.tar.gz", stream=True, timeout=10) as response:
            for _ in response.iter_content(chunk_size=16_384):
                pass


def test_server_missing_file_is_404(http_server):
    error = get_http_error(http_server.url + "missing.tar.gz")
    assert error.code == 404
    assert http_server.requests == [("missing.tar.gz", None)]


def test_server_does_not_serve_outside_root(http_server):
    (http_server.root.parent / "secret.txt").write_bytes(b"secret")
    host, port = http_server.url.removeprefix("http://").rstrip("/").split(":")

    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/../secret.txt")
        response = connection.getresponse()
        assert response.status == 404
        assert b"secret" != response.read()
    finally:
        connection.close()


def test_server_error_path_is_500(http_server):
    serve_file(http_server, "archive.tar.gz")
    http_server.error_paths.add("archive.tar.gz")

    error = get_http_error(http_server.url + "archive.tar.gz", "bytes=0-")
    assert error.code == 500
    assert http_server.requests == [("archive.tar.gz", "bytes=0-")]


def test_server_head_sends_no_body(http_server):
    data = serve_file(http_server, "archive.tar.gz")

    request = urllib.request.Request(http_server.url + "archive.tar.gz", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        assert response.read() == b""
