"""Text embeddings of every prompt of a run, encoded once and kept on disk (``model.prompt_cache``).

The text encoders of SD3.5 (T5-XXL above all) are larger than the transformer, yet they only
turn a fixed set of prompts into embeddings. With the cache on, `PromptCacheCallback` (which the
module attaches) encodes the run's prompt files (training and evaluation) once, each rank a share of them, writes the
embeddings as safetensors under ``<folder>/<key>/``, and moves the text encoders off the
accelerator for the rest of the run; `FlowModel.encode` then reads the rows it needs.

``key`` is a hash of the model (path, family, weights dtype, sequence length, the text encoders'
and tokenizers' configs) and of the prompts, so another model or another prompt file gets
another folder. A folder is used only when its manifest (written last, after every shard) lists
the shards with the expected key, counts, sizes and SHA-256 checksums; a missing, partial or
corrupt folder is rebuilt (saying why), and a cached prompt that no longer encodes to its cached embedding (the weights at the
same path changed) is refused with the folder to delete, so the cache is never silently wrong.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import safe_open
from safetensors.torch import save_file

from tpgrpo.distributed import Collectives
from tpgrpo.errors import UserInputError
from tpgrpo.families import FlowModel, PromptEmbeds, text_tokenizer

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the manifest holds each shard's SHA-256
CHECK_TOLERANCE = 1e-3  # relative: float noise of a re-encode, far below any change of weights


class StaleCacheError(UserInputError):
    """The cached embeddings no longer match what the text encoders compute."""


def model_fingerprint(flow: FlowModel, pretrained_path: str) -> dict:
    """What determines a prompt's embedding, apart from the prompt itself."""
    pipe = flow.pipe
    encoders = {
        name: getattr(pipe, name).config.to_dict()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
        if getattr(pipe, name, None) is not None
    }
    tokenizers = {
        name: [type(tokenizer).__name__, len(text_tokenizer(tokenizer)), text_tokenizer(tokenizer).model_max_length]
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
        if (tokenizer := getattr(pipe, name, None)) is not None
    }
    return {
        "format": FORMAT,
        "pretrained_path": str(pretrained_path),
        "family": flow.family,
        "dtype": str(next(iter(flow.text_encoders.parameters())).dtype) if len(flow.text_encoders) else "none",
        "max_sequence_length": flow.max_sequence_length,
        "text_encoders": encoders,
        "tokenizers": tokenizers,
        "system_message": getattr(pipe, "system_message", None),  # FLUX.2 [dev] encodes it before each prompt
    }


