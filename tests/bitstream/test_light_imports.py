"""``onedc compress`` / ``decompress`` run without the training stack: no Lightning, Hydra or OmegaConf.

Importing Lightning costs seconds and pulls in half of the training code; a user who only codes
images should not pay for it, and a coding path that reaches it usually means an import that
points up the layers (docs/architecture.md). Checked in a fresh interpreter, after a real
compress and decompress through the console entry point.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from PIL import Image

CHILD = """
import json, sys
import onedc.cli
codes = [onedc.cli.main(["compress", sys.argv[1], "-o", sys.argv[2], "--ckpt", sys.argv[3]]),
         onedc.cli.main(["decompress", sys.argv[2], "-o", sys.argv[4], "--ckpt", sys.argv[3]]),
         onedc.cli.main(["info", sys.argv[2] + "/crop.onedc"])]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "hydra", "omegaconf", "pytorch_lightning"))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_compress_and_decompress_leave_the_training_stack_unimported(tmp_path, tiny_ckpt, photo):
    source = tmp_path / "in" / "crop.png"
    source.parent.mkdir()
    array = ((photo[:, :64, :96] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(array).save(source)
    out, decoded = tmp_path / "files", tmp_path / "decoded"
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), str(tiny_ckpt), str(decoded)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0]
    assert (out / "crop.onedc").is_file() and (decoded / "crop.png").is_file()  # the run really coded
    assert report["heavy"] == []


def test_help_returns_quickly():
    """``onedc --help`` on a warm cache: the budget is 1.5 s, measured as the best of three runs."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onedc.cli", "--help"], capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.5, times
