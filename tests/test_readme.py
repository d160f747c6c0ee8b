"""Every command in the README (and the model card and the pages under docs/) is checked here.

Commands that run offline are run, shortened with overrides (fewer steps, tiny batches, output
under a temporary folder); commands that need real weights or a cluster are checked with
``--print_config`` or ``--help``. `CHECKS` maps every command to its check, and a command
without one fails `test_every_documented_command_has_a_check`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # end-to-end runs: `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "tpgrpo" / "tiny" / "MODEL_CARD.md",
        *(ROOT / "docs" / name for name in ("lab_notes.md", "benchmarks.md", "scaling.md", "memory.md", "tasks.md",
                                             "models.md", "reproducing.md", "algorithms.md"))]
COMMAND_START = re.compile(r"^(python|make|tensorboard|torchrun|srun|sbatch) ")

# Shortened training: 1 rollout batch of 2 prompts × 4 images, 3 steps, a small evaluation.
SHORT_FIT = [
    "--trainer.max_steps=2", "--model.sampling.num_steps=3", "--model.evaluation.num_steps=2", "--model.sampling.window_size=2",
    "--model.sampling.window_range=[0, 2]", "--data.prompts_per_step=2", "--data.group_size=4", "--data.eval_seeds=1",
    "--data.eval_batch_size=8", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false",
]


def documented_commands() -> list[str]:
    """Shell commands of the docs: lines of ```bash blocks and inline code spans that start like one."""
    commands: list[str] = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s#\s", line)[0].strip()
                if line and not line.startswith("#"):
                    commands.append(" ".join(line.split()))
        for span in re.findall(r"`([^`\n]+)`", text):
            if COMMAND_START.match(span):
                commands.append(" ".join(span.split()))
    return list(dict.fromkeys(commands))


def run(argv: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    result = subprocess.run(argv, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def run_in_process(argv: list[str]) -> str:
    """``python train.py …`` or ``python -m <module> …`` in this process: the same code, without a new
    interpreter's imports (for commands that only parse or print). Returns what it printed."""
    import contextlib
    import importlib
    import io

    if argv[1] == "train.py":
        from tpgrpo.cli import main

        args = argv[2:]
    else:
        assert argv[1] == "-m", argv
        main, args = importlib.import_module(argv[2]).main, argv[3:]
    printed = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(printed):
        try:
            main(args)
        except SystemExit as stop:
            assert stop.code in (0, None), printed.getvalue()[-3000:]
    return printed.getvalue()


def python_argv(command: str, placeholders: dict[str, str]) -> list[str]:
    """The command's arguments with placeholders filled in and ``python`` the test's interpreter."""
    for placeholder, value in placeholders.items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)
    assert argv[0] == "python", command
    return [sys.executable, *argv[1:]]


def needs_real_weights(command: str) -> bool:
    """A real model's config (any but tiny.yaml and the task files) or a local model folder."""
    return bool(re.search(r"configs/(?!tiny\.yaml|tasks/)\w+\.yaml", command)) or "/models/" in command


# ----------------------------------------------------------------------------- the checks
def check_print_config(command: str, work: Path) -> None:
    """Real weights cannot be downloaded here: the command must parse, with its overrides applied."""
    argv = python_argv(command, {})
    argv = [a for a in argv if a != "--print_config"] + ["--print_config"]
    printed = run_in_process(argv)
    assert "pretrained_path:" in printed and "strategy:" in printed
    for option in re.findall(r"--(model\.[\w.]+|data\.[\w.]+|trainer\.[\w.]+)[ =](\S+)", command):
        key, value = option[0].rsplit(".", 1)[1], option[1].strip("'\"")
        if not value.startswith("{"):
            assert re.search(rf"^\s*{key}: .*{re.escape(value)}", printed, re.M), (key, value)


def check_fit(command: str, work: Path, checkpoint: Path) -> None:
    prompts = work / "prompts.txt"
    prompts.write_text("a photo of a red circle\na photo of two blue squares\n")
    argv = python_argv(command, {"…": "configs/tiny.yaml", "<ckpt>": str(checkpoint), "prompts.txt": str(prompts)})
    out = work / "run"
    extra = [f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out / 'logs'}"]
    if " predict " in command:
        extra.append(f"--model.evaluation.predict_dir={out / 'predict'}")
    if "--ckpt_path last" in command:  # resume: a first run leaves a last.ckpt of this experiment
        first = [a for a in argv if a not in ("--ckpt_path", "last")]
        run([*first, *SHORT_FIT, *extra])
        extra.append("--trainer.max_steps=4")
    if "--trainer.devices 2" in command:
        extra.append("--data.val_prompts=null")
    run([*argv, *SHORT_FIT, *extra])
    if " predict " in command:
        assert len(list((out / "predict").glob("*.png"))) == 2


def check_export(command: str, work: Path, checkpoint: Path) -> None:
    target = work / "my_lora"
    run(python_argv(command, {"<path>/last.ckpt": str(checkpoint), "my_lora": str(target)}))
    assert (target / "pytorch_lora_weights.safetensors").is_file()


def check_demo(command: str, work: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t\$\(BIN\)/(python -m tpgrpo\.demo .*)$", makefile, re.M).group(1)
    argv = python_argv(recipe if command == "make demo" else command, {})
    result = run([*argv, f"--out={work / 'demo'}", *SHORT_FIT, "--data.val_prompts=data/shapes/test.jsonl",
                  f"--trainer.default_root_dir={work}", f"--trainer.logger.init_args.save_dir={work / 'logs'}"])
    assert "held-out before training" in result.stdout and "standard errors" in result.stdout
    for name in ("before_after.png", "reward_curve.png", "demo.json"):
        assert (work / "demo" / name).is_file(), name


def check_make_target(command: str, work: Path) -> None:
    """``make test`` is this suite, ``make install-ocr`` needs apt: the targets exist and do what the docs say."""
    target = command.split()[1]
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    for name, value in re.findall(r"^(\w+) :?= (.*)$", makefile, re.M):  # expand the Makefile's variables
        recipe = recipe.replace(f"$({name})", value)
    expected = {
        "test": ["pytest -q -n auto"], "test-fast": ["pytest", 'not e2e'], "test-all": ["pytest", "slow or not slow"],
        "install-ocr": ["tesseract-ocr"], "bench": ["benchmarks/step.py"],
    }[target]
    assert all(part in recipe for part in expected), recipe


def check_tensorboard(command: str, work: Path) -> None:
    run([str(Path(sys.executable).with_name("tensorboard")), "--version"])


def check_help(command: str, work: Path) -> None:
    """Servers and cluster launchers: the Python entry point they start answers ``--help``."""
    module = re.search(r"(?:-m (\S+)|(\S+\.py))", command)
    argv = [sys.executable, "-m", module.group(1)] if module.group(1) else [sys.executable, module.group(2)]
    run([*argv, "--help"])


def check_aesthetic_conversion(command: str, work: Path) -> None:
    """The head conversion on a random head saved as the released file is (a state dict of tensors)."""
    import torch

    from tpgrpo.rewards.aesthetic import aesthetic_head, load_head

    argv = shlex.split(command)
    source, target = work / argv[-2], work / argv[-1]
    torch.save({f"layers.{key}": value for key, value in aesthetic_head().state_dict().items()}, source)
    run([sys.executable, *argv[1:-2], str(source), str(target)])
    load_head(target)


def check_torchrun(command: str, work: Path) -> None:
    """One node, two CPU processes: torchrun starts the ranks, Lightning joins them (the tiny model
    stands in for a real-weight config)."""
    argv = shlex.split(command.replace("configs/sd3.yaml", "configs/tiny.yaml").replace("configs/flux.yaml", "configs/tiny.yaml"))
    assert argv[0] == "torchrun"
    node_args = ["--nnodes=1", "--nproc-per-node=2", "--standalone"]
    script_at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    overrides = drop_options(argv[script_at + 1 :], ("--trainer.num_nodes", "--trainer.devices"))
    out = work / "torchrun"
    run([sys.executable, "-m", "torch.distributed.run", *node_args, argv[script_at], *overrides,
         "--trainer.num_nodes=1", "--trainer.devices=2", "--trainer.accelerator=cpu", "--data.val_prompts=null",
         *SHORT_FIT, f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out / 'logs'}"])


def drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names``, given as ``--name value`` or ``--name=value``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


def check_pretrain(command: str, work: Path) -> None:
    run(python_argv(command, {"tpgrpo/tiny/model": str(work / "model")})
        + ["--minutes=0.3", "--vae-minutes=0.05", "--pool=64", "--batch=8", "--layers=1"])
    assert (work / "model" / "model_index.json").is_file()


def check_evaluate(command: str, work: Path) -> None:
    prompts = work / "few.jsonl"
    prompts.write_text("".join((ROOT / "data" / "shapes" / "test.jsonl").read_text().splitlines(True)[:4]))
    run(python_argv(command, {}) + [f"--prompts={prompts}", "--seeds=1", "--steps=2", f"--json={work / 'eval.json'}"])
    assert (work / "eval.json").is_file()


def check_prompts(command: str, work: Path) -> None:
    """The prompt generators write their two files, here small and into a temporary folder."""
    task = shlex.split(command)[3]
    out = work / task
    sizes = {"geneval": ["--train-per-tag=2", "--test-per-tag=1"], "ocr": ["--train=4", "--test=2"]}[task]
    run(python_argv(command, {f"data/{task}": str(out)}) + sizes)
    names = {"geneval": ("train.jsonl", "test.jsonl"), "ocr": ("train.txt", "test.txt")}[task]
    for name in names:
        assert (out / name).read_text().strip(), name


def check_benchmark(command: str, work: Path) -> None:
    argv = python_argv(command, {})
    script, cli = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    if "rollout.py" in argv[1]:
        run([*script, "--cases=tiny,sd3", "--repeats=1", "--group=2", "--sd3-layers=1", "--sd3-resolution=32",
             "--sd3-group=1", f"--out={work / 'rollout.json'}"])
    elif "step.py" in argv[1]:
        short = ["--model.sampling.num_steps=3", "--model.sampling.window_size=2", "--model.sampling.window_range=[0, 2]",
                 "--data.prompts_per_step=1", "--data.group_size=2", "--model.update.train_micro_batch=null"]
        run([*script, "--sd3-layers=1", "--sd3-resolution=32", f"--out={work / 'step.json'}", "--", *cli, *short])
        results = json.loads((work / "step.json").read_text())
        for case in results["cases"].values():
            runs = {method: run for method, run in case.items() if method in ("tp", "outcome")}
            assert runs and all(
                set(r["phases"]) == {"encode", "rollout", "decode", "reward", "credit", "update"} for r in runs.values()
            )
            if len(runs) == 2:
                assert case["tp"]["nfe_per_image"] > case["outcome"]["nfe_per_image"] > 0
    elif "gradient_snr.py" in argv[1]:
        run([*script, "--prompts=2", "--batches=2", f"--out={work / 'snr.json'}", "--", *cli, "--data.group_size=2"])
        assert (work / "snr.json").is_file()
    elif "mutation.py" in argv[1]:  # the mutants are made and listed; running them is the benchmark's hour
        listed = run([*script, "--list"]).stdout.splitlines()
        assert len(listed) > 50 and all(re.match(r"\S+ tpgrpo/(credit|sde|rollout)\.py:\d+ \[", line) for line in listed)
    elif "ocr_engines.py" in argv[1]:
        run([*script, "--count=5", f"--out={work / 'ocr.json'}"])
        assert "rapidocr" in json.loads((work / "ocr.json").read_text())["engines"]
    else:  # later options win: the command's own, shortened; its training overrides, then shorter ones
        shorter = ["--steps=2", "--seeds", "0", "--eval-every=1", f"--out={work / 'efficiency.json'}"]
        run([*script, *shorter, "--", *cli, *SHORT_FIT[1:]])


def check_memory(command: str, work: Path) -> None:
    printed = run_in_process(python_argv(command, {}))
    assert "| **total, text encoders on device** |" in printed and "| transformer (frozen) |" in printed


def check_seeded_demo(command: str, work: Path) -> None:
    """`make demo` with another seed (and output folder): the same check, in the slow set."""
    assert "--seed_everything" in command
    check_demo(command, work)


SLOW = {"check_pretrain", "check_benchmark", "check_torchrun", "check_seeded_demo"}


def check_for(command: str):
    """The check of one documented command (None: no check, which fails the test below)."""
    if command == "make demo":
        return check_demo
    if command.startswith("python -m tpgrpo.demo "):
        return check_seeded_demo
    if command.startswith(("srun ", "sbatch ")) or command.startswith("python -m tpgrpo.rewards.geneval_server"):
        return check_help
    if command.startswith("python train.py "):
        return check_print_config if needs_real_weights(command) else check_fit
    by_prefix = {
        "make ": check_make_target,
        "tensorboard ": check_tensorboard,
        "torchrun ": check_torchrun,
        "python -m tpgrpo.export ": check_export,
        "python -m tpgrpo.tiny.pretrain": check_pretrain,
        "python -m tpgrpo.tiny.evaluate": check_evaluate,
        "python -m tpgrpo.prompts ": check_prompts,
        "python benchmarks/": check_benchmark,
        "python -m tpgrpo.memory": check_memory,
        "python -m tpgrpo.rewards.aesthetic ": check_aesthetic_conversion,
    }
    return next((check for prefix, check in by_prefix.items() if command.startswith(prefix)), None)


def test_every_documented_command_has_a_check():
    commands = documented_commands()
    assert "make demo" in commands and any(c.startswith("python train.py fit") for c in commands)
    unchecked = [c for c in commands if check_for(c) is None]
    assert not unchecked, f"README commands without a check in tests/test_readme.py: {unchecked}"


def _params():
    for command in documented_commands():
        check = check_for(command)
        if check is not None:
            marks = [pytest.mark.slow] if check.__name__ in SLOW else []
            yield pytest.param(command, check, marks=marks, id=command[:80])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A last.ckpt of a short fit on the shipped model, for commands that take a checkpoint."""
    out = tmp_path_factory.mktemp("readme_checkpoint")
    run([sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", *SHORT_FIT,
         f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out / 'logs'}"])
    return next(out.glob("logs/*/version_*/checkpoints/last.ckpt"))


@pytest.mark.parametrize("command, check", list(_params()))
def test_documented_command_works(command, check, tmp_path, request):
    if check in (check_fit, check_export):
        check(command, tmp_path, request.getfixturevalue("checkpoint"))
    else:
        check(command, tmp_path)
