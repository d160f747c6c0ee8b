"""The notebooks in notebooks/ run on the shipped tiny model and are stored without outputs.

Each notebook is executed with nbclient in a fresh ``python3`` kernel started in the repository
root. The kernel must be the interpreter running the tests (the .venv's, whose ipykernel provides
the ``python3`` kernel spec): every execution checks that first, so a kernel spec pointing at
another Python fails with a clear message instead of an import error inside a cell.
"""
import re
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e  # end-to-end runs: `make test-fast` leaves them out

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("turning_points.ipynb", "lora_vs_base.ipynb")
KERNEL_CHECK = "import sys; print('KERNEL_PREFIX=' + sys.prefix)"


def execute(name: str):
    """Run notebooks/<name> from the repository root; return the executed notebook (the file is untouched)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(KERNEL_CHECK))
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    kernel_prefix = notebook.cells[0].outputs[0]["text"].strip().removeprefix("KERNEL_PREFIX=")
    assert kernel_prefix == sys.prefix, (
        f"the python3 kernel runs {kernel_prefix}, not this environment ({sys.prefix}); "
        f"install this environment's kernel: {sys.executable} -m ipykernel install --sys-prefix"
    )
    return notebook


def stdout(notebook) -> str:
    return "".join(
        output["text"]
        for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs if output["output_type"] == "stream" and output["name"] == "stdout"
    )


def rich_outputs(notebook, mime: str) -> list[str]:
    return [
        output["data"][mime]
        for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs if output["output_type"] in ("display_data", "execute_result") and mime in output["data"]
    ]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), (
        f"clear the outputs of {name} before committing it"
    )
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert "set_num_threads(1)" in code[0].source, "the first cell keeps torch to one thread"


def test_turning_points_notebook():
    notebook = execute("turning_points.ipynb")
    out = stdout(notebook)
    assert "Per-step rewards and group advantages" in out
    assert re.search(r"balancing keeps min\(\d+, \d+\) = \d+ per side|balancing keeps all \d+", out)
    assert len(rich_outputs(notebook, "image/png")) == 2  # the completion grid and the reward curves
    (table,) = [t for t in rich_outputs(notebook, "text/markdown") if t.startswith("| image | t |")]
    rows = table.splitlines()[2:]
    assert len(rows) == 8 * 4  # G images × W steps
    assert any("| kept |" in row for row in rows) and any("| dropped |" in row for row in rows)


def _check_lora_notebook(notebook) -> str:
    out = stdout(notebook)
    assert "32 held-out prompts × 2 seeds = 64 samples per model" in out
    assert len(rich_outputs(notebook, "image/png")) == 1
    (table,) = [t for t in rich_outputs(notebook, "text/markdown") if t.startswith("| metric |")]
    assert "| shapes | 64 |" in table and "| shapes/strict | 64 |" in table
    return out


def _largest_change(out: str) -> float:
    return float(re.search(r"max pixel change from the LoRA: mean [\d.]+, largest ([\d.]+)", out).group(1))


@pytest.mark.slow
def test_lora_vs_base_notebook_with_a_given_lora(tmp_path, monkeypatch):
    """TPGRPO_LORA names a saved LoRA: the notebook loads it (no training) and it changes the images.

    Slow-marked only to keep `make test` short: the default run below goes through the same
    loading code (it saves its LoRA and loads it back); this adds the TPGRPO_LORA branch.
    """
    from tpgrpo.lora import add_lora, save_lora
    from tpgrpo.tiny.components import load_pipeline

    transformer = load_pipeline().transformer
    add_lora(transformer, rank=4, alpha=4)
    torch.manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:  # gaussian init leaves B = 0, i.e. no change; make it visible
            torch.nn.init.normal_(param, std=0.05)
    save_lora(transformer, tmp_path / "lora")
    monkeypatch.setenv("TPGRPO_LORA", str(tmp_path / "lora"))

    out = _check_lora_notebook(execute("lora_vs_base.ipynb"))
    assert f"LoRA from TPGRPO_LORA={tmp_path / 'lora'}" in out
    assert "SMOKE-SIZE" not in out
    assert _largest_change(out) > 0


def test_lora_vs_base_notebook_trains_a_smoke_lora(monkeypatch):
    """Without TPGRPO_LORA the notebook trains a 4-step LoRA through the CLI, labelled as a demo."""
    monkeypatch.delenv("TPGRPO_LORA", raising=False)
    out = _check_lora_notebook(execute("lora_vs_base.ipynb"))
    assert "trained 4 optimizer steps" in out
    assert "SMOKE-SIZE DEMO LoRA (4 optimizer steps, trained here) — not a result" in out
    assert _largest_change(out) > 0