def cache_key(fingerprint: dict, prompts: Sequence[str]) -> str:
    """A hex digest of the model's fingerprint and the (ordered, distinct) prompts."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    for prompt in prompts:
        digest.update(b"\0" + prompt.encode())
    return digest.hexdigest()[:32]


def distinct_prompts(prompt_lists: Sequence[Sequence[str]]) -> list[str]:
    """Every distinct prompt of the lists, in first-seen order, with the empty prompt (CFG's) first."""
    return list(dict.fromkeys(["", *(p for prompts in prompt_lists for p in prompts)]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


class EmbeddingCache:
    """The cached embeddings of ``prompts`` in ``folder/<key>``; `lookup` gives rows of any of them."""

    def __init__(self, folder: str | Path, key: str, prompts: Sequence[str]):
        self.root = Path(folder) / key
        self.key = key
        self.prompts = list(prompts)
        self._where: dict[str, tuple[int, int]] = {}  # prompt -> (shard, row)
        self._shards: list = []
        self._checked: dict | None = None  # the manifest, once its shards passed their checksums

    # ------------------------------------------------------------------------------ building
    def _manifest(self) -> tuple[dict | None, str]:
        """The folder's manifest if the folder is complete and intact, else None and why not. Each shard's
        size and SHA-256 are checked against the manifest (once per cache object: hashing reads every byte)."""
        if self._checked is not None:
            return self._checked, ""
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return None, "no readable manifest"
        if manifest.get("key") != self.key or manifest.get("count") != len(self.prompts):
            return None, "the manifest describes other prompts or another model"
        for shard in manifest.get("shards", []):
            file = self.root / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                return None, f"{shard['file']} is missing or has the wrong size"
            if _sha256(file) != shard.get("sha256"):
                return None, f"{shard['file']} fails its SHA-256 checksum"
        self._checked = manifest
        return manifest, ""

    def build(self, flow: FlowModel, comm: Collectives, batch_size: int = 64, barrier: Callable[[], None] = lambda: None) -> None:
        """Encode and write this rank's share of the prompts unless a valid cache is there; every rank calls this."""
        manifest, problem = self._manifest()
        if manifest is not None:
            rank_zero_info(f"text embeddings of {len(self.prompts)} prompts read from {self.root}")
            return
        if comm.rank == 0 and self.root.exists():
            rank_zero_warn(f"rebuilding the embedding cache {self.root}: {problem}")
            shutil.rmtree(self.root)
        barrier()
        self.root.mkdir(parents=True, exist_ok=True)
        mine = self.prompts[comm.rank :: comm.world_size]
        parts = [flow.encode_uncached(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]
        if parts:
            embeds = PromptEmbeds.cat(parts)
        else:  # more ranks than prompts: an empty shard of the right widths
            embeds = flow.encode_uncached([""]).index([])
        name = _shard_name(comm.rank, comm.world_size)
        tensors = {field: value.cpu().contiguous() for field, value in embeds.tensors().items()}
        save_file(tensors, str(self.root / (name + ".tmp")), metadata={"key": self.key, "count": str(len(mine))})
        (self.root / (name + ".tmp")).replace(self.root / name)
        barrier()
        if comm.rank == 0:
            files = [self.root / _shard_name(r, comm.world_size) for r in range(comm.world_size)]
            shards = [{"file": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files]
            (self.root / "prompts.json").write_text(json.dumps(self.prompts))
            manifest = {"key": self.key, "count": len(self.prompts), "world_size": comm.world_size, "shards": shards}
            (self.root / (MANIFEST + ".tmp")).write_text(json.dumps(manifest))
            (self.root / (MANIFEST + ".tmp")).replace(self.root / MANIFEST)  # last: the folder is complete
            rank_zero_info(f"text embeddings of {len(self.prompts)} prompts written to {self.root}")
        barrier()

    # ------------------------------------------------------------------------------ reading
    def open(self) -> EmbeddingCache:
        """Map the shards (memory-mapped: rows are read when looked up)."""
        manifest, problem = self._manifest()
        if manifest is None:
            raise UserInputError(f"the embedding cache {self.root} is incomplete or corrupt ({problem}); delete it to rebuild it")
        world = manifest["world_size"]
        self._shards, self._where = [], {}
        for rank in range(world):
            try:
                handle = safe_open(str(self.root / _shard_name(rank, world)), framework="pt")
            except Exception as error:  # safetensors raises its own error types for a damaged header
                raise UserInputError(f"the embedding cache {self.root} is corrupt ({error}); delete it to rebuild it") from None
            self._shards.append(handle)
            for row, prompt in enumerate(self.prompts[rank::world]):
                self._where[prompt] = (rank, row)
        return self

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._where

    def lookup(self, prompts: Sequence[str]) -> PromptEmbeds | None:
        """Embeddings (N rows) of ``prompts``, or None when one of them is not in the cache."""
        if not self._shards or any(p not in self._where for p in prompts):
            return None
        rows = []
        for prompt in prompts:
            shard, row = self._where[prompt]
            handle = self._shards[shard]
            rows.append(PromptEmbeds(**{field: handle.get_slice(field)[row : row + 1] for field in handle.keys()}))
        return PromptEmbeds.cat(rows)

    def check(self, flow: FlowModel, prompts: Sequence[str]) -> None:
        """Re-encode ``prompts`` and compare with the cache; `StaleCacheError` when they differ."""
        cached, fresh = self.lookup(prompts).tensors(), flow.encode_uncached(list(prompts)).tensors()
        if cached.keys() != fresh.keys():
            raise StaleCacheError(
                f"the embedding cache {self.root} holds {sorted(cached)} but the model gives {sorted(fresh)}; "
                "delete the folder to rebuild it"
            )
        for name in fresh:
            a, b = cached[name].float(), fresh[name].float().cpu()
            scale = max(float(b.abs().max()), 1e-6)
            if a.shape != b.shape or float((a - b).abs().max()) > CHECK_TOLERANCE * scale:
                raise StaleCacheError(
                    f"the embedding cache {self.root} does not match the text encoders ({name} differs): "
                    "the weights changed at the same path; delete the folder to rebuild it"
                )


class PromptCacheCallback(Callback):
    """The cache's lifecycle in a run: before fit, validate, test and predict, with the module's
    ``prompt_cache.enabled``, encode the stage's prompt files once (each rank a share), check the
    cache against the text encoders, read prompts from it from then on, and move the text encoders
    off the accelerator (``release_text_encoders``). A stage whose prompts are cached already
    (validation inside fit) reuses the cache."""

    def _prepare(self, trainer, module) -> None:
        settings, datamodule = module.prompt_cache, getattr(trainer, "datamodule", None)
        if not settings.enabled or datamodule is None:
            return
        flow = module.flow
        prompts = distinct_prompts([s.prompts for s in datamodule.prompt_sets.values()])
        key = cache_key(model_fingerprint(flow, module.pretrained_path), prompts)
        if flow.embedding_cache is not None and flow.embedding_cache.key == key:
            return
        cache = EmbeddingCache(settings.folder, key, prompts)
        cache.build(flow, module.algorithm.comm(), settings.batch_size, barrier=trainer.strategy.barrier)
        cache.open().check(flow, prompts[:2])
        flow.embedding_cache = cache
        if settings.release_text_encoders:
            flow.release_text_encoders()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._prepare(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":  # in fit, on_fit_start covered the validation prompts
            self._prepare(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._prepare(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._prepare(trainer, pl_module)
