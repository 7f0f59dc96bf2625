"""The ``onedc`` console script, run in-process: outputs, messages, exit codes, atomic writes."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from onedc.coding.bitstream import FORMAT_VERSION, HEADER_SIZE, decode_container, encode_container
from onedc.cli import SUBCOMMANDS, main


def write_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture()
def images(tmp_path, photo) -> Path:
    """A folder with two photo crops, one in a subfolder (found recursively)."""
    folder = tmp_path / "in"
    write_png(folder / "a.png", photo[:, :70, :100])
    write_png(folder / "sub" / "b.png", photo[:, 100:164, 200:296])
    return folder


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_help_is_fast_and_imports_no_heavy_library():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "onedc.cli", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("compress", "decompress", "info"))
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "diffusers", "compressai", "lightning", "numpy"}


def test_subcommands_are_registered_by_name():
    assert list(SUBCOMMANDS)[:3] == ["compress", "decompress", "info"]  # others (eval, export) plug in after


def test_compress_decompress_info_round_trip(images, tmp_path, tiny_ckpt, capsys):
    out, decoded = tmp_path / "out", tmp_path / "decoded"
    assert main(["compress", str(images), "-o", str(out), "--ckpt", str(tiny_ckpt)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # the input tree is mirrored; nothing else is written: no temp files
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.onedc", "sub", "sub/b.onedc"]
    size_a = (out / "a.onedc").stat().st_size
    assert lines[0].endswith(f"70x100, {size_a} bytes, {size_a * 8 / 7000:.5f} bpp")  # bpp from the real file
    assert lines[-1] == "compress: 2 of 2 done"

    assert main(["decompress", str(out / "a.onedc"), str(out / "sub" / "b.onedc"), "-o", str(decoded),
                 "--ckpt", str(tiny_ckpt)]) == 0
    assert sorted(p.relative_to(decoded).as_posix() for p in decoded.rglob("*")) == ["a.png", "sub", "sub/b.png"]
    assert Image.open(decoded / "a.png").size == (100, 70) and Image.open(decoded / "sub/b.png").size == (96, 64)
    capsys.readouterr()

    assert main(["info", str(out / "a.onedc")]) == 0
    fields = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert (fields["height"], fields["width"], fields["pad_bottom"], fields["pad_right"]) == ("70", "100", "58", "28")
    assert fields["file_bytes"] == str(size_a) and fields["header_bytes"] == str(HEADER_SIZE)
    assert fields["z_grid"] == "2x2" and fields["format_version"] == str(FORMAT_VERSION)


@pytest.fixture()
def written(tmp_path, small_file) -> Path:
    path = tmp_path / "x.onedc"
    path.write_bytes(small_file)
    return path


def _damage(kind: str, path: Path, data: bytes) -> list[str]:
    """Make ``kind`` of bad input; return the extra CLI arguments (the input paths)."""
    if kind == "truncated file":
        path.write_bytes(data[:-5])
    elif kind == "flipped payload byte":
        path.write_bytes(data[:HEADER_SIZE + 2] + bytes([data[HEADER_SIZE + 2] ^ 1]) + data[HEADER_SIZE + 3:])
    elif kind == "wrong magic":
        path.write_bytes(b"GIF8" + data[4:])
    elif kind == "newer version":
        path.write_bytes(encode_container(replace(decode_container(data), version=FORMAT_VERSION + 1)))
    return [str(path)]


@pytest.mark.parametrize("kind,exit_code,words", [
    ("truncated file", 2, "truncated"),
    ("flipped payload byte", 2, "payload CRC32 mismatch"),
    ("wrong magic", 2, "not a .onedc file"),
    ("newer version", 2, "upgrade onedc"),
])
def test_damaged_files_fail_with_one_line(kind, exit_code, words, written, small_file, tmp_path, tiny_ckpt, capsys):
    args = _damage(kind, written, small_file)
    out = tmp_path / "decoded"
    assert main(["decompress", *args, "-o", str(out), "--ckpt", str(tiny_ckpt)]) == exit_code
    line = error_line(capsys)
    assert words in line and str(written) in line
    assert not out.exists() or not list(out.iterdir())
    assert main(["info", *args]) == exit_code  # info verifies the same way, without a checkpoint
    assert words in error_line(capsys)


def test_file_from_another_model_names_both_ids(written, tmp_path, other_ckpt, onedc_codec, capsys):
    from onedc.coding.bundle import OneDCCodec

    assert main(["decompress", str(written), "-o", str(tmp_path / "d"), "--ckpt", str(other_ckpt)]) == 2
    line = error_line(capsys)
    assert onedc_codec.model_id.hex() in line and OneDCCodec.from_checkpoint(other_ckpt).model_id.hex() in line
    assert "pass the checkpoint the file was written with" in line


@pytest.mark.parametrize("content", [b"just some notes\n", b"\x89PNG\r\n\x1a\n garbage"])
def test_input_that_is_not_an_image(tmp_path, tiny_ckpt, capsys, content):
    bad = tmp_path / "notes.png"
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert main(["compress", str(bad), "-o", str(out), "--ckpt", str(tiny_ckpt)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: cannot read image {bad}")
    assert not out.exists() or not list(out.iterdir())


def test_missing_checkpoint_and_missing_input(tmp_path, images, tiny_ckpt, capsys):
    assert main(["compress", str(images), "-o", str(tmp_path / "o"), "--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in error_line(capsys)
    assert main(["compress", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o"), "--ckpt", str(tiny_ckpt)]) == 2
    assert "no such file" in error_line(capsys)


def test_two_inputs_with_one_stem_keep_their_folders(tmp_path, images, photo, tiny_ckpt, capsys):
    other = write_png(tmp_path / "elsewhere" / "a.png", photo[:, :64, :64])
    out = tmp_path / "o"
    assert main(["compress", str(images / "a.png"), str(other), "-o", str(out), "--ckpt", str(tiny_ckpt)]) == 0
    # placed below the inputs' common folder (tmp_path): no clash, nothing refused
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.onedc")) == ["elsewhere/a.onedc", "in/a.onedc"]


@pytest.mark.parametrize("interrupt", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_compress_never_leaves_a_partial_file(tmp_path, images, tiny_ckpt, capsys, monkeypatch, interrupt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.onedc").write_bytes(b"previous")  # an existing output must survive a failed rewrite
    real_fsync = os.fsync

    def failing_fsync(fd):  # the bytes are written to the temp file, then the disk "fails"
        assert os.fstat(fd).st_size > HEADER_SIZE
        raise interrupt

    monkeypatch.setattr(os, "fsync", failing_fsync)
    code = main(["compress", str(images / "a.png"), "-o", str(out), "--ckpt", str(tiny_ckpt), "--force"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert code == (2 if isinstance(interrupt, OSError) else 130)
    assert [p.name for p in out.iterdir()] == ["a.onedc"] and (out / "a.onedc").read_bytes() == b"previous"
    line = error_line(capsys)
    assert ("No space left on device" in line) if isinstance(interrupt, OSError) else line == "error: interrupted"
