from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.http_server import FileServer
from tests.tiny import make_tiny_root


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[FileServer]:
    """Serve ``tmp_path/served`` over HTTP on 127.0.0.1 for the duration of one test."""
    root = tmp_path / "served"
    root.mkdir()
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """Run a module's tests with one torch thread: on tiny tensors a second one only adds contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A prepared Fashion-MNIST-format dataset of 256 train and 64 test random images."""
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))
