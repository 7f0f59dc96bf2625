"""``onedc`` on real photo folders (issue 24): nothing overwritten unasked, inputs never, every file
of a batch attempted with a summary, trees mirrored, GIFs listed, output checks before the model
loads, a pixel limit checked from the header, stale temp files tidied, library noise silenced."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from onedc.cli import main
from onedc.coding.bitstream import (
    DEFAULT_MAX_PIXELS,
    FORMAT_VERSION,
    decode_container,
    encode_container,
    z_stream_size,
)

REPO = Path(__file__).resolve().parents[2]


def write_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


def lines(text: str) -> list[str]:
    """The message lines of a stream, without tqdm's progress bar (stderr, for more than one file)."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture()
def clob(tmp_path, photo) -> Path:
    """The issue's folder: one photo."""
    return write_png(tmp_path / "clob" / "photo.png", photo[:, :64, :64]).parent


# --------------------------------------------------------------------------- 1. overwrite
def test_existing_outputs_are_replaced_only_with_force(clob, tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "out"
    args = ["compress", str(clob), "-o", str(out), "--ckpt", str(tiny_ckpt)]
    assert main(args) == 0
    (out / "photo.onedc").write_bytes(b"mine")
    capsys.readouterr()
    assert main(args) == 2
    err = lines(capsys.readouterr().err)
    assert err == [f"error: {out / 'photo.onedc'} already exists: pass --force to replace it"]
    assert (out / "photo.onedc").read_bytes() == b"mine"
    assert main(args + ["--force"]) == 0
    assert decode_container((out / "photo.onedc").read_bytes()).height == 64

    recon = tmp_path / "recon"
    recon.mkdir()
    (recon / "photo.png").write_bytes(b"mine")
    assert main(["decompress", str(out), "-o", str(recon), "--ckpt", str(tiny_ckpt)]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err
    assert (recon / "photo.png").read_bytes() == b"mine"

    exported = tmp_path / "codec.safetensors"
    exported.write_bytes(b"mine")
    assert main(["export", str(tiny_ckpt), "-o", str(exported)]) == 2
    assert lines(capsys.readouterr().err) == [f"error: {exported} already exists: pass --force to replace it"]
    assert exported.read_bytes() == b"mine"
    assert main(["export", str(tiny_ckpt), "-o", str(exported), "--force"]) == 0
    assert exported.stat().st_size > 1000


def test_the_originals_are_never_clobbered(clob, tmp_path, tiny_ckpt, capsys):
    """The issue's finding 1: compress clob/photo.png -o clob, then decompress clob -o clob."""
    original = (clob / "photo.png").read_bytes()
    assert main(["compress", str(clob / "photo.png"), "-o", str(clob), "--ckpt", str(tiny_ckpt)]) == 0
    for extra in ([], ["--force"]):
        capsys.readouterr()
        assert main(["decompress", str(clob), "-o", str(clob), "--ckpt", str(tiny_ckpt), *extra]) == 2
        (line,) = lines(capsys.readouterr().err)  # --force would not help: the line does not offer it
        assert str(clob / "photo.png") in line and "probably the image it was coded from" in line
        assert (clob / "photo.png").read_bytes() == original

    # An output that is an input (here: re-exporting an exported file onto itself) is refused even with --force.
    exported = tmp_path / "codec.safetensors"
    assert main(["export", str(tiny_ckpt), "-o", str(exported)]) == 0
    before = exported.read_bytes()
    capsys.readouterr()
    assert main(["export", str(exported), "-o", str(exported), "--force"]) == 2
    assert "never overwrites its inputs" in capsys.readouterr().err
    assert exported.read_bytes() == before


# --------------------------------------------------------------------------- 2. batches
@pytest.fixture()
def mixed(tmp_path, photo) -> Path:
    """The issue's folder: a_good.png, b_zero.png (0 bytes), c_good.png, e_good.png."""
    folder = tmp_path / "mixed"
    for name, top in (("a_good", 0), ("c_good", 64), ("e_good", 128)):
        write_png(folder / f"{name}.png", photo[:, top:top + 64, :64])
    (folder / "b_zero.png").write_bytes(b"")
    return folder


def test_one_bad_image_does_not_stop_the_batch(mixed, tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(mixed), "-o", str(out), "--ckpt", str(tiny_ckpt)]) == 2
    captured = capsys.readouterr()
    assert tree(out) == ["a_good.onedc", "c_good.onedc", "e_good.onedc"]
    err = lines(captured.err)
    assert len(err) == 2 and err[0].startswith(f"error: cannot read image {mixed / 'b_zero.png'}")
    assert err[1] == f"compress: 3 of 4 done, 1 failed: {mixed / 'b_zero.png'}"
    assert "skip_bad" not in captured.err  # finding 3: no train.py key in the CLI's advice
    assert len(lines(captured.out)) == 3  # one result line per coded file

    # decompress: a damaged file among good ones
    (out / "c_good.onedc").write_bytes((out / "c_good.onedc").read_bytes()[:-3])
    recon = tmp_path / "recon"
    assert main(["decompress", str(out), "-o", str(recon), "--ckpt", str(tiny_ckpt)]) == 2
    err = lines(capsys.readouterr().err)
    assert tree(recon) == ["a_good.png", "e_good.png"]
    assert "truncated" in err[0] and err[-1] == f"decompress: 2 of 3 done, 1 failed: {out / 'c_good.onedc'}"


def test_fail_fast_stops_at_the_first_failure(mixed, tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(mixed), "-o", str(out), "--ckpt", str(tiny_ckpt), "--fail-fast"]) == 2
    (line,) = lines(capsys.readouterr().err)
    assert line.startswith(f"error: cannot read image {mixed / 'b_zero.png'}")
    assert not out.exists() or tree(out) == []  # stopped before the model loaded: headers are checked first


