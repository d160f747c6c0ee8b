"""The text-embedding cache (tpgrpo/training/embedding_cache.py, model.prompt_cache)."""
import json
import threading

import pytest
import torch

from tpgrpo.distributed import Collectives
from tpgrpo.errors import UserInputError
from tpgrpo.families import FlowModel
from tpgrpo.training.embedding_cache import EmbeddingCache, StaleCacheError, cache_key, distinct_prompts, model_fingerprint

PROMPTS = ["a photo of a circle", "a photo of two squares", "a photo of a red triangle", "a photo of a circle and a square"]


@pytest.fixture
def flow(tiny_model_dir):
    from tpgrpo.tiny.components import load_pipeline

    return FlowModel.from_pipeline(load_pipeline(tiny_model_dir), max_sequence_length=1)


def test_distinct_prompts_keep_order_and_put_the_empty_prompt_first():
    assert distinct_prompts([["b", "a", "b"], ["c", "a"]]) == ["", "b", "a", "c"]


def test_the_key_changes_with_the_model_settings_and_the_prompts(flow):
    fingerprint = model_fingerprint(flow, "some/model")
    key = cache_key(fingerprint, PROMPTS)
    assert key == cache_key(model_fingerprint(flow, "some/model"), PROMPTS)
    assert key != cache_key(fingerprint, PROMPTS[::-1])
    assert key != cache_key(fingerprint, PROMPTS[:-1])
    assert key != cache_key(model_fingerprint(flow, "other/model"), PROMPTS)
    flow.max_sequence_length = 2
    assert key != cache_key(model_fingerprint(flow, "some/model"), PROMPTS)


def test_cached_rows_equal_a_fresh_encode_and_the_folder_is_complete(flow, tmp_path):
    prompts = distinct_prompts([PROMPTS])
    cache = EmbeddingCache(tmp_path, "k1", prompts)
    cache.build(flow, Collectives(), batch_size=2)
    cache.open()
    asked = [PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    got, expected = cache.lookup(asked), flow.encode_uncached(asked)
    torch.testing.assert_close(got.prompt_embeds, expected.prompt_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled, expected.pooled, rtol=1e-5, atol=1e-6)
    assert cache.lookup(["never cached"]) is None
    manifest = json.loads((tmp_path / "k1" / "manifest.json").read_text())
    assert manifest["count"] == len(prompts) == 5 and manifest["world_size"] == 1
    assert json.loads((tmp_path / "k1" / "prompts.json").read_text()) == prompts
    # encode() reads the cache: with the text encoders gone it still answers cached prompts
    flow.embedding_cache = cache
    flow.text_encoders = torch.nn.ModuleList()
    torch.testing.assert_close(flow.encode(asked).pooled, expected.pooled, rtol=1e-5, atol=1e-6)


def test_two_ranks_each_encode_a_share_and_read_all(flow, tmp_path):
    prompts = distinct_prompts([PROMPTS])
    barrier = threading.Barrier(2)
    caches = [EmbeddingCache(tmp_path, "k2", prompts) for _ in range(2)]
    errors = []

    def build(rank):
        try:
            caches[rank].build(flow, Collectives(rank=rank, world_size=2), barrier=barrier.wait)
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=build, args=(rank,)) for rank in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert sorted(p.name for p in (tmp_path / "k2").glob("shard-*")) == [
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"
    ]
    for cache in caches:
        cache.open()
        torch.testing.assert_close(cache.lookup(prompts).pooled, flow.encode_uncached(prompts).pooled, rtol=1e-5, atol=1e-6)


def test_a_corrupt_cache_is_rebuilt_and_a_stale_one_refused(flow, tmp_path):
    prompts = distinct_prompts([PROMPTS])
    EmbeddingCache(tmp_path, "k3", prompts).build(flow, Collectives())
    shard = next((tmp_path / "k3").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, e.g. a run killed while writing
    with pytest.raises(Exception, match="incomplete or corrupt .*wrong size"):
        EmbeddingCache(tmp_path, "k3", prompts).open()
    with pytest.warns(UserWarning, match="rebuilding"):
        EmbeddingCache(tmp_path, "k3", prompts).build(flow, Collectives())
    cache = EmbeddingCache(tmp_path, "k3", prompts).open()
    cache.check(flow, prompts[:2])  # fresh: passes
    with torch.no_grad():  # new weights at the same path: the cache no longer describes them
        for p in flow.text_encoders.parameters():
            p.mul_(1.5)
    with pytest.raises(StaleCacheError, match="delete the folder"):
        cache.check(flow, prompts[:2])


def test_fit_with_the_cache_reads_embeddings_and_releases_the_text_encoders(tmp_path, tiny_model_dir, prompt_file):
    from tests.test_train import cli_args
    from tpgrpo.cli import build_cli

    folder = tmp_path / "cache"
    cli = build_cli(["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file,
                                      "--model.prompt_cache.enabled=true", f"--model.prompt_cache.folder={folder}")])
    flow = cli.model.flow
    assert flow.embedding_cache is not None and flow.offload_text_encoders
    assert all(p.device.type == "cpu" for p in flow.text_encoders.parameters())
    (manifest,) = folder.glob("*/manifest.json")
    assert json.loads(manifest.read_text())["count"] == 5  # 4 prompts (train = val here) and the empty one
    assert cli.trainer.global_step == 2


def test_bytes_changed_inside_a_shard_fail_its_checksum_and_the_shard_is_rebuilt(flow, tmp_path):
    """Random bytes written into the middle of a shard keep its size; the checksum finds them."""
    prompts = distinct_prompts([PROMPTS])
    EmbeddingCache(tmp_path, "k4", prompts).build(flow, Collectives())
    shard = next((tmp_path / "k4").glob("shard-*"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    shard.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match=r"incomplete or corrupt \(shard-\S+ fails its SHA-256 checksum\)") as caught:
        EmbeddingCache(tmp_path, "k4", prompts).open()
    assert "\n" not in str(caught.value)
    with pytest.warns(UserWarning, match="rebuilding the embedding cache .*fails its SHA-256 checksum"):
        EmbeddingCache(tmp_path, "k4", prompts).build(flow, Collectives())
    cache = EmbeddingCache(tmp_path, "k4", prompts).open()
    torch.testing.assert_close(cache.lookup(prompts[:2]).tensors()["prompt_embeds"], flow.encode_uncached(prompts[:2]).tensors()["prompt_embeds"])
