import json
import subprocess
import sys
from pathlib import Path

from tests.engine.helpers import REPO


def _scenario(demo_root, tiny_model_dir, out):
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "scenario_single_rank.py"),
            str(demo_root),
            str(tiny_model_dir),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_crash_mid_save_keeps_previous_checkpoint_and_convert_matches(
    demo_root, tiny_model_dir, tmp_path
):
    found = _scenario(demo_root, tiny_model_dir, tmp_path)
    assert found["crash"] == "disk full (simulated)"
    assert found["latest_after_crash"] == "step_00000002"  # the pointer never moved
    assert found["partial_left"] is True
    assert found["resumed_state"]["step"] == 2  # the previous checkpoint loads
    assert found["latest_after_good_save"] == "step_00000004"
    assert not any(
        p.name == "step_00000004" and not (p / "COMPLETE").exists()
        for p in (tmp_path / "checkpoints").glob("step_*")
    )
    for key, diff in found["max_abs_diff"].items():
        assert diff < 1e-5, (key, diff)
    assert found["plain_transformers_params"] > 100_000
    assert {"peak_ram_gib", "seconds"} <= set(found["convert_report_keys"])
