"""Shared fixtures: tiny random SD3-architecture models saved to disk, built offline."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models gain little from threads; oversubscribed threads cost a lot
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: their subprocesses get one thread too
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def no_leftover_process_group():
    """An in-process ``ddp``/``fsdp2`` fit leaves its process group and MASTER_PORT behind; take both
    away, so that later tests of this worker (and the subprocesses they start) pick their own port."""
    environment = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random SD3 pipeline saved with ``save_pretrained`` (a stand-in for SD3.5)."""
    from tpgrpo.tiny.components import build_pipeline

    path = tmp_path_factory.mktemp("tiny_sd3")
    build_pipeline(seed=0, num_layers=2).save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    """A jsonl prompt file with four shapes prompts."""
    import json

    records = [
        {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
        {"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": "a photo of a square"},
        {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}], "prompt": "a photo of a red triangle"},
        {"tag": "counting", "include": [{"class": "circle", "count": 2}], "prompt": "a photo of two circles"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pytest_collection_modifyitems(config, items):
    """Under `make test` (``--dist loadgroup``) each test file stays on one worker, so its module
    fixtures are built once (a test may name another group, as the long multi-process runs do),
    except tests/test_readme.py: its documented commands are independent and spread over the workers."""
    for item in items:
        if item.path.name != "test_readme.py" and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
