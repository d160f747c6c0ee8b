"""Prompt files, group batches across ranks, evaluation batches, and the DataModule under Lightning."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from tpgrpo.errors import UserInputError
from tpgrpo.training.data import (
    EvalBatches,
    EvalSampler,
    GroupBatches,
    GroupSampler,
    PromptDataModule,
    PromptFileError,
    PromptSet,
    read_prompts,
)


def write_txt(path, n):
    path.write_text("\n".join(f"prompt {i}" for i in range(n)) + "\n")
    return str(path)


@pytest.fixture
def txt(tmp_path):
    return write_txt(tmp_path / "p.txt", 12)


# ------------------------------------------------------------------------------- files
def test_txt_skips_blank_lines_and_strips(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  two squares  \n\n")
    prompts = read_prompts(path)
    assert prompts.prompts == ["a red circle", "two squares"] and prompts.metadata == [{}, {}]


def test_jsonl_keeps_the_whole_record_as_metadata(tmp_path):
    records = [{"prompt": "a red circle", "tag": "single", "include": [{"class": "circle"}]}, {"prompt": "x"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    prompts = read_prompts(path)
    assert prompts.prompts == ["a red circle", "x"] and prompts.metadata == records


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"empty\.txt: no prompts"),
        ("blank.jsonl", b"\n  \n", r"blank\.jsonl: no prompts"),
        ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": \n', r"bad\.jsonl, line 2: not valid JSON"),
        ("noprompt.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', r"noprompt\.jsonl, line 2: no \"prompt\" key"),
        ("list.jsonl", b'["a"]\n', r"list\.jsonl, line 1: expected a JSON object"),
        ("latin1.txt", b"ok\ncaf\xe9\n", r"latin1\.txt, line 2: not UTF-8"),
        ("prompts.tsv", b"a\n", r"prompts\.tsv: unsupported prompt file type '\.tsv'; use \.txt, \.jsonl, \.csv, \.parquet"),
    ],
)
def test_prompt_file_errors_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(tmp_path / name)


def test_csv_reads_the_prompt_column(tmp_path):
    path = tmp_path / "pickapic.csv"
    # a BOM, a quoted cell with a comma and a line break, an empty cell, a blank cell: skipped
    path.write_bytes(
        "\ufeffbest_image_uid,caption,ranking\n"
        'u1,"a cat, sleeping",0\n'
        "u2,,1\n"
        'u3,"two\nlines ",1\n'
        "u4,   ,0\n"
        "u5,  a red car  ,1\n".encode()
    )
    prompts = read_prompts(path)
    assert prompts.prompts == ["a cat, sleeping", "two\nlines", "a red car"] and prompts.metadata == [{}, {}, {}]
    assert read_prompts(path, prompt_column="best_image_uid").prompts == ["u1", "u2", "u3", "u4", "u5"]


@pytest.mark.parametrize(
    "content, column, message",
    [
        (b"uid,text\n1,a cat\n", "caption", r"t\.csv: no column 'caption' \(columns: 'uid', 'text'\); set data\.prompt_column"),
        (b"caption\n\n , \n", "caption", r"t\.csv: no prompts"),
        (b"", "caption", r"t\.csv: no prompts"),
        (b"caption\nok\ncaf\xe9\n", "caption", r"t\.csv, line 3: not UTF-8"),
        (b'caption\n"never closed\n', "caption", r"t\.csv, line \d+: not valid CSV"),
    ],
)
def test_csv_errors(tmp_path, content, column, message):
    (tmp_path / "t.csv").write_bytes(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(tmp_path / "t.csv", prompt_column=column)


def test_datamodule_passes_its_prompt_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,text\n" + "".join(f"{i},prompt {i}\n" for i in range(4)))
    dm = PromptDataModule(train_prompts=str(path), prompts_per_step=2, prompt_column="text")
    dm.setup("fit")
    assert dm.prompt_sets["fit"].prompts == [f"prompt {i}" for i in range(4)]
    with pytest.raises(PromptFileError, match="no column 'caption'"):
        PromptDataModule(train_prompts=str(path), prompts_per_step=2).setup("fit")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(PromptFileError, match=r"p\.parquet: reading \.parquet prompt files needs pyarrow; pip install pyarrow"):
        read_prompts(tmp_path / "p.parquet")


def test_parquet_reads_the_prompt_column(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    import pyarrow.parquet as pq

    table = pa.table({"caption": ["a cat", None, "  ", " a dog "], "uid": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet").prompts == ["a cat", "a dog"]
    with pytest.raises(PromptFileError, match=r"no column 'text' \(columns: 'caption', 'uid'\)"):
        read_prompts(tmp_path / "p.parquet", prompt_column="text")
    with pytest.raises(PromptFileError, match=r"row 0: column 'uid' holds int values"):
        read_prompts(tmp_path / "p.parquet", prompt_column="uid")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(PromptFileError, match=r"bad\.parquet: cannot read the Parquet file"):
        read_prompts(tmp_path / "bad.parquet")


def test_geneval_records_of_any_classes_pass_through(tmp_path):
    """The reader checks the format only: COCO records are metadata as they are (no shapes-world check)."""
    record = {"tag": "position", "include": [{"class": "cat", "count": 1},
              {"class": "dog", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a dog left of a cat"}
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert read_prompts(path).metadata == [record]


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match=r"nope\.txt: prompt file not found"):
        read_prompts(tmp_path / "nope.txt")
    assert issubclass(PromptFileError, UserInputError) and issubclass(PromptFileError, ValueError)


# ------------------------------------------------------------------------------- training batches
def epoch_batches(num_prompts, per_step, world, epoch=0, group_size=3, seed=0):
    """Per rank, the list of batches of one epoch."""
    prompts = read_prompts_stub(num_prompts)
    out = []
    for rank in range(world):
        sampler = GroupSampler(num_prompts, per_step, rank=rank, world_size=world, seed=seed)
        sampler.set_epoch(epoch)
        out.append([GroupBatches(prompts, group_size)[plan] for plan in sampler])
    return out


def read_prompts_stub(n):
    return PromptSet("stub", [f"p{i}" for i in range(n)], [{"i": i} for i in range(n)])


def test_groups_are_contiguous_and_complete():
    (batches,) = epoch_batches(10, per_step=3, world=1, group_size=4)
    assert len(batches) == 3  # 10 // 3, the remainder waits for another epoch
    for batch in batches:
        assert len(batch["prompts"]) == len(batch["metadata"]) == 12
        ids = batch["group_ids"].view(3, 4)
        assert (ids == ids[:, :1]).all() and ids[:, 0].unique().numel() == 3
        index = batch["prompt_index"].view(3, 4)
        assert (index == index[:, :1]).all()
        assert all(batch["prompts"][k] == f"p{int(batch['prompt_index'][k])}" for k in range(12))
        assert all(batch["metadata"][k]["i"] == int(batch["prompt_index"][k]) for k in range(12))
    seen = torch.cat([b["prompt_index"][::4] for b in batches])
    assert seen.unique().numel() == 9


def test_shuffle_is_reproducible_and_changes_per_epoch():
    a = epoch_batches(12, 4, 1, epoch=0)[0]
    b = epoch_batches(12, 4, 1, epoch=0)[0]
    c = epoch_batches(12, 4, 1, epoch=1)[0]
    other_seed = epoch_batches(12, 4, 1, epoch=0, seed=1)[0]
    order = lambda batches: torch.cat([x["prompt_index"] for x in batches]).tolist()
    assert order(a) == order(b)
    assert order(a) != order(c) and order(a) != order(other_seed)
    assert sorted(set(order(c))) == list(range(12))
    ids_a = torch.cat([x["group_ids"] for x in a])
    ids_c = torch.cat([x["group_ids"] for x in c])
    assert set(ids_a.tolist()).isdisjoint(ids_c.tolist())  # group ids never repeat across epochs


def test_two_ranks_get_disjoint_complete_groups_that_equal_one_big_rank():
    ranks = epoch_batches(13, per_step=3, world=2, group_size=2)
    single = epoch_batches(13, per_step=6, world=1, group_size=2)[0]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 2
    for step, whole in enumerate(single):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert set(r0["prompt_index"].tolist()).isdisjoint(r1["prompt_index"].tolist())
        assert set(r0["group_ids"].tolist()).isdisjoint(r1["group_ids"].tolist())
        for key in ("group_ids", "prompt_index"):
            assert torch.equal(torch.cat([r0[key], r1[key]]), whole[key])
        assert r0["prompts"] + r1["prompts"] == whole["prompts"]
    covered = torch.cat([b["prompt_index"] for rank in ranks for b in rank]).unique()
    assert covered.numel() == 12  # 2 steps × 2 ranks × 3 prompts, all distinct


def test_epoch_is_read_when_iteration_starts():
    sampler = GroupSampler(8, 2, seed=0)
    iterator = iter(sampler)  # Lightning creates the iterator before calling set_epoch
    sampler.set_epoch(5)
    reference = GroupSampler(8, 2, seed=0)
    reference.set_epoch(5)
    assert next(iterator) == next(iter(reference))


def test_batches_done_are_skipped():
    full = list(GroupSampler(12, 2, seed=3))
    resumed = list(GroupSampler(12, 2, seed=3, batches_done=lambda: 4))
    assert resumed == full[4:]


# ------------------------------------------------------------------------------- evaluation batches
def test_eval_batches_cover_every_prompt_and_seed_once_across_ranks():
    prompts = read_prompts_stub(5)
    dataset = EvalBatches(prompts, seeds=3)
    pairs, indices, shapes = [], [], []
    for rank in range(2):
        sampler = EvalSampler(len(dataset), batch_size=4, rank=rank, world_size=2)
        batches = [dataset[plan] for plan in sampler]
        assert len(batches) == len(sampler)
        shapes.append([len(batch["prompts"]) for batch in batches])
        for batch in batches:
            assert len(batch["prompts"]) <= 4
            assert all(p == f"p{i}" for p, i in zip(batch["prompts"], batch["prompt_index"].tolist()))
            real = batch["real"]
            pairs += list(zip(batch["prompt_index"][real].tolist(), batch["seeds"][real].tolist()))
            indices += batch["index"][real].tolist()
    assert pairs == [(p, s) for p in range(5) for s in range(3)]  # file order, seeds 0..2, no duplicates
    assert indices == list(range(15))
    # 15 items over 2 ranks: 7 + 8, the first rank padded to 8 so both run batches of 4 + 4
    assert shapes == [[4, 4], [4, 4]]


# ------------------------------------------------------------------------------- DataModule
def test_datamodule_simulated_ranks(txt):
    batches = []
    for rank in range(2):
        dm = PromptDataModule(train_prompts=txt, prompts_per_step=3, group_size=2, seed=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.batches_done = None  # no Lightning loop behind the fake trainer
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 2
    for a, b in zip(*batches):
        assert set(a["prompt_index"].tolist()).isdisjoint(b["prompt_index"].tolist())
        assert a["group_ids"].shape == (6,) and isinstance(a["prompts"][0], str)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"group_size": 1}, r"data\.group_size must be >= 2, got 1"),
        ({"prompts_per_step": 0}, r"data\.prompts_per_step must be >= 1"),
        ({"eval_seeds": 0}, r"data\.eval_seeds must be >= 1"),
        ({"eval_batch_size": -1}, r"data\.eval_batch_size must be >= 1"),
    ],
)
def test_datamodule_argument_errors(txt, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        PromptDataModule(train_prompts=txt, **kwargs)


def test_datamodule_stage_errors(txt, tmp_path):
    with pytest.raises(UserInputError, match=r"fit needs a prompt file: set data\.train_prompts"):
        PromptDataModule().setup("fit")
    with pytest.raises(UserInputError, match=r"test needs a prompt file: set data\.test_prompts"):
        PromptDataModule(train_prompts=txt).setup("test")
    with pytest.raises(UserInputError, match=r"p\.txt: 12 prompts, but one training step needs .* = 16"):
        PromptDataModule(train_prompts=txt, prompts_per_step=16).setup("fit")
    with pytest.raises(PromptFileError, match="missing.txt"):
        PromptDataModule(train_prompts=str(tmp_path / "missing.txt")).setup("fit")
    dm = PromptDataModule(train_prompts=txt, prompts_per_step=2)
    dm.setup("fit")
    assert dm.val_dataloader() == []  # no validation prompts: Lightning skips validation


class Recorder(LightningModule):
    """Records the prompt indices of every batch it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["prompt_index"].unique_consecutive().tolist())
        return self.weight.sum() * 0

    def predict_step(self, batch, batch_idx):
        return batch["index"].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(tmp_path, devices=1, **kwargs):
    return Trainer(
        accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kwargs,
    )


