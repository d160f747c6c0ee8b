"""Multi-process training on CPU (gloo) through the CLI: DDP and FSDP2 against one process, on the
shipped model and on a masked family (Z-Image's tiny stand-in).

Two ranks with 2 prompts each must compute what one process computes with the same 4 prompts:
the same rewards, advantages and step losses (`tests.helpers.record.RecordSteps` writes what
every rank's training step returned), and the same trained LoRA. Checkpoints cross over.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e  # end-to-end runs: `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parent.parent


def fit(tmp_path: Path, name: str, devices: int, strategy: str, *extra: str, config: str = "configs/tiny.yaml") -> Path:
    """Run ``train.py fit`` (2 optimizer steps, 4 prompts × 4 images in all; ``config`` the shipped
    model's unless ``extra`` names another); return its folder."""
    out = tmp_path / name
    args = [
        sys.executable, "train.py", "fit", "--config", config,
        "--model.sampling.num_steps=3", "--model.evaluation.num_steps=2", "--model.sampling.window_size=2", "--model.sampling.window_range=[0, 2]",
        "--model.lora.rank=4", "--model.lora.alpha=8", "--images.every_n_train_steps=0",
        "--model.credit.balance_scope=global",  # the spec balances per rank batch; global balancing is layout-free
        "--model.optimizer.eps=1e-4",  # near-zero gradients: Adam's default eps turns float noise into full-size steps
        "--data.val_prompts=null", "--data.group_size=4", f"--data.prompts_per_step={4 // devices}",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        # the base EMA (tiny.yaml turns it off), updated every step so that the exported LoRA is its blend
        "--ema={class_path: tpgrpo.training.ema.LoRAEMA, init_args: {decay: 0.5, every: 1}}",
        f"--trainer.devices={devices}", f"--trainer.strategy={strategy}",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        f"--trainer.callbacks+={{class_path: tests.helpers.record.RecordSteps, init_args: {{directory: {out / 'steps'}}}}}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def steps(run: Path, ranks: int) -> dict[str, torch.Tensor]:
    """The first batch's outputs of all ranks: rows concatenated in rank order, step losses summed."""
    parts = [load_file(run / "steps" / f"rank{rank}_batch0.safetensors") for rank in range(ranks)]
    joined = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "step_losses"}
    joined["step_losses"] = sum(p["step_losses"] for p in parts)
    return joined


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "logs" / "tpgrpo" / "version_0" / "lora" / "pytorch_lora_weights.safetensors")


def checkpoint_lora(run: Path) -> dict[str, torch.Tensor]:
    path = run / "logs" / "tpgrpo" / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def checkpoint_ema(run: Path) -> dict[str, torch.Tensor]:
    path = run / "logs" / "tpgrpo" / "version_0" / "checkpoints" / "last.ckpt"
    callbacks = torch.load(path, weights_only=True, map_location="cpu")["callbacks"]
    return next(state for name, state in callbacks.items() if name.startswith("LoRAEMA"))["shadow"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("one"), "one", 1, "auto")


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """Two fsdp2 ranks with 2 prompts each; read by the equivalence and the checkpoint tests."""
    return fit(tmp_path_factory.mktemp("fsdp2"), "fsdp2", 2, "fsdp2")


# the multi-process runs are the suite's longest: they run in three groups, which `make test` spreads over its workers
OTHER_WORKER = pytest.mark.xdist_group("test_distributed_2")


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("ddp", ()),
        ("fsdp2", ()),
        pytest.param("fsdp2", ("--model.update.gradient_checkpointing=true",), marks=OTHER_WORKER),
    ],
    ids=["ddp", "fsdp2", "fsdp2-activation-checkpointing"],
)
def test_two_ranks_compute_what_one_process_computes(tmp_path, request, one_process, strategy, options):
    if (strategy, options) == ("fsdp2", ()):
        run = request.getfixturevalue("fsdp2_run")
    else:
        run = fit(tmp_path, strategy, 2, strategy, *options)
    single, double = steps(one_process, 1), steps(run, 2)
    assert torch.equal(single["group_ids"], double["group_ids"])  # rank 0 holds groups 0-1, rank 1 groups 2-3
    assert len(set(double["group_ids"][:8].tolist()) & set(double["group_ids"][8:].tolist())) == 0
    torch.testing.assert_close(double["rewards"], single["rewards"], rtol=0, atol=1e-6)
    torch.testing.assert_close(double["advantages"], single["advantages"], rtol=0, atol=1e-5)
    assert single["advantages"].abs().sum() > 0, "no learning signal: the comparison would be empty"
    torch.testing.assert_close(double["step_losses"], single["step_losses"], rtol=1e-4, atol=1e-7)

    # the trained LoRA: equal up to float summation order, far below the size of the update
    # (lora_B starts at zero, so its size is what training moved)
    single_lora, double_lora = lora(one_process), lora(run)
    assert single_lora.keys() == double_lora.keys()
    moved = max(value.abs().max() for key, value in single_lora.items() if "lora_B" in key)
    differ = max((single_lora[k] - double_lora[k]).abs().max() for k in single_lora)
    assert moved > 1e-3
    assert differ < 1e-3 * moved, f"{strategy} LoRA differs from the one-process LoRA by {differ} (update {moved})"


