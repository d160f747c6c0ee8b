"""Generate the configuration reference from the code: ``python -m tpgrpo.docs > docs/config.md``.

Every ``model.*`` and ``data.*`` setting with its default and the help text of its class
docstring; a test checks that the committed file equals this output, so it cannot drift.
"""
from __future__ import annotations

import dataclasses
import inspect
import re

from tpgrpo.training.data import PromptDataModule
from tpgrpo.training.module import TPGRPOModule


def argument_help(cls: type) -> dict[str, str]:
    """``name -> help`` from the ``Args:`` section of the class (or ``__init__``) docstring.

    An entry may name several arguments (``a, b: text``); continuation lines are joined.
    """
    doc = inspect.getdoc(cls.__init__) if "Args:" in (inspect.getdoc(cls.__init__) or "") else inspect.getdoc(cls)
    section = (doc or "").split("Args:", 1)[-1]
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in section.splitlines():
        entry = re.match(r"^\s{0,4}([a-z_][a-z0-9_, ]*):\s*(.*)$", line)
        if entry:
            current = [name.strip() for name in entry.group(1).split(",")]
            for name in current:
                helps[name] = entry.group(2).strip()
        elif line.strip() and current:
            for name in current:
                helps[name] += " " + line.strip()
        elif not line.strip():
            current = []
    return helps


def reference_table(prefix: str, cls: type) -> str:
    """A markdown table of the ``__init__`` arguments of ``cls`` as ``prefix.name``; a settings
    group (a dataclass default) gets one row per field, ``prefix.group.field``."""
    helps = argument_help(cls)
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        if dataclasses.is_dataclass(parameter.default):
            group_helps = argument_help(type(parameter.default))
            rows.append(f"| **`{prefix}.{name}`** | | {helps.get(name, '')} |")
            for field in dataclasses.fields(parameter.default):
                value = getattr(parameter.default, field.name)
                rows.append(f"| `{prefix}.{name}.{field.name}` | `{value!r}` | {group_helps.get(field.name, '')} |")
            continue
        default = "(required)" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        if name == "pretrained_path":
            default = "the shipped tiny model"
        rows.append(f"| `{prefix}.{name}` | `{default}` | {helps.get(name, '')} |")
    return "\n".join(rows)


def config_reference() -> str:
    return "\n".join(
        [
            "# Configuration reference",
            "",
            "Generated from the code by `python -m tpgrpo.docs > docs/config.md`; do not edit by hand.",
            "Each setting is a YAML key under `model:` or `data:` and a command-line flag",
            "(`python train.py fit --config configs/tiny.yaml --model.sampling.noise_level 0.5`).",
            "Trainer settings are Lightning's (`python train.py fit --help`).",
            "",
            "## model (`tpgrpo.training.module.TPGRPOModule`)",
            "",
            reference_table("model", TPGRPOModule),
            "",
            "## data (`tpgrpo.training.data.PromptDataModule`)",
            "",
            reference_table("data", PromptDataModule),
            "",
        ]
    )


if __name__ == "__main__":
    print(config_reference(), end="")
