"""MaskGIT-VQGAN tokenizer files -> diffusers ``VQModel``: the exact conversion of docs/reference-model.md §8.

The paper's teacher ships as ``maskgit-vqgan-imagenet-f16-256.bin``, a plain state dict
(``encoder.down.i.block.j.*``, ``decoder.up.i.*``, ``quantize.embedding.weight``) of an
architecture diffusers does not have. Its layers map onto a ``VQModel`` with the same
outputs, up to float rounding::

    resnet with nin_shortcut (out = h + W h)   -> conv2' = (I + W) o conv2, zero conv_shortcut
    avg_pool 2x2 (encoder, between levels)     -> Downsample2D conv: 0.25 at [c, c, 0:2, 0:2]
    no mid attention                           -> attention with to_out = 0 (identity)
    decoder: 2 resnets per level               -> UpDecoderBlock2D's 3rd resnet: conv2 = 0 (identity)
    encoder conv_out 1x1                       -> 3x3 with the weight at the centre tap
    no quant_conv / post_quant_conv            -> identity 1x1 convs
    conv biases the source lacks               -> zero

Sizes (widths, levels, blocks per level, codebook) are read from the weights, so the same code
converts the full-size file and small test models. :func:`import_maskgit_tokenizer` writes the
result as a diffusers directory (``onedc import-reference --tokenizer``);
:func:`maskgit_vqmodel` converts in memory (``tokenizer.pretrained`` given the ``.bin``).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from onedc.errors import OneDCError, WeightsError
from onedc.modules.state_dict_files import check_state_dict, load_state_dict_file, read_state_dict

__all__ = ["MASKGIT_FORMAT", "convert_maskgit_state_dict", "import_maskgit_tokenizer", "is_maskgit_state_dict",
           "maskgit_source_shapes", "maskgit_vqmodel", "maskgit_vqmodel_config"]

MASKGIT_FORMAT = ("a MaskGIT-VQGAN tokenizer state dict (torch.save of encoder.*, decoder.*, "
                  "quantize.embedding.weight; e.g. maskgit-vqgan-imagenet-f16-256.bin)")

# Keys only the MaskGIT layout has (diffusers names these down_blocks / up_blocks).
_SIGNATURE = ("encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight",
              "quantize.embedding.weight")


def is_maskgit_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True when ``state`` is laid out like a MaskGIT-VQGAN tokenizer (not a diffusers VQModel)."""
    return all(key in state for key in _SIGNATURE)


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def maskgit_vqmodel_config(state: Mapping[str, Tensor], *, norm_num_groups: int = 32,
                           path: str | Path = "the tokenizer state dict") -> dict[str, Any]:
    """diffusers ``VQModel`` kwargs for a MaskGIT state dict, sizes read from its tensors.

    The full-size file gives block_out_channels (128, 128, 256, 256, 512), layers_per_block 2,
    latent/vq_embed_dim 256 and 1024 codes (docs/reference-model.md §8). GroupNorm groups are not visible in
    the weights; MaskGIT uses 32.
    """
    if not is_maskgit_state_dict(state) or "encoder.conv_in.weight" not in state:
        absent = [k for k in (*_SIGNATURE, "encoder.conv_in.weight") if k not in state]
        raise WeightsError(f"{path} is not {MASKGIT_FORMAT}: missing keys {', '.join(absent)}")
    levels = _count(state, "encoder.down.{}.block.0.conv1.weight")
    channels = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    codes, dim = state["quantize.embedding.weight"].shape
    out_key = "decoder.conv_out.weight"
    return dict(
        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
        out_channels=int(state[out_key].shape[0]) if out_key in state else 3,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=channels, layers_per_block=_count(state, "encoder.down.0.block.{}.conv1.weight"),
        latent_channels=int(dim), num_vq_embeddings=int(codes), vq_embed_dim=int(dim),
        norm_num_groups=int(norm_num_groups), sample_size=256)


def _resnet_shapes(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
              f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.norm2.weight": (cout,),
              f"{prefix}.norm2.bias": (cout,), f"{prefix}.conv2.weight": (cout, cout, 3, 3)}
    if cin != cout:
        shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)
    return shapes


