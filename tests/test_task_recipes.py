"""Each task file on each real-model config trains: a 2-step ``fit`` through the CLI on tiny random
stand-ins of the same architecture (SD3 and FLUX pipelines: every task; Qwen-Image, FLUX.2 [klein]
and [dev], Z-Image: PickScore) with the task's real reward code (a tiny random Mask2Former and CLIP for
GenEval, a tiny CLIP for PickScore, RapidOCR's own shipped models for OCR)."""
import json

import pytest

from tests.helpers.tiny_models import (
    SEQUENCE_LENGTHS,
    save_tiny_detector,
    save_tiny_geneval_clip,
    tiny_flux2_dev_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux_pipeline,
    tiny_qwenimage_pipeline,
    tiny_zimage_pipeline,
)
from tpgrpo.cli import build_cli

pytestmark = pytest.mark.e2e  # end-to-end runs: `make test-fast` leaves them out

GENEVAL_RECORDS = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
]
# the shortest run of each recipe: 1 prompt × 2 images per batch, 3 steps with a 2-step window, no evaluation
SHORT = ["--model.sampling.num_steps=3", "--model.sampling.window_size=2", "--model.sampling.window_range=[0, 2]",
         "--data.prompts_per_step=1", "--data.group_size=2", "--data.val_prompts=null", "--trainer.max_steps=2",
         "--trainer.enable_progress_bar=false", "--images.every_n_train_steps=0"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("recipes")
    flux = root / "flux"
    tiny_flux_pipeline().save_pretrained(flux)
    newer = {"qwenimage": tiny_qwenimage_pipeline, "flux2_klein": tiny_flux2_klein_pipeline,
             "flux2_dev": tiny_flux2_dev_pipeline, "zimage": tiny_zimage_pipeline}
    families = {"qwenimage": "qwenimage", "flux2_klein": "flux2", "flux2_dev": "flux2-dev", "zimage": "zimage"}
    for name, build in newer.items():
        build().save_pretrained(root / name)
    (root / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_RECORDS))
    (root / "prompts.txt").write_text("a photo of a dog\na red cat on a bench\n")
    (root / "ocr.txt").write_text('A sign that says "OPEN"\nA mug printed with "TEA"\n')
    return {
        "sd3": (str(tiny_model_dir), ["--model.sampling.resolution=32"]),
        "flux": (str(flux), ["--model.sampling.resolution=16", "--model.max_sequence_length=6"]),
        **{name: (str(root / name), ["--model.sampling.resolution=32",
                                     f"--model.max_sequence_length={SEQUENCE_LENGTHS[families[name]]}",
                                     "--trainer.strategy=auto"]) for name in newer},
        "detector": save_tiny_detector(root / "mask2former"),
        "clip": save_tiny_geneval_clip(root / "clip"),
        "root": root,
    }


def task_overrides(task, stand_ins):
    root = stand_ins["root"]
    if task == "geneval":
        reward = f'{{geneval: {{weight: 1.0, detector: "{stand_ins["detector"]}", clip: "{stand_ins["clip"]}"}}}}'
        return [f"--model.rewards={reward}", f"--data.train_prompts={root / 'geneval.jsonl'}"]
    if task == "ocr":  # the task file's reward as it is: RapidOCR's real models ship in its wheel
        return [f"--data.train_prompts={root / 'ocr.txt'}"]
    clip = stand_ins["clip"]
    reward = f'{{pickscore: {{weight: 1.0, model: "{clip}", processor: "{clip}"}}}}'
    return [f"--model.rewards={reward}", f"--data.train_prompts={root / 'prompts.txt'}"]


@pytest.mark.parametrize("task", ["geneval", "pickscore", "ocr"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_task_recipe_fits_two_steps(tmp_path, stand_ins, family, task):
    path, model_overrides = stand_ins[family]
    args = ["fit", "--config", f"configs/{family}.yaml", "--config", f"configs/tasks/{task}.yaml",
            f"--model.pretrained_path={path}", *model_overrides, *task_overrides(task, stand_ins), *SHORT,
            f"--model.prompt_cache.folder={tmp_path / 'embeddings'}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    cli = build_cli(args)
    assert cli.trainer.global_step == 2
    assert cli.trainer.precision == "bf16-mixed"  # the recipe's precision, as on a GPU
    assert list(cli.model.reward.rewards) == [task]
    logged = cli.trainer.callback_metrics
    assert f"train/{task}" in logged and logged["train/reward_mean"].isfinite()


def test_test_on_geneval_metadata_logs_genevals_overall_number_and_the_evaluation_rewards(tmp_path, stand_ins):
    path, model_overrides = stand_ins["sd3"]
    records = stand_ins["root"] / "geneval.jsonl"
    clip = stand_ins["clip"]
    # the task file's evaluation rewards (PickScore, CLIP score) with the tiny CLIP in place of the hub models
    watched = f'{{pickscore: {{model: "{clip}", processor: "{clip}"}}, clipscore: {{model: "{clip}"}}}}'
    args = ["test", "--config", "configs/sd3.yaml", "--config", "configs/tasks/geneval.yaml",
            f"--model.pretrained_path={path}", *model_overrides, *task_overrides("geneval", stand_ins),
            f"--model.eval_rewards={watched}",
            f"--data.test_prompts={records}", "--data.eval_seeds=2", "--model.evaluation.num_steps=2",
            f"--model.prompt_cache.folder={tmp_path / 'embeddings'}",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    cli = build_cli(args)
    logged = cli.trainer.callback_metrics
    # the two records' tags, single_object and colors: the overall number is the mean of their correct rates
    expected = (float(logged["test/geneval/single_object"]) + float(logged["test/geneval/colors"])) / 2
    assert float(logged["test/geneval/overall"]) == pytest.approx(expected)
    assert list(cli.model.reward.rewards) == ["geneval"]  # the evaluation rewards do not train
    for name in ("pickscore", "clipscore"):
        assert logged[f"test/{name}"].isfinite() and float(logged[f"test/{name}_stderr"]) > 0


@pytest.mark.parametrize("config", ["qwenimage", "flux2_klein", "flux2_dev", "zimage"])
def test_the_newer_families_fit_pickscore_with_the_real_reward_code(tmp_path, stand_ins, config):
    path, model_overrides = stand_ins[config]
    args = ["fit", "--config", f"configs/{config}.yaml", "--config", "configs/tasks/pickscore.yaml",
            f"--model.pretrained_path={path}", *model_overrides, *task_overrides("pickscore", stand_ins), *SHORT,
            f"--model.prompt_cache.folder={tmp_path / 'embeddings'}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    cli = build_cli(args)
    assert cli.trainer.global_step == 2 and cli.trainer.precision == "bf16-mixed"
    assert list(cli.model.reward.rewards) == ["pickscore"]
    logged = cli.trainer.callback_metrics
    assert "train/pickscore" in logged and logged["train/reward_mean"].isfinite()