def test_lightning_epochs_and_mid_epoch_resume_see_the_same_batches(txt, tmp_path):
    """4 steps per epoch; a run stopped after step 6 and resumed trains the batches a full run does."""
    dm_args = dict(train_prompts=txt, prompts_per_step=3, group_size=2, seed=0)
    full = Recorder()
    make_trainer(tmp_path / "full", max_epochs=3, enable_checkpointing=False).fit(full, PromptDataModule(**dm_args))
    assert len(full.seen) == 12
    assert full.seen[:4] != full.seen[4:8]  # reshuffled per epoch
    assert sorted(sum(full.seen[4:8], [])) == list(range(12))

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    first = Recorder()
    make_trainer(tmp_path / "a", max_steps=6, callbacks=[checkpoint]).fit(first, PromptDataModule(**dm_args))
    second = Recorder()
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    make_trainer(tmp_path / "b", max_epochs=3, enable_checkpointing=False).fit(
        second, PromptDataModule(**dm_args), ckpt_path=path
    )
    assert first.seen + second.seen == full.seen


def test_lightning_predict_returns_every_image_once(txt, tmp_path):
    dm = PromptDataModule(predict_prompts=txt, eval_seeds=2, eval_batch_size=5)
    out = make_trainer(tmp_path).predict(Recorder(), datamodule=dm)
    assert sum(out, []) == list(range(24))


class RankRecorder(Recorder):
    """Writes the batches each rank saw to ``out/rank{r}.json`` (spawned processes return nothing)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def on_train_end(self):
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.mark.slow
def test_ddp_two_processes_keep_our_sampler_and_split_groups(txt, tmp_path):
    """Under real DDP (use_distributed_sampler left on) the ranks see disjoint complete groups."""
    dm = PromptDataModule(train_prompts=txt, prompts_per_step=3, group_size=2, seed=0)
    trainer = make_trainer(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=1, enable_checkpointing=False)
    trainer.fit(RankRecorder(tmp_path), dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 2
    single = epoch_batches(12, per_step=6, world=1, group_size=2)[0]
    for step, whole in enumerate(single):
        assert seen[0][step] + seen[1][step] == whole["prompt_index"].tolist()
