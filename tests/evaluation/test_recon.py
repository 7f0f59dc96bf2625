"""``onedc eval --recon DIR --bits DIR_OR_CSV --name NAME``: another codec scored exactly like the anchors."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from onedc.cli import main
from onedc.coding.images import decode_uint8
from onedc.eval import pillow_encode


def run_cli(args: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def test_recon_of_jpeg_files_reproduces_the_jpeg_anchor(tmp_path, image_dir, no_weights):
    """JPEG q=10 and q=50 written by the test as PNG reconstructions + .jpg files (one point as a bits
    folder, the other as a CSV): the scored rows equal the JPEG anchor's q=10 / q=50 rows."""
    from PIL import Image

    from onedc.coding.images import list_images

    points = {}
    for quality in (10, 50):
        recon, bits = tmp_path / f"rec_q{quality}", tmp_path / f"bits_q{quality}"
        table = []
        for path in list_images(image_dir):
            image_id = path.relative_to(image_dir).with_suffix("").as_posix()
            with Image.open(path) as img:
                x = decode_uint8(path.read_bytes()) if img.mode == "RGB" else None
            data = pillow_encode(x, "jpeg", quality)
            (recon / image_id).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(decode_uint8(data).permute(1, 2, 0).numpy()).save(recon / f"{image_id}.png")
            (bits / image_id).parent.mkdir(parents=True, exist_ok=True)
            (bits / f"{image_id}.jpg").write_bytes(data)
            table.append({"image": image_id, "bytes": len(data)})
        if quality == 50:  # the second point's sizes as a CSV
            bits = tmp_path / "bits_q50.csv"
            with open(bits, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["image", "bytes"])
                writer.writeheader()
                writer.writerows(table)
        points[quality] = (recon, bits)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["eval", str(image_dir), "--recon", str(points[10][0]), str(points[50][0]),
                                    "--bits", str(points[10][1]), str(points[50][1]), "--name", "myjpeg",
                                    "--anchors", "jpeg", "-o", str(out)])
    assert code == 0, stderr
    rows = json.loads((out / "per_image.json").read_text())
    for quality in (10, 50):
        anchor = {r["image"]: r for r in rows if r["codec"] == "jpeg" and r["setting"] == f"q={quality}"}
        mine = {r["image"]: r for r in rows if r["codec"] == "myjpeg" and r["setting"] == f"rec_q{quality}"}
        assert set(mine) == set(anchor) == {"face", "sub/rocket", "tiny"}
        for image, row in mine.items():
            for key in ("bytes", "bpp", "psnr", "ms_ssim", "ms_ssim_scales", "height", "width"):
                assert row[key] == anchor[image][key], (image, key)
    # CompressAI's results layout, readable by compressai.utils.plot (keys of compressai's eval_model).
    results = json.loads((out / "compressai" / "myjpeg.json").read_text())
    assert results["name"] == "myjpeg" and set(results) == {"name", "description", "results"}
    assert {"bpp", "psnr-rgb", "ms-ssim-rgb"} <= set(results["results"]) and len(results["results"]["bpp"]) == 2
    jpeg = json.loads((out / "compressai" / "jpeg.json").read_text())["results"]
    index = jpeg["setting"].index("q=50")
    assert results["results"]["psnr-rgb"][1] == pytest.approx(jpeg["psnr-rgb"][index], abs=0)
    # Two points of another codec vs the JPEG ladder: a BD row with the same curve -> ~0 % (exactly on it).
    bd_rows = json.loads((out / "bd.json").read_text())["rows"]
    psnr_row = next(r for r in bd_rows if r["test"] == "myjpeg" and r["anchor"] == "jpeg" and r["metric"] == "psnr")
    assert psnr_row["bd_metric"] is not None and "myjpeg vs jpeg" in stdout


def test_recon_errors_are_one_line(tmp_path, image_dir, no_weights):
    (tmp_path / "rec").mkdir()
    code, _, stderr = run_cli(["eval", str(image_dir), "--recon", str(tmp_path / "rec"), "--bits",
                               str(tmp_path / "rec"), "--no-baselines", "-o", str(tmp_path / "out")])
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: --recon") and "no reconstruction of image" in last
    code, _, stderr = run_cli(["eval", str(image_dir), "--recon", str(tmp_path / "rec"), "-o", str(tmp_path / "o")])
    assert code == 2 and "one --bits per --recon" in stderr