def maskgit_source_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key and shape a MaskGIT state dict of ``config`` (VQModel kwargs) has, in file order.

    For the full-size config: the 168 keys and 54,515,587 elements of ``reference/tokenizer.txt``.
    """
    ch, blocks = list(config["block_out_channels"]), int(config["layers_per_block"])
    z, top, levels = int(config["latent_channels"]), ch[-1], len(ch)
    shapes: dict[str, tuple[int, ...]] = {"encoder.conv_in.weight": (ch[0], config["in_channels"], 3, 3)}
    for i in range(levels):
        for j in range(blocks):
            cin = (ch[i - 1] if i else ch[0]) if j == 0 else ch[i]
            shapes.update(_resnet_shapes(f"encoder.down.{i}.block.{j}", cin, ch[i]))
    for j in range(2):
        shapes.update(_resnet_shapes(f"encoder.mid.{j}", top, top))
    shapes.update({"encoder.norm_out.weight": (top,), "encoder.norm_out.bias": (top,),
                   "encoder.conv_out.weight": (z, top, 1, 1), "encoder.conv_out.bias": (z,),
                   "decoder.conv_in.weight": (top, z, 3, 3), "decoder.conv_in.bias": (top,)})
    for j in range(2):
        shapes.update(_resnet_shapes(f"decoder.mid.{j}", top, top))
    for i in range(levels):  # file order is up.0 .. up.4 (applied 4 .. 0)
        for j in range(blocks):
            cin = (ch[i + 1] if i + 1 < levels else top) if j == 0 else ch[i]
            shapes.update(_resnet_shapes(f"decoder.up.{i}.block.{j}", cin, ch[i]))
        if i > 0:
            shapes.update({f"decoder.up.{i}.upsample_conv.weight": (ch[i], ch[i], 3, 3),
                           f"decoder.up.{i}.upsample_conv.bias": (ch[i],)})
    shapes.update({"decoder.norm_out.weight": (ch[0],), "decoder.norm_out.bias": (ch[0],),
                   "decoder.conv_out.weight": (config["out_channels"], ch[0], 3, 3),
                   "decoder.conv_out.bias": (config["out_channels"],),
                   "quantize.embedding.weight": (config["num_vq_embeddings"], z)})
    return shapes


def _vqmodel_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    from diffusers import VQModel

    with torch.device("meta"):
        model = VQModel(**config)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_maskgit_state_dict(state: Mapping[str, Tensor], *, norm_num_groups: int = 32,
                               path: str | Path = "the tokenizer state dict"
                               ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(VQModel kwargs, VQModel state dict) equivalent to a MaskGIT state dict (docs/reference-model.md §8).

    The source is checked key by key first: a wrong, truncated or foreign file raises one
    :class:`WeightsError` line naming ``path`` and the offending keys. Tensors are float32;
    the shortcut folding is computed in float64.
    """
    config = maskgit_vqmodel_config(state, norm_num_groups=norm_num_groups, path=path)
    check_state_dict(state, maskgit_source_shapes(config), path, "a MaskGIT-VQGAN tokenizer", MASKGIT_FORMAT)
    src = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    out = {k: torch.zeros(shape) for k, shape in _vqmodel_shapes(config).items()}
    ch, blocks = list(config["block_out_channels"]), int(config["layers_per_block"])
    levels = len(ch)

    def copy(dst: str, key: str) -> None:
        out[dst] = src[key].clone()

    def resnet(dst: str, source: str) -> None:
        for name in ("norm1.weight", "norm1.bias", "conv1.weight", "norm2.weight", "norm2.bias"):
            copy(f"{dst}.{name}", f"{source}.{name}")
        conv2 = src[f"{source}.conv2.weight"]
        nin = src.get(f"{source}.nin_shortcut.weight")
        if nin is None:
            out[f"{dst}.conv2.weight"] = conv2.clone()
        else:  # h + W h = (I + W) h, and h = conv2(u) has no bias: fold W into conv2
            folded = conv2.double() + torch.einsum("om,mikl->oikl", nin[:, :, 0, 0].double(), conv2.double())
            out[f"{dst}.conv2.weight"] = folded.float()

    def identity_resnet(dst: str) -> None:  # conv2 = 0: the block returns its input
        out[f"{dst}.norm1.weight"].fill_(1.0)
        out[f"{dst}.norm2.weight"].fill_(1.0)

    def identity_1x1(dst: str) -> None:
        out[dst][:, :, 0, 0] = torch.eye(out[dst].shape[0])

    copy("encoder.conv_in.weight", "encoder.conv_in.weight")
    for i in range(levels):
        for j in range(blocks):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i + 1 < levels:  # avg_pool 2x2 s2 == this 3x3 s2 conv on the (0,1,0,1)-padded input
            weight = out[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"]
            weight[torch.arange(ch[i]), torch.arange(ch[i]), 0:2, 0:2] = 0.25
    for part in ("encoder", "decoder"):
        for j in range(2):
            resnet(f"{part}.mid_block.resnets.{j}", f"{part}.mid.{j}")
        out[f"{part}.mid_block.attentions.0.group_norm.weight"].fill_(1.0)  # to_out = 0: identity
        copy(f"{part}.conv_norm_out.weight", f"{part}.norm_out.weight")
        copy(f"{part}.conv_norm_out.bias", f"{part}.norm_out.bias")
    out["encoder.conv_out.weight"][:, :, 1, 1] = src["encoder.conv_out.weight"][:, :, 0, 0]
    copy("encoder.conv_out.bias", "encoder.conv_out.bias")
    identity_1x1("quant_conv.weight")
    identity_1x1("post_quant_conv.weight")
    copy("quantize.embedding.weight", "quantize.embedding.weight")
    for name in ("conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"):
        copy(f"decoder.{name}", f"decoder.{name}")
    for k in range(levels):  # diffusers up_blocks.k runs MaskGIT's up.(levels-1-k)
        source = f"decoder.up.{levels - 1 - k}"
        for j in range(blocks):
            resnet(f"decoder.up_blocks.{k}.resnets.{j}", f"{source}.block.{j}")
        identity_resnet(f"decoder.up_blocks.{k}.resnets.{blocks}")
        if k + 1 < levels:
            copy(f"decoder.up_blocks.{k}.upsamplers.0.conv.weight", f"{source}.upsample_conv.weight")
            copy(f"decoder.up_blocks.{k}.upsamplers.0.conv.bias", f"{source}.upsample_conv.bias")
    return config, out


def maskgit_vqmodel(state: Mapping[str, Tensor], *, path: str | Path = "the tokenizer state dict",
                    norm_num_groups: int = 32) -> nn.Module:
    """A diffusers ``VQModel`` holding the converted MaskGIT weights ``state`` (in eval mode)."""
    from diffusers import VQModel

    config, converted = convert_maskgit_state_dict(state, norm_num_groups=norm_num_groups, path=path)
    with torch.device("meta"):  # every tensor comes from the conversion: skip the random init
        model = VQModel(**config)
    load_state_dict_file(model, path, what="the converted VQModel", expected=MASKGIT_FORMAT, state=converted)
    return model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_maskgit_tokenizer(src: str | Path, out_dir: str | Path, *, norm_num_groups: int = 32) -> Path:
    """Convert the MaskGIT tokenizer file ``src`` into the diffusers ``VQModel`` directory ``out_dir``.

    The directory (``config.json``, ``diffusion_pytorch_model.safetensors`` and an
    ``onedc_import.json`` naming the source and its SHA-256) is written to a temporary sibling and
    renamed into place, so ``out_dir`` never holds half a model. An existing non-empty
    ``out_dir`` is refused rather than overwritten.
    """
    src, out_dir = Path(src).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OneDCError(f"output {out_dir} already exists and is not an empty folder: "
                         "remove it or give another -o DIR")
    model = maskgit_vqmodel(read_state_dict(src, expected=MASKGIT_FORMAT), path=src,
                            norm_num_groups=norm_num_groups)
    staging = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        staging.mkdir(parents=True)
        model.save_pretrained(str(staging), safe_serialization=True)
        provenance = {"source": src.name, "source_sha256": _sha256(src),
                      "conversion": "MaskGIT-VQGAN -> diffusers VQModel (docs/reference-model.md §8)"}
        (staging / "onedc_import.json").write_text(json.dumps(provenance, indent=1) + "\n")
        staging.rename(out_dir)
    except OSError as err:
        raise OneDCError(f"cannot write {out_dir} ({err.strerror or err})") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
