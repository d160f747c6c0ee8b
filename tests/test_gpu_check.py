"""benchmarks/gpu_check.py in its reduced CPU mode: the script a GPU machine runs cannot rot."""
import json

import pytest

pytestmark = pytest.mark.e2e


def test_the_reduced_gpu_check_records_every_part(tmp_path):
    from benchmarks.gpu_check import main, step_flops

    out = main(["--cpu", f"--out={tmp_path / 'check.json'}"])
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["mode"] == "cpu-reduced" and set(saved["runs"]) == {"tp_eager", "flow_grpo_eager"}
    tp = out["runs"]["tp_eager"]
    assert set(tp["phases"]) == {"encode", "rollout", "decode", "reward", "credit", "update"}
    assert tp["nfe_per_image"] > out["runs"]["flow_grpo_eager"]["nfe_per_image"]
    # the first optimizer step of a batch recomputes the rollout's transitions: ratio 1
    assert abs(tp["update_metrics"]["train/first_ratio_max"] - 1.0) < 1e-5
    assert abs(tp["update_metrics"]["train/first_ratio_min"] - 1.0) < 1e-5
    assert out["flops_per_evaluation"] > 0 and tp["mfu"] is None  # no peak FLOP/s for a CPU
    assert tp["model_flops"] == pytest.approx(step_flops(tp, out["flops_per_evaluation"], 2, kl=True, checkpointing=True))
    assert out["strategies"]["fsdp2"]["returncode"] == 0, out["strategies"]["fsdp2"]["tail"]
    assert "fsdp" in out["strategies"]  # FSDP1 is recorded whatever it does (it needs a GPU)
    assert set(out["families"]) == {"zimage"}  # a GPU runs all four
    assert out["families"]["zimage"]["returncode"] == 0, out["families"]["zimage"]["tail"]
    assert any("tp_compiled" in reason for reason in out["skipped"])


def test_step_flops_by_hand():
    from benchmarks.gpu_check import peak_flops, step_flops

    result = {"images": 4, "nfe_per_image": 55}
    # rollout 4 × 55 evaluations; update 4 images × 9 transitions × (3 + 1 recompute + 1 KL) evaluations
    assert step_flops(result, 10.0, 9, kl=True, checkpointing=True) == 4 * 55 * 10 + 4 * 9 * 10 * 5
    assert step_flops(result, 10.0, 9, kl=False, checkpointing=False) == 4 * 55 * 10 + 4 * 9 * 10 * 3
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("a CPU") is None


def test_parts_run_alone(tmp_path):
    from benchmarks.gpu_check import main

    out = main(["--cpu", "--parts", "families", f"--out={tmp_path / 'check.json'}"])
    assert out["runs"] == {} and out["strategies"] == {} and set(out["families"]) == {"zimage"}
    assert out["families"]["zimage"]["returncode"] == 0, out["families"]["zimage"]["tail"]
