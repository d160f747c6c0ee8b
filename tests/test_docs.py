"""Documentation that must match the code."""
import re
from pathlib import Path

from tpgrpo.docs import argument_help, config_reference
from tpgrpo.settings import CreditConfig
from tpgrpo.training.module import TPGRPOModule

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_up_to_date():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_reference(), "run: python -m tpgrpo.docs > docs/config.md"


def test_every_model_setting_is_documented():
    helps = argument_help(TPGRPOModule)
    missing = [row for row in config_reference().splitlines() if row.startswith("| `") and row.endswith("|  |")]
    assert not missing, missing
    assert "turning points" in argument_help(CreditConfig)["method"]
    assert "credit" in helps


def test_readme_quick_start_is_two_make_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