def test_checkpoints_cross_between_one_and_two_processes(tmp_path, one_process, fsdp2_run):
    """A fsdp2 run resumes from the one-process checkpoint and the other way round, weights intact."""
    sharded = fsdp2_run
    # resuming at the checkpoint's own step trains nothing: the exported LoRA is the loaded one
    for source, devices, strategy in [(one_process, 2, "fsdp2"), (sharded, 1, "auto")]:
        ckpt = source / "logs" / "tpgrpo" / "version_0" / "checkpoints" / "last.ckpt"
        resumed = fit(tmp_path, f"from-{source.name}", devices, strategy, f"--ckpt_path={ckpt}")
        expected, got = lora(source), lora(resumed)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"{strategy} did not restore {ckpt}"
    # the fsdp2 checkpoint is one file with the LoRA only (no frozen base weights), and its EMA as
    # whole tensors: the same as the one-process run's
    state = checkpoint_lora(sharded)
    assert state and all("lora_" in key for key in state)
    ema = {name: checkpoint_ema(run) for name, run in (("one", one_process), ("fsdp2", sharded))}
    assert ema["one"].keys() == ema["fsdp2"].keys() and len(ema["one"]) == len(state)
    for key, value in ema["one"].items():
        assert type(ema["fsdp2"][key]) is torch.Tensor and ema["fsdp2"][key].shape == value.shape
        torch.testing.assert_close(ema["fsdp2"][key], value, rtol=0, atol=1e-5)


@OTHER_WORKER
def test_fsdp2_with_bf16_weights_and_mixed_precision_trains(tmp_path):
    """configs/sd3.yaml's combination: frozen parts in bfloat16, bf16-mixed compute, float32 LoRA."""
    run = fit(tmp_path, "bf16", 2, "fsdp2", "--trainer.precision=bf16-mixed", "--model.weights_dtype=bfloat16")
    outputs = steps(run, 2)
    assert torch.isfinite(outputs["step_losses"]).all()
    weights = lora(run)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(w.abs().max() for k, w in weights.items() if "lora_B" in k) > 0  # lora_B left zero


@pytest.mark.xdist_group("test_distributed_3")
def test_a_masked_family_on_two_fsdp2_ranks_computes_what_one_process_computes(tmp_path):
    """Z-Image (prompts of different lengths, masked; captions as a list; its own blocks sharded): the
    rank-sharded embedding cache and fsdp2 over two ranks give the one-process images, rewards, losses and LoRA."""
    from tests.helpers.tiny_models import SEQUENCE_LENGTHS, save_tiny_clip, tiny_zimage_pipeline

    folder = tmp_path / "zimage"
    tiny_zimage_pipeline().save_pretrained(folder)
    texts = ["a dog", "a red cat on a wooden bench", "two birds", "a small blue car next to a tall tree"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(text + "\n" for text in texts))
    # a smooth reward (a tiny CLIP's PickScore): JPEG sizes would turn float noise into whole bytes
    clip = save_tiny_clip(tmp_path / "clip", " ".join(texts).split())
    reward = f'{{pickscore: {{weight: 1.0, model: "{clip}", processor: "{clip}"}}}}'
    model = [f"--model.pretrained_path={folder}", f"--model.max_sequence_length={SEQUENCE_LENGTHS['zimage']}",
             f"--data.train_prompts={prompts}",
             "--data.test_prompts=null", f"--model.rewards={reward}", "--model.sampling.resolution=32",
             "--model.weights_dtype=float32", "--trainer.precision=32-true", "--model.update.train_micro_batch=4"]
    runs = {devices: fit(tmp_path, f"zimage{devices}", devices, "fsdp2", *model,
                         f"--model.prompt_cache.folder={tmp_path / f'cache{devices}'}", config="configs/zimage.yaml")
            for devices in (1, 2)}
    single, double = steps(runs[1], 1), steps(runs[2], 2)
    assert torch.equal(single["group_ids"], double["group_ids"])
    # the images agree to float noise (padding to each rank's longest prompt changes the sums' order);
    # the random CLIP and the group normalisation magnify it a little
    torch.testing.assert_close(double["images"], single["images"], rtol=0, atol=1e-5)
    torch.testing.assert_close(double["rewards"], single["rewards"], rtol=0, atol=5e-4)
    assert single["advantages"].abs().sum() > 0
    torch.testing.assert_close(double["advantages"], single["advantages"], rtol=0, atol=5e-3)
    torch.testing.assert_close(double["step_losses"], single["step_losses"], rtol=2e-3, atol=1e-6)
    single_lora, double_lora = lora(runs[1]), lora(runs[2])
    moved = max(value.abs().max() for key, value in single_lora.items() if "lora_B" in key)
    assert single_lora.keys() == double_lora.keys() and moved > 1e-4
    assert max((single_lora[k] - double_lora[k]).abs().max() for k in single_lora) < 1e-2 * moved


