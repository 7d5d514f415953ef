"""Point msvq's dataset registry at tiny test archives, in processes the tests start.

The end-to-end tests run real Snakemake and DVC, whose jobs are new `msvq`
processes, so patching the registry inside pytest would not reach them. The tests
put this directory on PYTHONPATH, which makes Python import this module at start-up,
and set MSVQ_TEST_REGISTRY to a JSON file of the form
``{dataset: {"files": {file name: md5}}}``. Each named dataset then accepts those
digests, has no split-size check and no built-in mirrors. Without the variable this
module does nothing.
"""

import dataclasses
import json
import os


def _patch_registry(path: str) -> None:
    from msvq.data import registry

    with open(path) as handle:
        datasets = json.load(handle)
    for name, entry in datasets.items():
        official = registry.DATASETS[name]
        files = tuple(
            dataclasses.replace(remote, md5=entry["files"][remote.name], content_md5=None, urls=("http://127.0.0.1:9/" + remote.name,))
            for remote in official.files
        )
        registry.DATASETS[name] = dataclasses.replace(official, files=files, counts=None, mirrors=())


if os.environ.get("MSVQ_TEST_REGISTRY"):
    _patch_registry(os.environ["MSVQ_TEST_REGISTRY"])
