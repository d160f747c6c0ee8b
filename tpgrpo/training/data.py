"""Prompt files and the DataModule: training batches of complete prompt groups, split across ranks.

Prompt files are ``.txt`` (one prompt per line, blank lines skipped; metadata ``{}``),
``.jsonl`` (one JSON object per line with a ``"prompt"`` key; the whole record is the
prompt's metadata, passed to the rewards, whatever its classes: checking a record against a
reward's world, e.g. the shapes world's, is that reward's job), or a table, ``.csv`` (read with
the standard library) or ``.parquet`` (needs ``pyarrow``), of which only the column
``prompt_column`` (default ``"caption"``, Pick-a-Pic's) is read; empty cells are skipped and the
metadata is ``{}``.

Training: every epoch shuffles the prompts with ``(seed, epoch)``. Global step ``s`` takes the
next ``prompts_per_step × world_size`` prompts of that permutation; rank ``r`` takes the
``r``-th block of ``prompts_per_step`` of them and repeats each ``group_size`` times. So each
group lives on exactly one rank (group statistics need no gathering), ranks never share a
prompt within an epoch, and one process with ``prompts_per_step × world_size`` prompts sees
exactly the union of the ranks' batches, with the same group ids. A trailing remainder of
fewer than ``prompts_per_step × world_size`` prompts is skipped in that epoch (it is shuffled
into others).

Evaluation (validate / test / predict): every prompt × seeds ``0 .. eval_seeds - 1`` in file
order, split into contiguous blocks across ranks (no duplicates; ranks may differ by one
batch, so eval steps must not run collectives themselves).

Lightning: the samplers subclass ``DistributedSampler``, so Lightning never replaces or wraps
them, whatever ``use_distributed_sampler`` says. Lightning calls ``set_epoch`` with its own
(checkpointed) epoch, and a run resumed in the middle of an epoch skips the batches that were
already trained (read from Lightning's loop progress), so a resumed run sees the same prompts
as an uninterrupted one; Lightning's warning that the dataloader "is not resumable" does not
apply.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tpgrpo.errors import UserInputError

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
DEFAULT_PROMPT_COLUMN = "caption"  # Pick-a-Pic's prompt column
# The prompt file argument each Lightning stage reads.
STAGE_FILES: Mapping[str, str] = {
    "fit": "train_prompts", "validate": "val_prompts", "test": "test_prompts", "predict": "predict_prompts"
}


class PromptFileError(UserInputError):
    """A prompt file that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one file and their metadata records (same length, file order)."""

    path: str
    prompts: list[str]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.prompts)


def read_prompts(path: str | Path, prompt_column: str = DEFAULT_PROMPT_COLUMN) -> PromptSet:
    """Read a ``.txt``, ``.jsonl``, ``.csv`` or ``.parquet`` prompt file; raise `PromptFileError` on any problem.

    ``prompt_column``: the column holding the prompts in a ``.csv`` or ``.parquet`` table.
    """
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise PromptFileError(
            f"{path}: unsupported prompt file type {path.suffix!r}; use {', '.join(PROMPT_SUFFIXES)}"
        )
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    if path.suffix == ".parquet":
        prompts = _parquet_prompts(path, prompt_column)
        metadata: list[dict[str, Any]] = [{} for _ in prompts]
    else:
        try:
            content = path.read_bytes()
        except OSError as error:
            raise PromptFileError(f"{path}: cannot read the prompt file ({error.strerror or error})") from None
        if path.suffix == ".csv":
            prompts = _csv_prompts(content, path, prompt_column)
            metadata = [{} for _ in prompts]
        else:
            prompts, metadata = _line_prompts(content, path)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in the file (it is empty or blank)")
    return PromptSet(str(path), prompts, metadata)


def _line_prompts(content: bytes, path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Prompts and metadata of a ``.txt`` or ``.jsonl`` file's bytes (blank lines skipped)."""
    prompts: list[str] = []
    metadata: list[dict[str, Any]] = []
    for number, raw in enumerate(content.splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise PromptFileError(f"{path}, line {number}: not UTF-8 text") from None
        if not line:
            continue
        prompt, record = (line, {}) if path.suffix == ".txt" else _parse_record(line, path, number)
        prompts.append(prompt)
        metadata.append(record)
    return prompts, metadata


def _missing_column(path: Path, column: str, columns: Sequence[str]) -> PromptFileError:
    found = ", ".join(repr(c) for c in columns) or "none"
    return PromptFileError(f"{path}: no column {column!r} (columns: {found}); set data.prompt_column")


def _csv_prompts(content: bytes, path: Path, column: str) -> list[str]:
    """The non-empty cells of ``column`` of a CSV file's bytes (UTF-8, a header row first), stripped."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = content[: error.start].count(b"\n") + 1
        raise PromptFileError(f"{path}, line {line}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    prompts: list[str] = []
    try:
        if reader.fieldnames is None:
            return prompts
        if column not in reader.fieldnames:
            raise _missing_column(path, column, reader.fieldnames)
        for row in reader:
            cell = (row.get(column) or "").strip()
            if cell:
                prompts.append(cell)
    except csv.Error as error:
        raise PromptFileError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
    return prompts


def _parquet_prompts(path: Path, column: str) -> list[str]:
    """The non-empty string values of ``column`` of a Parquet file, stripped (only that column is read)."""
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise PromptFileError(f"{path}: reading .parquet prompt files needs pyarrow; pip install pyarrow") from None
    try:
        schema = parquet.read_schema(path)
        if column not in schema.names:
            raise _missing_column(path, column, schema.names)
        values = parquet.read_table(path, columns=[column]).column(column).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PromptFileError(f"{path}: cannot read the Parquet file ({reason})") from None
    prompts: list[str] = []
    for row, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, str):
            raise PromptFileError(
                f"{path}, row {row}: column {column!r} holds {type(value).__name__} values, not prompt strings"
            )
        if value.strip():
            prompts.append(value.strip())
    return prompts


def _parse_record(line: str, path: Path, number: int) -> tuple[str, dict[str, Any]]:
    """The prompt and metadata of one jsonl line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{path}, line {number}: expected a JSON object with a \"prompt\" key")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{path}, line {number}: no \"prompt\" key with a non-empty string")
    return prompt, record


