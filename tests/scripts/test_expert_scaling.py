"""scripts/expert_scaling.py's kernel mode at a toy shape: a row per expert count, both kernels timed.

No assertion on speed: speed figures come from the benchmark itself, never from timed tests.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_mode_times_both_expert_kernels_at_every_expert_count(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "expert_scaling.py"), "--experts", "2", "4", "--kernels",
               "--out", str(tmp_path), "model.d_model=16", "model.d_ff=32", "model.seq_len=8",
               "train.micro_batch_size=2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "kernels.md").read_text().splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [int(row[0]) for row in rows] == [2, 4]
    assert all(float(cell) > 0 for row in rows for cell in row[1:3])
