"""What an installed copy needs: configs and model inside the package, the console command, the
Lightning pin, config paths found outside the repository, rewards that import only when asked for,
and the shipped model loading the plain diffusers way."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tpgrpo
from tpgrpo.cli import CONFIG_DIR, PACKAGE_DIR, REPO_DIR, TORCHVISION_FILTER, resolve_config_args, resolve_path
from tpgrpo.rewards import REWARD_MODULES, REWARDS, RewardConfigError, build_reward, validate_reward_weights

pytestmark = pytest.mark.e2e  # end-to-end runs: `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def setup_cfg() -> dict:
    from setuptools.config.setupcfg import read_configuration

    return read_configuration(str(ROOT / "setup.cfg"))


# ---------------------------------------------------------------------------------- the package
def test_configs_live_inside_the_package():
    assert CONFIG_DIR == Path(tpgrpo.__file__).resolve().parent / "configs"
    for name in ("base.yaml", "tiny.yaml", "sd3.yaml", "flux.yaml"):
        assert (CONFIG_DIR / name).is_file(), name
    assert (ROOT / "configs").resolve() == CONFIG_DIR  # the repository's configs/ is a link into the package


def test_setup_cfg_declares_the_console_command_package_data_and_lightning_pin():
    options = setup_cfg()["options"]
    assert "tpgrpo = tpgrpo.cli:main" in options["entry_points"]["console_scripts"]
    data = options["package_data"]["tpgrpo"]
    assert "configs/*.yaml" in data and "tiny/model/*" in data
    assert "lightning>=2.6,<2.7" in options["install_requires"]


def test_the_installed_lightning_fits_the_pin_and_has_the_private_members_relied_upon():
    """The members the setup.cfg comment names: a Lightning release that drops one fails here."""
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.callbacks.progress import rich_progress
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loops import _TrainingEpochLoop
    from packaging.requirements import Requirement

    pin = next(Requirement(r) for r in setup_cfg()["options"]["install_requires"] if r.startswith("lightning"))
    assert pin.specifier.contains(lightning.__version__)
    checkpoint = ModelCheckpoint(every_n_train_steps=3)
    for name in (
        "_save_checkpoint", "_find_last_checkpoints", "_fs", "_every_n_train_steps", "_train_time_interval",
        "_last_time_checked", "_last_global_step_saved", "_last_checkpoint_saved", "_should_skip_saving_checkpoint",
        "_should_save_on_train_epoch_end", "_monitor_candidates", "_save_topk_checkpoint", "_save_last_checkpoint",
    ):
        assert hasattr(checkpoint, name), name
    assert hasattr(_TrainingEpochLoop, "_should_check_val_fx")
    assert hasattr(RichProgressBar, "_get_train_description") and hasattr(rich_progress, "_RICH_AVAILABLE")
    assert hasattr(LightningCLI, "_parse_ckpt_path") and hasattr(LightningCLI, "_instantiate_trainer")
    source = Path(sys.modules[ModelCheckpoint.__module__].__file__).read_text()
    assert "_defer_save_until_validation" in source


def test_config_paths_are_found_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("tpgrpo/tiny/model") == str(REPO_DIR / "tpgrpo" / "tiny" / "model")
    assert resolve_config_args(["fit", "--config", "configs/tiny.yaml", "--config=configs/tasks/ocr.yaml"]) == [
        "fit", "--config", str(REPO_DIR / "configs" / "tiny.yaml"), f"--config={REPO_DIR / 'configs' / 'tasks' / 'ocr.yaml'}",
    ]
    # the package itself is the second place: where configs/ is in an installed copy
    elsewhere = tmp_path / "site"
    (elsewhere / "tpgrpo" / "configs").mkdir(parents=True)
    (elsewhere / "tpgrpo" / "configs" / "x.yaml").write_text("{}\n")
    assert resolve_path("configs/x.yaml", roots=(elsewhere, elsewhere / "tpgrpo")) == str(elsewhere / "tpgrpo/configs/x.yaml")
    # what exists from the working directory, absolute paths, hub ids and URLs stay as they are
    (tmp_path / "tpgrpo" / "tiny").mkdir(parents=True)
    (tmp_path / "tpgrpo" / "tiny" / "model").mkdir()
    assert resolve_path("tpgrpo/tiny/model") == "tpgrpo/tiny/model"
    for value in ("stabilityai/stable-diffusion-3.5-medium", "/abs/missing", "http://host/model", ""):
        assert resolve_path(value) == value
    assert PACKAGE_DIR == REPO_DIR / "tpgrpo"


def test_the_cli_resolves_the_shipped_config_and_its_paths_from_another_directory(tmp_path, monkeypatch):
    from tpgrpo.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", "configs/tiny.yaml", "--trainer.logger=false", "--trainer.enable_checkpointing=false"], run=False)
    assert cli.model.hparams.pretrained_path == str(REPO_DIR / "tpgrpo" / "tiny" / "model")
    assert cli.datamodule.hparams.train_prompts == str(REPO_DIR / "data" / "shapes" / "train.jsonl")
    assert cli.trainer.max_steps == 100  # tiny.yaml was read


def test_an_installed_copy_runs_from_any_directory(tmp_path):
    """``pip install --target`` of the sources, then the ``tpgrpo`` command from an empty folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "tpgrpo", source / "tpgrpo", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "installed"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert "Warning" not in installed.stdout + installed.stderr  # e.g. setuptools' "absent from packages"
    assert (target / "tpgrpo" / "configs" / "tiny.yaml").is_file()
    assert (target / "tpgrpo" / "tiny" / "model" / "transformer" / "config.json").is_file()
    # every file a shipped config names
    for config in (target / "tpgrpo" / "configs").rglob("*.yaml"):
        for name in re.findall(r"(data/[\w/]+\.(?:jsonl|txt))", config.read_text()):
            shipped = target / "tpgrpo" / "prompt_sets" / name.removeprefix("data/")
            assert shipped.is_file() or name.startswith("data/pickscore/"), f"{config.name}: {name}"
    command = target / "bin" / "tpgrpo"
    assert command.is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_command = (  # the console script as installed, after saying which tpgrpo it imports
        "import runpy, sys, tpgrpo; print('package:', tpgrpo.__file__, file=sys.stderr); "
        f"sys.argv = [{str(command)!r}, 'fit', '--config', 'configs/tiny.yaml', '--print_config']; "
        f"runpy.run_path({str(command)!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", run_command], cwd=work, env={**ENV, "PYTHONPATH": str(target)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"package: {target / 'tpgrpo' / '__init__.py'}" in result.stderr
    assert "pretrained_path: tpgrpo/tiny/model" in result.stdout and "every_n_train_steps: 40" in result.stdout
    assert "requires torchvision" not in result.stderr  # transformers' fallback note is filtered
    # a real fit of the shipped config from there: its prompt set comes with the package
    short = ["--trainer.max_steps=1", "--model.update.optimizer_steps_per_batch=1", "--data.prompts_per_step=1",
             "--data.group_size=2", "--data.val_prompts=null", "--images.every_n_train_steps=0",
             "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={work}"]
    fit_command = run_command.replace("'--print_config'", ", ".join(repr(a) for a in short))
    result = subprocess.run(
        [sys.executable, "-c", fit_command], cwd=work, env={**ENV, "PYTHONPATH": str(target)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompt file not found" not in result.stderr and list(work.rglob("last.ckpt"))


def test_the_torchvision_note_is_dropped_and_other_records_pass():
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.utils.import_utils", logging.WARNING, __file__, 1, message, None, None)

    note = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
            "backward compatibility.")
    assert not TORCHVISION_FILTER.filter(record(note))
    assert TORCHVISION_FILTER.filter(record("`Foo` requires torchvision"))
    assert TORCHVISION_FILTER in logging.getLogger("transformers.utils.import_utils").filters


# ------------------------------------------------------------------------------------- rewards
def test_building_shapes_imports_no_other_reward():
    code = (
        "import sys; from tpgrpo.rewards import build_reward; build_reward({'shapes': 1.0}); "
        "print(sorted(m for m in sys.modules if m.startswith('tpgrpo.rewards')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = set(json.loads(result.stdout.strip().replace("'", '"')))
    assert imported & set(REWARD_MODULES.values()) == {"tpgrpo.rewards.shapes"}


def test_a_broken_reward_module_breaks_only_its_reward(monkeypatch, tmp_path):
    monkeypatch.delitem(REWARDS.classes, "pickscore", raising=False)
    monkeypatch.setitem(REWARD_MODULES, "pickscore", "tpgrpo.rewards.no_such_module")
    assert set(build_reward({"shapes": 1.0}).rewards) == {"shapes"}
    with pytest.raises(RewardConfigError) as info:
        build_reward({"shapes": 1.0, "pickscore": 0.5})
    assert str(info.value) == (
        "reward 'pickscore' is unavailable: importing tpgrpo.rewards.no_such_module failed (ModuleNotFoundError: "
        "No module named 'tpgrpo.rewards.no_such_module'); install what it needs or remove it from the rewards"
    )
    # a module that fails while importing, and one that registers another name
    (tmp_path / "needs_libfoo.py").write_text("raise ImportError('libfoo is not installed')\n")
    (tmp_path / "registers_nothing.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(REWARD_MODULES, "foo", "needs_libfoo")
    monkeypatch.setitem(REWARD_MODULES, "bar", "registers_nothing")
    with pytest.raises(RewardConfigError, match=r"reward 'foo' is unavailable: importing needs_libfoo failed "
                                                r"\(ImportError: libfoo is not installed\)"):
        build_reward({"foo": 1.0})
    with pytest.raises(RewardConfigError, match="reward 'bar' is unavailable: registers_nothing does not register it"):
        build_reward({"bar": 1.0})


def test_an_unknown_reward_lists_the_available_names():
    with pytest.raises(RewardConfigError) as info:
        build_reward({"shapez": 1.0})
    head, _, names = str(info.value).partition("; available: ")
    names, _, own = names.partition("; ")
    listed = names.split(", ")
    assert own == "or a class of your own as package.module:Class"
    assert head == "unknown reward 'shapez'" and set(REWARD_MODULES) <= set(listed) and listed == sorted(listed)
    assert "shapez" not in REWARDS and "shapes" in REWARDS


def test_every_listed_module_registers_its_reward():
    from tpgrpo.rewards.builtin import import_all

    import_all()
    for name, module in REWARD_MODULES.items():
        cls = REWARDS[name]
        assert cls.name == name and cls.__module__ == module, (name, cls)


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"shapes": math.nan}, "rewards.shapes: the weight must be a finite number, got nan"),
        ({"shapes": 1.0, "jpeg_compressibility": math.inf}, "rewards.jpeg_compressibility: the weight must be a finite number, got inf"),
        ({"shapes": -math.inf}, "got -inf"),
        ({"shapes": "1.0"}, "got '1.0'"),
        ({"shapes": True}, "got True"),
        ({"shapes": None}, "got None"),
        ({"shapes": 0.0, "jpeg_compressibility": 0}, "rewards: all weights are zero; give at least one reward a non-zero weight"),
        ({}, "rewards: name at least one reward"),
    ],
)
def test_bad_reward_weights_are_rejected_in_one_line(weights, message):
    with pytest.raises(RewardConfigError) as info:
        validate_reward_weights(weights)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RewardConfigError):
        build_reward(weights)  # checked before any reward is built


