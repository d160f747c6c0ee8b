"""The settings groups: range checks on construction, rewards parsing, and every shipped config."""
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from tpgrpo.cli import main
from tpgrpo.errors import UserInputError
from tpgrpo.maths.sde import step_kind
from tpgrpo.settings import (
    GROUPS,
    CreditConfig,
    OptimizerConfig,
    SamplingConfig,
    UpdateConfig,
    as_group,
    check_model_settings,
    parse_rewards,
)

ROOT = Path(__file__).resolve().parent.parent
# every real-model config shipped (all but the base and the tiny demo's)
MODEL_CONFIGS = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml") if p.name not in ("base.yaml", "tiny.yaml")
)
TASKS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "tasks").glob("*.yaml"))


def test_defaults_are_the_spec_recipe():
    sampling, credit, update, optimizer = SamplingConfig(), CreditConfig(), UpdateConfig(), OptimizerConfig()
    assert (sampling.num_steps, sampling.window_size, sampling.noise_level, sampling.guidance_scale) == (10, 9, 0.7, 4.5)
    assert (credit.method, credit.eta, credit.balance, credit.advantage_clip) == (None, 1.0, True, 5.0)
    assert (update.clip_range, update.kl_beta, update.max_grad_norm) == (1e-5, 1e-4, 1.0)
    assert (optimizer.learning_rate, optimizer.betas, optimizer.weight_decay, optimizer.eps) == (3e-4, (0.9, 0.999), 1e-4, 1e-8)


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (SamplingConfig, {"noise_level": 0.0}, "sampling.noise_level must be > 0"),
        (SamplingConfig, {"noise_level": 1.2}, "sampling.noise_level of a 'cps' step must be in [0, 1], got 1.2"),
        (SamplingConfig, {"noise_level": math.nan}, "sampling.noise_level"),
        (SamplingConfig, {"num_steps": 4, "window_size": 5}, "sampling.window_size (5) must be between 1 and 3, the steps with noise of 4 'cps' steps"),
        (SamplingConfig, {"num_steps": 6, "window_size": 2, "window_range": (2, 3)}, "sampling.window_range (2, 3)"),
        (SamplingConfig, {"step_kind": "ode"}, "sampling.step_kind must be one of"),
        (CreditConfig, {"method": "bogus"}, "credit.method must be one of ['outcome', 'tp']"),
        (CreditConfig, {"balance_scope": "world"}, "credit.balance_scope"),
        (CreditConfig, {"balance_scope": "minibatch"}, "credit.balance_minibatch (images per balanced mini-batch) goes with"),
        (CreditConfig, {"balance_minibatch": 9}, "got balance_scope 'rank' and balance_minibatch 9"),
        (CreditConfig, {"balance_scope": "minibatch", "balance_minibatch": 0}, "credit.balance_minibatch must be >= 1"),
        (CreditConfig, {"advantage_eps": 0}, "credit.advantage_eps must be > 0"),
        (UpdateConfig, {"clip_range": 1.0}, "update.clip_range (PPO ε) must be in (0, 1)"),
        (UpdateConfig, {"kl_beta": math.inf}, "update.kl_beta must be >= 0 and finite"),
        (UpdateConfig, {"train_micro_batch": 0}, "update.train_micro_batch must be >= 1 or null"),
        (OptimizerConfig, {"learning_rate": math.inf}, "optimizer.learning_rate must be > 0 and finite"),
        (OptimizerConfig, {"betas": (0.9, 1.0)}, "optimizer.betas must be two numbers in [0, 1)"),
    ],
)
def test_groups_reject_bad_values_in_one_line(cls, values, message):
    with pytest.raises(UserInputError) as error:
        cls(**values)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "values, allowed",
    [
        ({"num_steps": 6, "window_size": 5, "window_range": (0, 6)}, "[0, 5]"),  # FLUX.1's old window could start at 1
        ({"num_steps": 3, "window_size": 1, "window_range": (2, 3)}, "[1, 2]"),  # only the last step: nothing to train
    ],
)
def test_a_cps_window_may_not_reach_the_noiseless_last_step(values, allowed):
    with pytest.raises(UserInputError) as error:
        SamplingConfig(**values)
    message = str(error.value)
    assert f"lets the window reach step {values['num_steps'] - 1}" in message and allowed in message and "\n" not in message


def test_window_range_defaults_to_the_steps_with_noise():
    # cps: the step into sigma 0 has std = sigma_next·sin(a·π/2) = 0; sde: std·sqrt(-dt) > 0 at every step
    assert SamplingConfig(num_steps=10, window_size=9).window_range == (0, 9)
    assert SamplingConfig(num_steps=10, window_size=9, step_kind="sde").window_range == (0, 10)
    # the step kind and its level are one value; an "sde" level above 1 is a valid, larger noise
    assert SamplingConfig(step_kind="sde", noise_level=1.5).step == step_kind("sde", 1.5)
    assert SamplingConfig(num_steps=6, window_size=6, step_kind="sde", window_range=(0, 6)).window_range == (0, 6)


def _noise_of_each_step(config_path):
    """The transition std of every step the config's window can cover, on a real flow-match schedule."""
    import torch
    import yaml

    sampling = SamplingConfig(**yaml.safe_load((ROOT / config_path).read_text())["model"]["sampling"])
    sigmas = torch.linspace(1.0, 0.0, sampling.num_steps + 1)
    lo, hi = sampling.window_range
    stds = sampling.step.std(sigmas[lo:hi], sigmas[lo + 1 : hi + 1])
    return stds if sampling.step_kind == "cps" else stds * (sigmas[lo:hi] - sigmas[lo + 1 : hi + 1]).sqrt()