def test_eval_reports_on_the_images_that_worked(mixed, tmp_path, tiny_ckpt, capsys, monkeypatch):
    (tmp_path / "no-weights").mkdir()
    monkeypatch.setenv("ONEDC_WEIGHTS", str(tmp_path / "no-weights"))
    (mixed / "b_zero.png").write_bytes((mixed / "c_good.png").read_bytes()[:100])  # truncated, not empty
    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", str(tiny_ckpt), str(mixed), "-o", str(out), "--no-baselines"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot read image" in err and "eval: 3 of 4 images scored, 1 failed: b_zero" in err
    report = json.loads((out / "aggregate.json").read_text())
    assert report["images"] == 3 and list(report["failed"]) == ["b_zero"]
    assert sorted(row["image"] for row in json.loads((out / "per_image.json").read_text())) == [
        "a_good", "c_good", "e_good"]
    assert main(["eval", "--ckpt", str(tiny_ckpt), str(mixed), "-o", str(out), "--no-baselines"]) == 2
    err = capsys.readouterr().err  # a second run never replaces the first
    assert f"{out / 'per_image.csv'} already exists (and 4 more output(s)): pass --force" in err


# --------------------------------------------------------------------------- 4. formats
def test_gifs_are_listed_and_skipped_files_are_named(tmp_path, photo, tiny_ckpt, capsys):
    folder = tmp_path / "shots"
    write_png(folder / "a.png", photo[:, :64, :64])
    Image.open(write_png(tmp_path / "b.png", photo[:, 64:128, :64])).convert("P").save(folder / "anim.gif")
    (folder / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    assert main(["compress", str(folder), "-o", str(out), "--ckpt", str(tiny_ckpt)]) == 0
    assert tree(out) == ["a.onedc", "anim.onedc"]
    err = lines(capsys.readouterr().err)
    assert err == [f"note: {folder}: skipped 1 .txt file(s), not an image format onedc lists (notes.txt)"]


# --------------------------------------------------------------------------- 5. trees
def test_a_tree_round_trips_with_its_layout(tmp_path, photo, tiny_ckpt, onedc_codec, capsys):
    photos = tmp_path / "photos"
    first = write_png(photos / "2023" / "IMG_0001.png", photo[:, :64, :64])
    second = write_png(photos / "2024" / "IMG_0001.png", photo[:, 64:128, 64:192])
    write_png(photos / "2024" / "IMG_0002.jpg", photo[:, :64, :64])
    write_png(photos / "2024" / "IMG_0002.png", photo[:, :64, :64])  # same stem, other format: both kept
    bits, recon = tmp_path / "bits", tmp_path / "recon"
    assert main(["compress", str(photos), "-o", str(bits), "--ckpt", str(tiny_ckpt)]) == 0
    assert tree(bits) == ["2023/IMG_0001.onedc", "2024/IMG_0001.onedc", "2024/IMG_0002.jpg.onedc",
                          "2024/IMG_0002.png.onedc"]
    # fp32, one file at a time: the library's decode, so the pictures compare bit for bit (the CLI's
    # default bf16 on native-bf16 CPUs and its batches move them by rounding)
    assert main(["decompress", str(bits), "-o", str(recon), "--ckpt", str(tiny_ckpt), "--precision", "fp32",
                 "--batch", "1"]) == 0
    assert tree(recon) == ["2023/IMG_0001.png", "2024/IMG_0001.png", "2024/IMG_0002.jpg.png",
                           "2024/IMG_0002.png.png"]
    for source, decoded in ((first, recon / "2023" / "IMG_0001.png"), (second, recon / "2024" / "IMG_0001.png")):
        from onedc.coding.images import load_image, to_uint8

        expected = to_uint8(onedc_codec.decompress_bytes(onedc_codec.compress_image(load_image(source))).image)
        assert torch.equal(to_uint8(load_image(decoded)), expected)
    capsys.readouterr()
    assert main(["info", str(bits)]) == 0  # finding 7: info takes folders
    out = capsys.readouterr().out
    assert out.count("file: ") == 4 and "height: 64" in out and "width: 128" in out
    assert all(": " in line for line in lines(out))  # fields only: no summary among them


# --------------------------------------------------------------------------- 6. output checks first
def test_output_and_checkpoint_problems_come_before_the_model(tmp_path, clob, tiny_ckpt, capsys, monkeypatch):
    from onedc.coding.bundle import OneDCCodec

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(OneDCCodec, "from_checkpoint", no_model)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    cases = [
        (["-o", str(a_file), "--ckpt", str(tiny_ckpt)], f"error: -o {a_file} is a file, not a folder"),
        (["-o", "/proc/self", "--ckpt", str(tiny_ckpt)], "error: cannot create files in the output folder /proc/self"),
        (["-o", str(tmp_path / "o"), "--ckpt", str(tmp_path / "nope.ckpt")], "error: checkpoint not found"),
    ]
    for args, start in cases:
        assert main(["compress", str(clob), *args]) == 2
        (line,) = lines(capsys.readouterr().err)
        assert line.startswith(start), line


# --------------------------------------------------------------------------- 8. pixel limit
def forged(small_file: bytes, side: int = 16384) -> bytes:
    """A CRC-valid file declaring side x side pixels, built from a real small file's header fields."""
    header = decode_container(small_file)
    grid = side // header.stride
    return encode_container(replace(header, height=side, width=side, z_height=grid, z_width=grid,
                                    z_stream=bytes(z_stream_size(grid, grid, header.z_bits))))


GRANDCHILD = r"""
import json, resource, subprocess, sys, time
def cap():  # even a regression cannot take the shared machine's memory
    resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))
start = time.perf_counter()
run = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=cap, timeout=300)
print(json.dumps({"wall": time.perf_counter() - start, "code": run.returncode, "stdout": run.stdout,
                  "stderr": run.stderr, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def test_a_forged_16k_file_is_refused_from_its_header(small_file, tmp_path, tiny_ckpt, onedc_codec):
    from onedc.errors import PixelLimitError

    data = forged(small_file)
    assert len(data) < 120_000 and decode_container(data).height == 16384  # the 116 KB file
    start = time.perf_counter()
    with pytest.raises(PixelLimitError, match="16384x16384 = 268,435,456 pixels"):
        onedc_codec.decompress_bytes(data)  # the library refuses it too, by default
    assert time.perf_counter() - start < 0.5

    # The CLI, in a process of its own whose peak memory is measured (RUSAGE_CHILDREN of a wrapper).
    path = tmp_path / "forged.onedc"
    path.write_bytes(data)
    command = [sys.executable, "-c", GRANDCHILD, sys.executable, "-m", "onedc.cli", "decompress", str(path),
               "-o", str(tmp_path / "recon"), "--ckpt", str(tiny_ckpt)]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, timeout=400).stdout)
    assert result["code"] == 2 and result["stdout"] == ""
    assert lines(result["stderr"]) == [
        (f"error: {path}: file declares 16384x16384 = 268,435,456 pixels, above the limit of "
         f"{DEFAULT_MAX_PIXELS:,} (--max-pixels, or max_pixels= in Python): raise the limit only for a file you trust")]
    assert result["maxrss_kb"] < 200 * 1024, result  # refused before torch or the model is even loaded
    assert result["wall"] < 5.0, result  # interpreter start-up included, on a loaded 2-core machine


def test_raising_the_limit_lets_a_larger_file_through(onedc_codec, photo, tmp_path, tiny_ckpt, capsys):
    from onedc.errors import PixelLimitError

    image = write_png(tmp_path / "in" / "square.png", photo[:, :128, :128])
    out, recon = tmp_path / "bits", tmp_path / "recon"
    assert main(["compress", str(image), "-o", str(out), "--ckpt", str(tiny_ckpt), "--max-pixels", "4096"]) == 2
    assert "128x128 = 16,384 pixels, above the limit of 4,096 (--max-pixels" in capsys.readouterr().err
    assert main(["compress", str(image), "-o", str(out), "--ckpt", str(tiny_ckpt), "--max-pixels", "16384"]) == 0
    data = (out / "square.onedc").read_bytes()
    assert main(["decompress", str(out), "-o", str(recon), "--ckpt", str(tiny_ckpt), "--max-pixels", "4096"]) == 2
    assert "16,384 pixels, above the limit of 4,096" in capsys.readouterr().err and tree(recon) == []
    assert main(["decompress", str(out), "-o", str(recon), "--ckpt", str(tiny_ckpt), "--max-pixels", "16384"]) == 0
    assert Image.open(recon / "square.png").size == (128, 128)
    with pytest.raises(PixelLimitError):
        onedc_codec.decompress_bytes(data, max_pixels=4096)
    assert onedc_codec.decompress_bytes(data, max_pixels=None).image.shape == (3, 128, 128)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose pixel data is cut short."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)  # a few rows' worth: the file is truncated
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_a_huge_input_image_is_refused_from_its_header(tmp_path, tiny_ckpt, capsys):
    """9000 x 9000 = 81 MP: under Pillow's bomb limit, above onedc's default. Refused, never decoded."""
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(png_header_only(9000, 9000))
    assert main(["compress", str(bomb), "-o", str(tmp_path / "out"), "--ckpt", str(tiny_ckpt)]) == 2
    (line,) = lines(capsys.readouterr().err)
    assert "9000x9000 = 81,000,000 pixels, above the limit" in line and "truncated" not in line


# --------------------------------------------------------------------------- 7. smaller findings
def test_stale_temp_files_of_a_killed_run_are_removed(clob, tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".photo.onedc.{dead.pid}.0123abcd.tmp"
    live = out / f".photo.onedc.{os.getpid()}.89abcdef.tmp"  # a running writer's file
    young = out / f".other.onedc.{dead.pid}.00000000.tmp"  # too recent to be sure (other machines)
    mine = out / ".notes.tmp"  # the user's: not onedc's pattern
    for path in (stale, live, young, mine):
        path.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for path in (stale, live, mine):
        os.utime(path, (hour_ago, hour_ago))
    assert main(["compress", str(clob), "-o", str(out), "--ckpt", str(tiny_ckpt)]) == 0
    assert not stale.exists() and live.exists() and young.exists() and mine.exists()


def test_a_version_far_ahead_is_corruption_not_a_newer_file(small_file):
    from onedc.errors import BitstreamError, UnsupportedVersionError

    header = decode_container(small_file)
    with pytest.raises(UnsupportedVersionError, match="upgrade onedc"):
        decode_container(encode_container(replace(header, version=FORMAT_VERSION + 1)))
    flipped = small_file[:5] + bytes([small_file[5] ^ 0xFF]) + small_file[6:]  # version 2 -> 65282
    with pytest.raises(BitstreamError, match="version 65282.*corrupt") as info:
        decode_container(flipped)
    assert type(info.value) is BitstreamError


@pytest.mark.slow  # a fresh process, to see the import-time messages: ~15-30 s on 2 loaded cores
def test_stdout_carries_results_only(tmp_path, clob):
    """No torch.jit.script FutureWarning (compressai importing torch_geometric), no DeepSpeed note on stdout."""
    folder_ckpt = tmp_path / "not-a-deepspeed-run"
    folder_ckpt.mkdir()
    run = subprocess.run([sys.executable, "-m", "onedc.cli", "compress", str(clob), "-o", str(tmp_path / "o"),
                          "--ckpt", str(folder_ckpt)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2 and run.stdout == ""
    assert lines(run.stderr) == [(f"error: cannot convert the DeepSpeed checkpoint folder {folder_ckpt}: "
                                  f"Unable to find 'latest' file at {folder_ckpt}/latest")], run.stderr
