"""The other machine of tests/bitstream/test_portability.py, run as a subprocess.

Started with another kernel set (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``) and thread
count than the test process. It decodes the test's files with the model in channels-last layout
under bf16 autocast and in plain float32, and encodes the same crops one by one under bf16
autocast, saving every ŷ for the test to compare bit for bit.

Usage: ``python portability_child.py CKPT WORK_DIR`` (reads WORK_DIR/plain/*.onedc and
WORK_DIR/batch/*.onedc and WORK_DIR/crops.pt, writes WORK_DIR/child.pt).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from onedc.errors import OneDCError
from onedc.coding.bundle import OneDCCodec


def decode_all(codec: OneDCCodec, folder: Path, perturbed: bool) -> list:
    results = []
    for path in sorted(folder.glob("*.onedc")):
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=perturbed):
                results.append(codec.decompress_bytes(path.read_bytes()).y_hat.float())
        except OneDCError as err:  # the test reports which file failed and why
            results.append(f"{type(err).__name__}: {err}")
    return results


def main(ckpt: str, work: str) -> None:
    torch.set_num_threads(2)
    work_dir = Path(work)
    plain = OneDCCodec.from_checkpoint(ckpt)
    perturbed = OneDCCodec.from_checkpoint(ckpt).to(memory_format=torch.channels_last)
    crops = torch.load(work_dir / "crops.pt")
    files, y_hats = [], []
    for crop in crops:  # one by one, bf16, channels-last: the encoder of another machine
        with torch.autocast("cpu", dtype=torch.bfloat16):
            data, y_hat = perturbed.compress_images([crop], return_y_hat=True)
        files.append(data[0])
        y_hats.append(y_hat)
    torch.save({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "plain_files_perturbed_decoder": decode_all(perturbed, work_dir / "plain", perturbed=True),
        "batch_files_plain_decoder": decode_all(plain, work_dir / "batch", perturbed=False),
        "child_files": files,
        "child_y_hat": y_hats,
    }, work_dir / "child.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