@pytest.mark.parametrize("config", MODEL_CONFIGS + ["configs/tiny.yaml"])
def test_every_shipped_window_has_noise_at_every_step(config):
    assert bool((_noise_of_each_step(config) > 0).all())


def test_as_group_accepts_mappings_and_names_unknown_keys():
    assert as_group(SamplingConfig, {"num_steps": 3, "window_size": 2}) == SamplingConfig(num_steps=3, window_size=2)
    assert as_group(SamplingConfig, None) == SamplingConfig()
    for name, cls in GROUPS.items():  # what a checkpoint stores comes back as the same group
        assert as_group(cls, asdict(cls())) == cls()
    with pytest.raises(UserInputError, match=r"sampling\.noise_levle is not a setting"):
        as_group(SamplingConfig, {"noise_levle": 0.5})


@pytest.mark.parametrize(
    "rewards, message",
    [
        ({"shapes": math.nan}, "rewards.shapes: the weight must be a finite number, got nan"),
        ({"shapes": math.inf}, "rewards.shapes: the weight must be a finite number, got inf"),
        ({"shapes": 0.0, "jpeg": 0}, "all weights are zero"),
        ({"shapes": {"extra_as_factor": True}}, "rewards.shapes needs a weight"),
        ({"shapes": "high"}, "the weight must be a finite number, got 'high'"),
        ({}, "rewards must name at least one reward"),
    ],
)
def test_bad_reward_weights_are_rejected(rewards, message):
    with pytest.raises(UserInputError) as error:
        parse_rewards(rewards)
    assert message in str(error.value)


def test_rewards_mapping_holds_weights_and_options():
    specs = parse_rewards({"shapes": {"weight": 2, "extra_as_factor": True}, "jpeg": -0.5})
    assert [(s.name, s.weight, s.options) for s in specs] == [("shapes", 2.0, {"extra_as_factor": True}), ("jpeg", -0.5, {})]
    assert [(s.name, s.weight) for s in parse_rewards(None)] == [("shapes", 1.0)]


def test_check_model_settings_checks_every_group():
    check_model_settings({"sampling": {"num_steps": 3, "window_size": 2}, "rewards": {"shapes": 1.0}})
    with pytest.raises(UserInputError, match="lora.rank must be >= 1"):
        check_model_settings({"lora": {"rank": 0}})
    with pytest.raises(UserInputError, match="family must be auto or one of"):
        check_model_settings({"family": "sdxl"})


def _printed_config(capsys, configs):
    args = ["fit"] + [item for config in configs for item in ("--config", config)] + ["--print_config"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    out = capsys.readouterr()
    assert stop.value.code == 0, out.err
    return out.out


@pytest.mark.parametrize("model_config", MODEL_CONFIGS)
@pytest.mark.parametrize("task", TASKS)
def test_every_model_and_task_combination_validates(capsys, model_config, task):
    import yaml

    printed = yaml.safe_load(_printed_config(capsys, [model_config, task]))
    task_rewards = yaml.safe_load((ROOT / task).read_text())["model"]["rewards"]
    assert set(printed["model"]["rewards"]) == set(task_rewards)  # the task's rewards replace the model config's
    assert "shapes" not in printed["model"]["rewards"]
    assert printed["trainer"]["precision"] == "bf16-mixed"
    check_model_settings(printed["model"])


def test_real_model_configs_do_not_train_on_shapes(capsys):
    import yaml

    for config in MODEL_CONFIGS:
        printed = yaml.safe_load(_printed_config(capsys, [config]))
        assert "shapes" not in printed["model"]["rewards"]
        assert "shapes" not in printed["data"]["train_prompts"]


def test_print_config_range_checks_values(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/sd3.yaml", "--model.sampling.noise_level=3", "--print_config"])
    assert stop.value.code == 2
    assert "sampling.noise_level of a 'cps' step must be in [0, 1], got 3" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["joined", "split"])
def test_a_dotted_reward_option_keeps_the_rewards_other_options(capsys, form):
    import yaml

    options = {"ocr.weight": "0.5", "pickscore.weight": "0.25", "ocr.max_new_tokens": "8"}
    flags = [item for key, value in options.items()
             for item in ([f"--model.rewards.{key}={value}"] if form == "joined" else [f"--model.rewards.{key}", value])]
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/sd3.yaml", "--config", "configs/tasks/ocr.yaml", *flags, "--print_config"])
    out = capsys.readouterr()
    assert stop.value.code == 0, out.err
    rewards = yaml.safe_load(out.out)["model"]["rewards"]
    task = yaml.safe_load((ROOT / "configs" / "tasks" / "ocr.yaml").read_text())["model"]["rewards"]["ocr"]
    # the task file's ocr options stay; the two set here change; a reward not in the config is added
    assert rewards["ocr"] == {**task, "weight": 0.5, "max_new_tokens": 8}
    assert rewards["pickscore"] == {"weight": 0.25}


def test_the_policy_loss_is_named_from_its_registry():
    from tpgrpo.maths.credit import POLICY_LOSSES, clipped_policy_loss

    assert POLICY_LOSSES["ppo-clip"] is clipped_policy_loss and UpdateConfig().policy_loss == "ppo-clip"
    with pytest.raises(UserInputError, match=r"update.policy_loss must be one of \['ppo-clip'\], got 'dpo'"):
        UpdateConfig(policy_loss="dpo")
