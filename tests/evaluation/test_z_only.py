"""z-only ``.onedc`` files (``onedc compress --z-only``): only z is sent, ŷ decodes as the prior means."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from onedc.cli import main
from onedc.coding.bitstream import HEADER_SIZE, decode_container, z_stream_size
from onedc.coding.bundle import OneDCCodec


def run_cli(args: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def test_z_only_round_trip_through_the_cli(ladder, image_dir, tmp_path):
    """compress --z-only / info / decompress on the light codec: 68 header bytes + 14 bits per z index,
    and the decoded ŷ equals μ = entropy_parameters(h_s(ẑ)) computed here from the image."""
    from onedc.coding.images import load_image

    source = image_dir / "face.png"  # 96x128 -> padded 128x128 -> a 2x2 z grid
    code, stdout, stderr = run_cli(["compress", str(source), "-o", str(tmp_path / "z"), "--ckpt", str(ladder[1]),
                                    "--z-only"])
    assert code == 0, stderr
    data = (tmp_path / "z" / "face.onedc").read_bytes()
    header = decode_container(data)
    assert header.z_only and header.y_stream == b"" and header.z_bits == 14
    assert len(data) == HEADER_SIZE + z_stream_size(2, 2, 14) == 68 + 7  # 4 indices x 14 bits = 7 bytes
    code, info, _ = run_cli(["info", str(tmp_path / "z" / "face.onedc")])
    assert code == 0 and "kind: z-only" in info and "y_bytes: 0" in info and "z_bits_per_index: 14" in info
    full = tmp_path / "full"
    assert run_cli(["compress", str(source), "-o", str(full), "--ckpt", str(ladder[1])])[0] == 0
    assert "kind: z + y" in run_cli(["info", str(full / "face.onedc")])[1]
    code, _, stderr = run_cli(["decompress", str(tmp_path / "z"), "-o", str(tmp_path / "png"),
                               "--ckpt", str(ladder[1])])
    assert code == 0, stderr
    assert (tmp_path / "png" / "face.png").exists()

    bundle = OneDCCodec.from_checkpoint(ladder[1])
    decoded = bundle.decompress_bytes(data)
    codec = bundle.codec
    with torch.no_grad():  # independently: replicate padding, g_a, h_a, FSQ, h_s, entropy parameters
        x = F.pad(load_image(source)[None], (0, 0, 0, 32), mode="replicate")
        _, sem = codec.analysis(x, bundle.vae.encode(x))
        z_hat = codec.hyper_analysis(sem)
        means = codec.entropy_parameters(codec.h_s(z_hat)).chunk(2, dim=1)[1]
    assert torch.equal(decoded.z_hat, z_hat)
    assert torch.equal(decoded.y_hat, means)
    assert decoded.image.shape == (3, 96, 128)
    # The z-only file is far below the full file's rate.
    assert len(data) < (full / "face.onedc").stat().st_size


def test_z_only_of_the_published_model_uses_reflection_and_the_context_means():
    """The reference family: reflection padding (its release's z-only script) and ŷ from the four context
    steps with q = 0 (docs/reference-model.md §4.9), checked against the codec's own z-only forward."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bitstream"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modules"))
    from test_reference_bundle import small_model_config

    from onedc.datamodules import load_image, sample_photo_paths
    from onedc.families import family_of, generator_settings

    model = small_model_config()
    family = family_of(model)
    assert family.z_only_padding == "reflect"
    torch.manual_seed(3)
    plain = OneDCCodec.from_config(model)
    bundle = OneDCCodec(plain.vae, plain.codec, family.build_generator(model),
                        generator_settings=generator_settings(model), family=family).eval()
    photo = load_image(sample_photo_paths()["astronaut"])[:, 100:200, 60:230]  # 100x170 -> 128x192
    data = bundle.compress_z_only(photo)
    header = decode_container(data)
    assert header.z_only and (header.z_height, header.z_width) == (2, 3)
    assert len(data) == HEADER_SIZE + z_stream_size(2, 3, 14)  # 6 x 14 bits = 11 bytes
    decoded = bundle.decompress_bytes(data)
    with torch.no_grad():
        x = F.pad(photo[None], (0, 192 - 170, 0, 128 - 100), mode="reflect")
        expected = bundle.codec.uncoded_forward(x, bundle.vae.encode(x), z_only=True)
    assert torch.equal(decoded.z_hat, expected.z_hat)
    assert torch.equal(decoded.y_hat, expected.y_hat)  # the prior means of the four steps
    assert torch.equal(expected.y_hat, expected.means)  # q = 0 everywhere
    assert decoded.image.shape == (3, 100, 170) and torch.isfinite(decoded.image).all()