# ---------------------------------------------------------------------------- training
class GroupSampler(DistributedSampler):
    """Yields, per training step of one rank, ``[(prompt_index, group_id), ...]`` of P groups.

    ``group_id = epoch × groups_per_epoch + position in the epoch's permutation``: unique over
    ranks and epochs. ``batches_done``: called when an epoch starts, returns how many of its
    batches were already trained (non-zero when resuming mid-epoch); they are skipped.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batches_done: Callable[[], int] | None = None,
    ):
        super().__init__(range(num_prompts), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.num_prompts = num_prompts
        self.prompts_per_step = prompts_per_step
        self.batches_done = batches_done

    @property
    def steps_per_epoch(self) -> int:
        return self.num_prompts // (self.prompts_per_step * self.num_replicas)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # A generator: the epoch is read at the first batch, after Lightning's set_epoch.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_prompts, generator=generator).tolist()
        step_size = self.prompts_per_step * self.num_replicas
        first_group = self.epoch * self.steps_per_epoch * step_size
        start = self.batches_done() if self.batches_done is not None else 0
        for step in range(start, self.steps_per_epoch):
            begin = step * step_size + self.rank * self.prompts_per_step
            yield [(order[pos], first_group + pos) for pos in range(begin, begin + self.prompts_per_step)]


class GroupBatches(Dataset):
    """Turns a `GroupSampler` plan into a training batch of P × G rows.

    Batch: ``prompts`` list[str] (P·G,), ``metadata`` list[dict] (P·G,), ``group_ids`` and
    ``prompt_index`` LongTensor (P·G,); each group's ``group_size`` rows are contiguous.
    """

    def __init__(self, prompts: PromptSet, group_size: int):
        self.prompts = prompts
        self.group_size = group_size

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, plan: list[tuple[int, int]]) -> dict[str, Any]:
        rows = [(index, group) for index, group in plan for _ in range(self.group_size)]
        return {
            "prompts": [self.prompts.prompts[index] for index, _ in rows],
            "metadata": [self.prompts.metadata[index] for index, _ in rows],
            "group_ids": torch.tensor([group for _, group in rows], dtype=torch.long),
            "prompt_index": torch.tensor([index for index, _ in rows], dtype=torch.long),
        }


# ---------------------------------------------------------------------------- evaluation
class EvalSampler(DistributedSampler):
    """Yields this rank's batches of evaluation items (``item = prompt_index × seeds + seed``).

    The items ``0 .. num_items - 1`` are split into contiguous, balanced blocks, one per rank.
    Every rank gets ``ceil(num_items / world_size)`` items in batches of the same sizes (a rank
    with a shorter block repeats its last item, marked as padding), because sharded models make
    collective calls in every forward pass. Each batch plan is ``(items, number of real items)``.
    """

    def __init__(self, num_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        super().__init__(range(num_items), num_replicas=world_size, rank=rank, shuffle=False)
        self.begin = rank * num_items // world_size
        self.end = (rank + 1) * num_items // world_size
        self.per_rank = -(-num_items // world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[list[int], int]]:
        items = list(range(self.begin, self.end))
        items += items[-1:] * (self.per_rank - len(items))
        for start in range(0, self.per_rank, self.batch_size):
            batch = items[start : start + self.batch_size]
            yield batch, max(0, min(len(batch), self.end - self.begin - start))


class EvalBatches(Dataset):
    """Turns an `EvalSampler` plan into a batch: every prompt with seeds ``0 .. seeds - 1``.

    Batch: ``prompts``, ``metadata`` (B,), ``prompt_index``, ``seeds`` and ``index`` (the
    item number, unique per image, for file names) LongTensor (B,), and ``real`` BoolTensor (B,):
    False for padding rows, which are left out of scores and files.
    """

    def __init__(self, prompts: PromptSet, seeds: int):
        self.prompts = prompts
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.prompts) * self.seeds

    def __getitem__(self, plan: tuple[list[int], int]) -> dict[str, Any]:
        items, num_real = plan
        index = torch.tensor(items, dtype=torch.long)
        prompt_index = index // self.seeds
        return {
            "prompts": [self.prompts.prompts[i] for i in prompt_index.tolist()],
            "metadata": [self.prompts.metadata[i] for i in prompt_index.tolist()],
            "prompt_index": prompt_index,
            "seeds": index % self.seeds,
            "index": index,
            "real": torch.arange(len(items)) < num_real,
        }


# ---------------------------------------------------------------------------- DataModule
class PromptDataModule(LightningDataModule):
    """Prompt files -> training batches of prompt groups and evaluation batches with fixed seeds."""

    def __init__(
        self,
        train_prompts: str | None = None,
        val_prompts: str | None = None,
        test_prompts: str | None = None,
        predict_prompts: str | None = None,
        prompts_per_step: int = 8,
        group_size: int = 8,
        eval_seeds: int = 1,
        eval_batch_size: int = 16,
        seed: int = 0,
        prompt_column: str = DEFAULT_PROMPT_COLUMN,
    ):
        """
        Args:
            train_prompts: prompt file for `fit` (.txt: one prompt per line; .jsonl: records
                with a "prompt" key, the record is passed to the rewards as metadata; .csv or
                .parquet: a table whose column `prompt_column` holds the prompts).
            val_prompts: prompt file for validation during `fit` and for `validate` (optional in `fit`).
            test_prompts: prompt file for `test`.
            predict_prompts: prompt file for `predict`.
            prompts_per_step: distinct prompts per training batch on each rank.
            group_size: images per prompt (the group whose rewards are compared).
            eval_seeds: images per evaluation prompt, with the fixed seeds 0 .. eval_seeds - 1.
            eval_batch_size: images per evaluation batch.
            seed: seed of the per-epoch shuffle of the training prompts.
            prompt_column: the column of the prompts in .csv and .parquet files ("caption" in Pick-a-Pic).
        """
        super().__init__()
        for name, value, minimum in (
            ("prompts_per_step", prompts_per_step, 1),
            ("group_size", group_size, 2),  # a group of one image has no relative advantage
            ("eval_seeds", eval_seeds, 1),
            ("eval_batch_size", eval_batch_size, 1),
        ):
            if value < minimum:
                raise UserInputError(f"data.{name} must be >= {minimum}, got {value}")
        self.save_hyperparameters()
        self.prompt_sets: dict[str, PromptSet] = {}

    @property
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        """Read the prompt files ``stage`` needs (fit: train and, if given, val)."""
        for part in ["fit", "validate"] if stage == "fit" else [stage]:
            path = self.hparams[STAGE_FILES[part]]
            if path is not None:
                self.prompt_sets[part] = read_prompts(path, self.hparams.prompt_column)
            elif part == stage:
                raise UserInputError(f"{stage} needs a prompt file: set data.{STAGE_FILES[part]}")
        if stage == "fit":
            self._check_train_size()

    def _check_train_size(self) -> None:
        _, world = self._rank_and_world
        needed = self.hparams.prompts_per_step * world
        have = len(self.prompt_sets["fit"])
        if have < needed:
            raise UserInputError(
                f"{self.hparams.train_prompts}: {have} prompts, but one training step needs data.prompts_per_step × "
                f"ranks = {self.hparams.prompts_per_step} × {world} = {needed}; lower data.prompts_per_step "
                f"or add prompts"
            )

    def _batches_done(self) -> int:
        """Batches of the current epoch Lightning already trained (non-zero only when resuming mid-epoch)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world
        h = self.hparams
        prompts = self.prompt_sets["fit"]
        sampler = GroupSampler(
            len(prompts), h.prompts_per_step, rank=rank, world_size=world, seed=h.seed, batches_done=self._batches_done
        )
        return self._loader(GroupBatches(prompts, h.group_size), sampler)

    def _eval_dataloader(self, part: str) -> DataLoader | list:
        prompts = self.prompt_sets.get(part)
        if prompts is None:
            return []
        rank, world = self._rank_and_world
        dataset = EvalBatches(prompts, self.hparams.eval_seeds)
        if len(dataset) < world:
            raise UserInputError(f"{prompts.path}: {len(dataset)} evaluation images cannot be split over {world} ranks")
        sampler = EvalSampler(len(dataset), self.hparams.eval_batch_size, rank=rank, world_size=world)
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("validate")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("predict")

    @staticmethod
    def _loader(dataset: Dataset, sampler: DistributedSampler) -> DataLoader:
        """Each sampler item is one whole batch (``batch_size=None``: no collation).

        No worker processes: building a batch of strings takes microseconds, and the samplers
        must run in the main process to read the epoch and resume position lazily.
        """
        return DataLoader(dataset, batch_size=None, sampler=sampler)
