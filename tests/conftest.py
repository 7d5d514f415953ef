from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_server import FileServer


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[FileServer]:
    """Serve ``tmp_path/served`` over HTTP on 127.0.0.1 for the duration of one test."""
    root = tmp_path / "served"
    root.mkdir()
    with FileServer(root) as server:
        yield server