def test_good_reward_weights_become_floats():
    checked = validate_reward_weights({"shapes": 2, "jpeg_compressibility": 0.0, "ocr": -0.5})
    assert checked == {"shapes": 2.0, "jpeg_compressibility": 0.0, "ocr": -0.5}
    assert all(type(w) is float for w in checked.values())


# ------------------------------------------------------------------------------ the shipped model
def test_the_shipped_model_samples_when_loaded_the_plain_diffusers_way():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained("tpgrpo/tiny/model", text_encoder_3=None, tokenizer_3=None)
    dtypes = {next(getattr(pipe, name).parameters()).dtype for name in ("text_encoder", "text_encoder_2", "transformer", "vae")}
    assert dtypes == {torch.float32}
    images = pipe(
        ["a photo of a red circle", "a photo of two squares"], num_inference_steps=2, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_save_pipeline_writes_float32_text_encoders(tmp_path):
    from safetensors import safe_open

    from tpgrpo.tiny.components import build_pipeline, save_pipeline

    save_pipeline(build_pipeline(num_layers=1), tmp_path)
    dtypes = {}
    for name, file in [("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors"),
                       ("transformer", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")]:
        with safe_open(tmp_path / name / file, "pt") as handle:
            dtypes[name] = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"text_encoder": {"F32"}, "text_encoder_2": {"F32"}, "transformer": {"F16"}, "vae": {"F16"}}
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text())["dtype"] == "float32"


def test_a_reward_class_of_ones_own_is_named_by_its_import_path(tmp_path, monkeypatch):
    """``package.module:Class``: no edit of the package; unregistered classes take that name."""
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "from tpgrpo.rewards import Reward, register_reward\n"
        "class Brightness(Reward):\n"
        "    def score(self, images, prompts, metadata):\n"
        "        return {self.name: images.mean(dim=(1, 2, 3))}\n"
        "@register_reward('my_contrast')\n"
        "class Contrast(Reward):\n"
        "    def score(self, images, prompts, metadata):\n"
        "        return {self.name: images.std(dim=(1, 2, 3)), 'my_contrast/max': images.amax(dim=(1, 2, 3))}\n"
        "class NotAReward:\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = build_reward({"my_rewards:Brightness": 2.0, "my_rewards:Contrast": 1.0, "jpeg_compressibility": 0.0})
    out = reward(images, ["a"] * 3)
    brightness, contrast = images.mean(dim=(1, 2, 3)), images.std(dim=(1, 2, 3))
    torch.testing.assert_close(out["my_rewards:Brightness"], brightness)
    torch.testing.assert_close(out["my_contrast"], contrast)  # a class that registers itself keeps its name
    torch.testing.assert_close(out["reward"], 2 * brightness + contrast)
    with pytest.raises(RewardConfigError, match=r"reward 'my_rewards:NotAReward': my_rewards has no subclass of "
                                                r"tpgrpo.rewards.Reward named 'NotAReward'"):
        build_reward({"my_rewards:NotAReward": 1.0})
    with pytest.raises(RewardConfigError, match=r"reward 'no_such_module:X': importing no_such_module failed"):
        build_reward({"no_such_module:X": 1.0})