@pytest.mark.parametrize("scope", ["rank", "global"])
def test_balance_scope_balances_over_this_rank_or_all_ranks(tiny_model_dir, scope):
    """Rank 0 of 2: "rank" balances its own rows alone, "global" balances them together with rank 1's."""
    from tpgrpo.distributed import Collectives
    from tpgrpo.maths import credit
    from tpgrpo.training.module import TPGRPOModule

    model = TPGRPOModule(pretrained_path=str(tiny_model_dir), sampling={"num_steps": 3, "window_size": 2}, credit={"balance_scope": scope})
    # this rank: two rising rows with a turning point at step 0; the other rank: one falling such row,
    # so balancing over both ranks keeps one rising turning point (the row with the larger rise)
    own = torch.tensor([[0.1, 0.3, 0.5], [0.2, 0.3, 0.7], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]])
    other = torch.tensor([[0.9, 0.7, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    model.algorithm.collectives = Collectives(
        rank=0, world_size=2, gather_rows=lambda t: torch.cat([t, t if t.dtype == torch.long else other])
    )
    per_step, _, kept = model.algorithm.credit_and_advantages(own, torch.tensor([0, 0, 1, 1]))
    alone = credit.turning_point_rewards(own)
    together = credit.turning_point_rewards(torch.cat([own, other]))[:4]
    assert credit.turning_points(own).sum() == 2
    assert credit.turning_points(torch.cat([own, other]))[:4].nonzero().tolist() == [[1, 0]]
    torch.testing.assert_close(per_step, alone if scope == "rank" else together)
    # the turning points returned (and logged) are the ones that trained, also when balanced globally
    expected = credit.turning_points(own) if scope == "rank" else credit.turning_points(torch.cat([own, other]))[:4]
    assert torch.equal(kept, expected)


def test_minibatch_scope_balances_mini_batches_that_mix_prompts(tiny_model_dir):
    """The research code's scope: runs of 3 images taken one per prompt group in turn are balanced apart."""
    from tpgrpo.maths import credit
    from tpgrpo.training.module import TPGRPOModule

    model = TPGRPOModule(
        pretrained_path=str(tiny_model_dir), sampling={"num_steps": 3, "window_size": 2},
        credit={"balance_scope": "minibatch", "balance_minibatch": 3},
    )
    # every row flags step 0; group 0 rises (Δ = 2, 3, 4), group 1 falls (Δ = -2, -3, -4)
    own = torch.tensor([[0.0, 1, 2], [0, 1, 3], [0, 1, 4], [0, -1, -2], [0, -1, -3], [0, -1, -4]])
    assert credit.turning_points(own)[:, 0].all()  # over the whole rank: three of each sign, all kept
    per_step, _, kept = model.algorithm.credit_and_advantages(own, torch.tensor([0, 0, 0, 1, 1, 1]))
    # round robin: rows (0, 3, 1) then (4, 2, 5); each run keeps one rising and one falling turning point,
    # those with the largest |Δ|: rows 1 and 3, then rows 2 and 5
    assert kept[:, 0].tolist() == [False, True, True, True, False, True] and not kept[:, 1].any()
    # kept: η·(R_W - R_0) = Δ; dropped: the increment d_0 = ±1
    assert per_step[:, 0].tolist() == [1.0, 3.0, 4.0, -2.0, -1.0, -4.0]
