"""Files decode to the same ŷ, bit for bit, on another machine (issue: same results everywhere).

"Another machine" is a subprocess with another kernel set (ATEN_CPU_CAPABILITY and
ONEDNN_MAX_CPU_ISA switch PyTorch's and oneDNN's kernels, which changes a conv's float output
bits), another thread count, the model in channels-last layout and under bf16 autocast; the
encoder side also codes a batch of 4 against single images. Every case must give zero symbol
mismatches: the decoder's decision checksum passes and its ŷ equals the encoder's exactly.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from onedc.coding.bitstream import Container, decode_container, encode_container
from onedc.cli import main
from onedc.datamodules import load_image, sample_photo_paths
from onedc.errors import CodingMismatchError
from onedc.modules.light import codec as codec_module
from onedc.modules.decisions import MEAN_STEP

CHILD = Path(__file__).with_name("portability_child.py")


@pytest.fixture(scope="module")
def crops() -> list[torch.Tensor]:
    """Four 128x160 photo crops (padded to 128x192 when coded)."""
    photos = sample_photo_paths()
    return [load_image(photos[name])[:, 40:168, 30:190] for name in ("astronaut", "coffee", "chelsea", "rocket")]


def other_machine_env() -> dict[str, str]:
    """Environment of a process that runs other kernels than this one."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if torch.backends.cpu.get_cpu_capability().lower() == "default":  # this run is the "other" CPU already
        env.pop("ATEN_CPU_CAPABILITY", None)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
    else:
        env.update(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
    return env


def write(folder: Path, files: list[bytes]) -> None:
    folder.mkdir(parents=True)
    for i, data in enumerate(files):
        (folder / f"{i}.onedc").write_bytes(data)


def assert_same(decoded: list, expected: list[torch.Tensor], case: str) -> None:
    assert len(decoded) == len(expected)
    for i, (got, want) in enumerate(zip(decoded, expected)):
        assert not isinstance(got, str), f"{case}, image {i}: {got}"
        mismatches = int((got != want).sum())
        assert mismatches == 0, f"{case}, image {i}: {mismatches} of {want.numel()} ŷ symbols differ"
        assert torch.equal(got, want)


def test_files_decode_bit_exactly_across_kernels_threads_batch_layout_and_bf16(onedc_codec, tiny_ckpt, crops,
                                                                               tmp_path):
    plain_files, plain_y = [], []
    for crop in crops:  # the reference machine: one image at a time, float32, one thread
        data, y_hat = onedc_codec.compress_images([crop], return_y_hat=True)
        plain_files.append(data[0])
        plain_y.append(y_hat)
    perturbed = copy.deepcopy(onedc_codec).to(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            batch_files, batch_y = perturbed.compress_images(crops, return_y_hat=True)
    finally:
        torch.set_num_threads(threads)
    write(tmp_path / "plain", plain_files)
    write(tmp_path / "batch", batch_files)
    torch.save(crops, tmp_path / "crops.pt")

    result = subprocess.run([sys.executable, str(CHILD), str(tiny_ckpt), str(tmp_path)], env=other_machine_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    child = torch.load(tmp_path / "child.pt")
    assert child["capability"] != torch.backends.cpu.get_cpu_capability() and child["threads"] == 2

    assert_same(child["plain_files_perturbed_decoder"], plain_y, "plain encoder -> other kernels, bf16, channels-last")
    assert_same(child["batch_files_plain_decoder"], list(batch_y.split(1)), "batch-4 bf16 encoder -> other kernels")
    here = [onedc_codec.decompress_bytes(data).y_hat for data in child["child_files"]]
    assert_same(here, child["child_y_hat"], "other kernels, bf16 encoder -> this process")
    # The perturbations are real: under bf16 the encoder quantised other values than in float32.
    assert any(not torch.equal(b[None], p) for b, p in zip(batch_y, plain_y))


def test_the_float32_decisions_of_format_1_are_not_portable(onedc_codec, crops):
    # What format 1 did: μ and σ straight from the model in its own precision. Under bf16 the
    # means change, so a format-1 decoder on another machine rebuilds another ŷ.
    codec = onedc_codec.codec
    padded, _ = onedc_codec._prepare(crops[0])
    z_hat = onedc_codec.quantised_forward(crops[0]).z_hat
    _, means32, _ = codec.hyper_synthesis(z_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, means16, _ = codec.hyper_synthesis(z_hat)
    assert int((means16.float() != means32).sum()) > 0.5 * means32.numel()
    exact = codec.coding_decisions(z_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(codec.coding_decisions(z_hat).mean_codes, exact.mean_codes)


@pytest.mark.parametrize("perturbation", ["scales", "means"])
def test_a_decoder_with_other_decisions_fails_with_one_line(onedc_codec, tiny_ckpt, crops, tmp_path, capsys,
                                                            monkeypatch, perturbation):
    path = tmp_path / "a.onedc"
    path.write_bytes(onedc_codec.compress_image(crops[0]))
    real_decide = codec_module.decide

    def perturbed_decide(means, scales, table):
        # σ 10% larger picks other rANS tables; μ one grid step up decodes the same symbols, yet
        # rebuilds another ŷ: a checksum over the symbols alone would miss it.
        if perturbation == "scales":
            return real_decide(means, scales * 1.1 + 0.05, table)
        return real_decide(means + MEAN_STEP, scales, table)

    monkeypatch.setattr(codec_module, "decide", perturbed_decide)
    with pytest.raises(CodingMismatchError, match="coding decisions differ"):
        onedc_codec.decompress_bytes(path.read_bytes())
    code = main(["decompress", str(path), "-o", str(tmp_path / "out"), "--ckpt", str(tiny_ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "coding decisions differ from the encoder's" in err[0], err
    assert not (tmp_path / "out" / "a.png").exists()


def test_format_1_files_still_decode(onedc_codec, crops):
    codec = onedc_codec.codec
    padded, (height, width) = onedc_codec._prepare(crops[1])
    v = onedc_codec.vae.encode(padded)
    y, sem = codec.analysis(padded, v)
    indices = codec.fsq.codes_to_indices(codec.hyper_analysis(sem))
    z_hat = codec.fsq.indices_to_codes(indices)
    _, means, scales = codec.hyper_synthesis(z_hat)
    y_stream = codec.gaussian_conditional.compress(y, codec.gaussian_conditional.build_indexes(scales), means=means)[0]
    new = decode_container(onedc_codec.compress_image(crops[1]))
    old = replace(new, version=1, fix_stream=b"", symbol_crc=0, y_stream=y_stream)
    decoded = onedc_codec.decompress_bytes(encode_container(old))
    assert decoded.header.version == 1
    assert torch.equal(decoded.y_hat, torch.round(y - means) + means)
    assert isinstance(decoded.header, Container)
