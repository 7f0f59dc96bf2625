"""The ``onedc`` console script: compress images to ``.onedc`` files and back.

::

    onedc compress photo.png shots/ -o out/ --ckpt runs/tiny-vq_tiny/distill/final.ckpt
    onedc decompress out/*.onedc -o decoded/ --ckpt runs/tiny-vq_tiny/distill/final.ckpt
    onedc info out/photo.onedc
    onedc import-reference --tokenizer maskgit-vqgan-imagenet-f16-256.bin -o models/maskgit-vqgan

Subcommands live in :data:`SUBCOMMANDS` (name -> registrar adding its parser), so new ones
(export, eval, ...) plug in without touching :func:`main`. torch, diffusers and the model
code are imported inside the commands: ``onedc --help`` and ``onedc info`` start fast.
Every :class:`~onedc.errors.OneDCError` is printed as one ``error: ...`` line on stderr and
turned into its class's exit code; outputs are written atomically (temp file + rename).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from onedc.errors import OneDCError
from onedc.progress import progress as _progress_bar
from onedc.progress import say as _say


def _about(path: Path, err: OneDCError) -> OneDCError:
    """The same error class with the file it concerns in front of the message."""
    return type(err)(f"{path}: {err}")


def _targets(sources: list[Path], out_dir: Path, suffix: str) -> list[Path]:
    """OUT_DIR/<stem><suffix> for each source, refusing two sources that would share one output."""
    seen: dict[Path, Path] = {}
    targets = []
    for src in sources:
        dst = out_dir / f"{src.stem}{suffix}"
        if dst in seen:
            raise OneDCError(f"inputs {seen[dst]} and {src} would both be written to {dst}: "
                             "rename one or compress them into different output folders")
        seen[dst] = src
        targets.append(dst)
    return targets


def _read_bytes(path: Path) -> bytes:
    """The bytes of a .onedc file; an unreadable path is a BitstreamError (callers add the path)."""
    from onedc.errors import BitstreamError

    try:
        return path.read_bytes()
    except OSError as err:
        raise BitstreamError(f"cannot read the file ({err.strerror or err})") from err


# --------------------------------------------------------------------------- compress
def _cmd_compress(args: argparse.Namespace) -> int:
    from onedc.coding.images import list_images, load_image
    from onedc.coding.bundle import OneDCCodec
    from onedc.io import atomic_write_bytes

    sources: list[Path] = []
    for item in map(Path, args.inputs):
        sources += list_images(item) if item.is_dir() else [item]
    targets = _targets(sources, Path(args.output), ".onedc")
    codec = OneDCCodec.from_checkpoint(args.ckpt, device=args.device)
    for src, dst in _progress_bar(list(zip(sources, targets)), "compress"):
        image = load_image(src)  # ImageReadError already names the file
        data = codec.compress_z_only(image) if args.z_only else codec.compress_image(image)
        atomic_write_bytes(dst, data)
        height, width = image.shape[-2:]
        size = os.path.getsize(dst)
        _say(f"{src} -> {dst}: {height}x{width}, {size} bytes, {size * 8 / (height * width):.5f} bpp")
    return 0


def _register_compress(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compress", help="images -> .onedc files",
        description="Compress images (files, or folders searched recursively) into OUT_DIR/<stem>.onedc.")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of images")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the .onedc files")
    parser.add_argument("--ckpt", required=True, help="model checkpoint (.ckpt from train.py)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--z-only", action="store_true",
                        help="write z-only files: only z is sent (fixed bits per 64x64 block), the decoder takes y "
                             "to be the hyperprior's means (the published model's extreme-rate mode)")
    parser.set_defaults(func=_cmd_compress)


# --------------------------------------------------------------------------- decompress
def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return value


def _onedc_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(item.rglob("*.onedc"))
            if not found:
                raise OneDCError(f"folder {item} holds no .onedc files")
            files += found
        else:
            files.append(item)
    return files


def _cmd_decompress(args: argparse.Namespace) -> int:
    from onedc.coding.images import save_image
    from onedc.coding.bundle import OneDCCodec

    sources = _onedc_files(args.inputs)
    targets = _targets(sources, Path(args.output), ".png")
    codec = OneDCCodec.from_checkpoint(args.ckpt, device=args.device)
    codec.check_steps(args.steps, setting=f"--steps {args.steps}", source=args.ckpt)
    for src, dst in _progress_bar(list(zip(sources, targets)), "decompress"):
        try:
            decoded = codec.decompress_bytes(_read_bytes(src), steps=args.steps)
        except OneDCError as err:
            raise _about(src, err) from err
        save_image(decoded.image, dst)
        _say(f"{src} -> {dst}: {decoded.header.height}x{decoded.header.width}")
    return 0


def _register_decompress(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "decompress", help=".onedc files -> PNG images",
        description="Decompress .onedc files (or folders of them) into OUT_DIR/<stem>.png.")
    parser.add_argument("inputs", nargs="+", metavar="FILE", help=".onedc files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the PNG images")
    parser.add_argument("--ckpt", required=True, help="the checkpoint the files were written with")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--steps", type=_positive_int, default=1, metavar="N",
                        help="generator steps: 1 = the one-step decoder (default); N > 1 = the multi-step DDIM "
                             "baseline (N UNet calls; needs a latent/finetune checkpoint)")
    parser.set_defaults(func=_cmd_decompress)


# --------------------------------------------------------------------------- info
def _cmd_info(args: argparse.Namespace) -> int:
    from onedc.coding.bitstream import decode_container

    for index, src in enumerate(map(Path, args.inputs)):
        try:
            header = decode_container(_read_bytes(src))
        except OneDCError as err:
            raise _about(src, err) from err
        if index:
            print()
        print(f"file: {src}")
        for key, value in header.describe().items():
            print(f"{key}: {value}")
    return 0


def _register_info(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "info", help="print the header fields of .onedc files",
        description="Verify .onedc files (magic, version, CRCs) and print their header fields, one per line. "
                    "Needs no checkpoint.")
    parser.add_argument("inputs", nargs="+", metavar="FILE", help=".onedc files")
    parser.set_defaults(func=_cmd_info)


# --------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace) -> int:
    from onedc.coding.export import export_inference_weights

    out = export_inference_weights(args.ckpt, args.output)
    src_size, out_size = _path_size(Path(args.ckpt)), os.path.getsize(out)
    _say(f"{args.ckpt} -> {out}: {out_size / 1e6:.2f} MB (checkpoint {src_size / 1e6:.2f} MB)")
    return 0


def _path_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _register_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="stage checkpoint -> inference weights (.safetensors)",
        description="Write the inference weights (VAE, codec with its coding tables, generator) of a stage "
                    "checkpoint to one .safetensors file: no teacher, discriminator or optimiser state. "
                    "compress/decompress/eval accept it as --ckpt.")
    parser.add_argument("ckpt", help="stage checkpoint (.ckpt or DeepSpeed folder)")
    parser.add_argument("-o", "--output", required=True, help="output .safetensors file")
    parser.set_defaults(func=_cmd_export)


# --------------------------------------------------------------------------- eval
def _expand_ckpts(items: Sequence[str]) -> list[str]:
    """Checkpoint arguments with glob patterns (``runs/*/finetune/final.ckpt``) expanded, sorted."""
    import glob

    out: list[str] = []
    for item in items:
        if not Path(item).exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise OneDCError(f"--ckpt {item}: the pattern matches no file")
            out += matches
        else:
            out.append(item)
    return out


def _curve_names(groups: list[list[str]]) -> list[str]:
    """One RD-curve name per ``--ckpt`` group: ``onedc`` for one group; else each group's common folder
    name (when they differ), else ``onedc-1``, ``onedc-2``, ..."""
    if len(groups) <= 1:
        return ["onedc"] * len(groups)
    names = []
    for group in groups:
        parents = {Path(os.path.commonpath([str(Path(p).resolve().parent) for p in group])).name}
        names.append(parents.pop() or "")
    if len(set(names)) == len(names) and all(names):
        return names
    return [f"onedc-{i + 1}" for i in range(len(groups))]


def _cmd_eval(args: argparse.Namespace) -> int:
    from onedc.eval import Recon, evaluate

    groups = [list(group) for group in (args.ckpt or [])]
    if args.data is None:  # `--ckpt A B DATA_DIR`: a greedy list (--ckpt, or --bits) took DATA_DIR as its last item
        if args.bits and len(args.bits) == len(args.recon or []) + 1:
            args.data = args.bits.pop()
        elif groups and len(groups[-1]) >= 2:
            args.data = groups[-1].pop()
        else:
            raise OneDCError("give the image folder: onedc eval --ckpt CKPT [CKPT ...] DATA_DIR -o OUT_DIR")
    groups = [_expand_ckpts(group) for group in groups]
    names = _curve_names(groups)
    ckpts = [c for group in groups for c in group]
    curves = [name for name, group in zip(names, groups) for _ in group]
    recon: list[Recon] = []
    if args.recon or args.bits:
        if len(args.recon or []) != len(args.bits or []):
            raise OneDCError(f"give one --bits per --recon (got {len(args.recon or [])} --recon, "
                             f"{len(args.bits or [])} --bits)")
        for folder, bits in zip(args.recon, args.bits):
            if not Path(folder).is_dir():
                raise OneDCError(f"--recon {folder}: not a folder of reconstructions")
            if not Path(bits).exists():
                raise OneDCError(f"--bits {bits}: no such folder or CSV file")
            recon.append(Recon(Path(folder), Path(bits)))
    anchors = [a.strip() for a in args.anchors.split(",") if a.strip()]
    result = evaluate(ckpts, args.data, args.output, weights_dir=args.weights_dir, baselines=args.baselines,
                      anchors=anchors, max_images=args.max_images, steps=args.steps, device=args.device,
                      curves=curves, recon=recon, recon_name=args.name, bd_method=args.bd_method,
                      z_only=args.z_only)
    for entry in result.aggregate:
        values = ", ".join(f"{key} {entry[key]:.4f}" for key in ("bpp", "psnr", "ms_ssim", "lpips", "dists", "fid")
                           if entry.get(key) is not None)
        _say(f"{entry['codec']:<6} {entry['setting']:<24} {values}")
    _say(result.bd_text)
    _say(f"wrote {', '.join(str(p) for p in result.paths.values())}")
    return 0


def _register_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="rate-distortion evaluation against JPEG/WebP/AVIF/JPEG-XL (CSV, JSON, BD-rate, RD plot)",
        description="Compress every image of DATA_DIR to real .onedc files with each checkpoint (a lambda ladder), "
                    "decompress, and report bpp (from the file sizes), PSNR, MS-SSIM, and LPIPS/DISTS/FID/KID "
                    "when their backbone weights are local; JPEG, WebP, AVIF and JPEG-XL at matched bpp and on a "
                    "quality ladder; BD-rate and BD-metric of every metric against each anchor and between runs. "
                    "--ckpt may be repeated: each group is one RD curve. --recon/--bits score another codec's "
                    "reconstructions and file sizes the same way. Writes OUT_DIR/per_image.csv, per_image.json, "
                    "aggregate.json, bd.json, compressai/<curve>.json, rd.png and files/.")
    parser.add_argument("--ckpt", action="append", nargs="+", metavar="CKPT",
                        help="checkpoints of one RD curve (globs allowed); repeat --ckpt for more curves")
    parser.add_argument("data", metavar="DATA_DIR", nargs="?",
                        help="folder of images (searched recursively) or an image; may follow the checkpoints")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the results")
    parser.add_argument("--recon", nargs="+", default=None, metavar="DIR",
                        help="another codec's reconstructions, one folder per rate point (files named as the "
                             "originals, any image format)")
    parser.add_argument("--bits", nargs="+", default=None, metavar="DIR_OR_CSV",
                        help="per --recon: a folder of that codec's files (sizes = rate), or a CSV with columns "
                             "image and bytes|bits|bpp")
    parser.add_argument("--name", default="other", help="curve name of the --recon codec (default: other)")
    parser.add_argument("--weights-dir", default=None, metavar="DIR",
                        help="folder of perceptual backbone weights (default: $ONEDC_WEIGHTS, else torch hub's cache)")
    parser.add_argument("--anchors", default="jpeg,webp,avif,jxl", metavar="LIST",
                        help="comma-separated anchors (default: jpeg,webp,avif,jxl; one not installed is skipped "
                             "with a note)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip all anchors")
    parser.add_argument("--z-only", action="store_true",
                        help="also code every checkpoint as z-only files (y = the prior means): one more point "
                             "per checkpoint, at the lowest rate, on its curve")
    parser.add_argument("--bd-method", default="akima", choices=("akima", "pchip"),
                        help="interpolation of the BD fits (bjontegaard package; default: akima)")
    parser.add_argument("--max-images", type=_positive_int, default=None, metavar="N", help="first N images only")
    parser.add_argument("--steps", type=_positive_int, default=1, metavar="N",
                        help="generator decoding steps (N > 1: multi-step baseline; needs a generator)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(func=_cmd_eval)


# --------------------------------------------------------------------------- sweep
def _cmd_sweep(args: argparse.Namespace) -> int:
    """Train one run per λ (``train.py stage=... stage.lmbda=λ``), then evaluate their final checkpoints as one curve.

    Nothing of the curriculum can be shared between λ values: λ is the rate weight of stage 1
    (distill), and every later stage starts from that stage's codec; the one shared piece is the
    tiny preset's quick-trained VAE, which is cached by its config. A finished run is skipped
    (``resume=auto``), so a sweep that was stopped continues where it stopped.
    """
    from onedc.eval import evaluate
    from onedc.training.config import compose
    from onedc.training.pipeline import run

    root = Path(args.output)
    ckpts: list[str] = []
    for lmbda in args.lambdas:
        key = "stage.distill.lmbda" if args.stage == "all" else "stage.lmbda"
        cfg = compose([f"stage={args.stage}", f"run_dir={root / f'lmbda_{lmbda:g}'}", f"{key}={lmbda}",
                       *args.overrides])
        results = run(cfg)
        ckpts.append(str(results[-1].final_ckpt))
        _say(f"lambda {lmbda:g}: {results[-1].final_ckpt}")
    if args.data is None:
        from onedc.samples import sample_photo_paths

        data: object = list(sample_photo_paths().values())
    else:
        data = args.data
    result = evaluate(ckpts, data, root / "eval", curves=[f"sweep:{root.name}"] * len(ckpts),
                      max_images=args.max_images, baselines=args.baselines, z_only=args.z_only)
    _say(result.bd_text)
    _say(f"wrote {', '.join(str(p) for p in result.paths.values())}")
    return 0


def _register_sweep(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sweep", help="train a lambda ladder and evaluate it as one RD curve",
        description="For each --lambdas value, train the curriculum (train.py stage=STAGE with the rate weight "
                    "lambda, run dir OUT/lmbda_VALUE, any further KEY=VALUE overrides of train.py), then run "
                    "onedc eval on the final checkpoints as one curve (OUT/eval). Finished runs are skipped.")
    parser.add_argument("--lambdas", required=True, nargs="+", type=float, metavar="L", help="rate weights")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder of the runs and the evaluation")
    parser.add_argument("--stage", default="all", choices=("all", "distill", "latent", "finetune"),
                        help="stage to train per lambda (default: all, the chain)")
    parser.add_argument("--data", default=None, metavar="DIR", help="evaluation images (default: the sample photos)")
    parser.add_argument("--max-images", type=_positive_int, default=None, metavar="N", help="evaluate N images only")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false", help="evaluate without anchors")
    parser.add_argument("--z-only", action="store_true", help="add each checkpoint's z-only point")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train.py overrides (e.g. model=tiny)")
    parser.set_defaults(func=_cmd_sweep)


# --------------------------------------------------------------------------- import-reference
def _cmd_import_reference(args: argparse.Namespace) -> int:
    """Dispatch on the mode: ``--tokenizer FILE`` (teacher) or ``CHECKPOINT_DIR`` (codec checkpoint)."""
    if args.tokenizer is not None:
        if args.checkpoint is not None or args.vae is not None:
            raise OneDCError("import-reference converts one thing at a time: give either --tokenizer FILE "
                             "or CHECKPOINT_DIR --vae VAE_DIR, not both")
        return _import_reference_tokenizer(args)
    if args.checkpoint is not None:
        return _import_reference_checkpoint(args)
    raise OneDCError("nothing to import: give --tokenizer FILE (MaskGIT-VQGAN .bin) or CHECKPOINT_DIR --vae VAE_DIR")


def _import_reference_tokenizer(args: argparse.Namespace) -> int:
    from onedc.modules.maskgit import import_maskgit_tokenizer

    out = import_maskgit_tokenizer(args.tokenizer, args.output)
    _say(f"{args.tokenizer} -> {out}: diffusers VQModel; use tokenizer=maskgit_vqgan tokenizer.pretrained={out}")
    return 0


def _import_reference_checkpoint(args: argparse.Namespace) -> int:
    """CHECKPOINT_DIR --vae VAE_DIR -o OUT.ckpt: the released codec + generator + an SD-2.1 VAE."""
    if args.vae is None:
        raise OneDCError(f"import-reference {args.checkpoint} needs the VAE the checkpoint was trained with: "
                         "add --vae DIR (a diffusers SD-2.1 VAE dir, e.g. stable-diffusion-2-1/vae)")
    from onedc.training.config import compose, to_dict
    from onedc.families.reference.released import import_reference

    model = to_dict(compose([f"model={args.model}"]).model)
    out = import_reference(args.checkpoint, args.vae, args.output, model_config=model, merge_lora=args.merge_lora)
    _say(f"{args.checkpoint} + {args.vae} -> {out}: an onedc checkpoint of model={args.model}; use it with "
         f"onedc compress/decompress/eval/export --ckpt {out}, or train.py model={args.model} init_from={out}")
    return 0


def _register_import_reference(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "import-reference", help="convert the authors' released weights into onedc's formats",
        description="--tokenizer FILE -o DIR: convert the MaskGIT-VQGAN tokenizer file (a plain state dict, "
                    "e.g. maskgit-vqgan-imagenet-f16-256.bin) into a diffusers VQModel directory for "
                    "tokenizer=maskgit_vqgan tokenizer.pretrained=DIR. CHECKPOINT_DIR --vae VAE_DIR -o OUT.ckpt: "
                    "the authors' released model (model.safetensors + model_1.safetensors) plus the SD-2.1 VAE "
                    "into an onedc checkpoint. Outputs are written atomically.")
    parser.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT_DIR",
                        help="released codec checkpoint folder (model.safetensors + model_1.safetensors)")
    parser.add_argument("--vae", default=None, metavar="VAE_DIR", help="VAE directory (with CHECKPOINT_DIR)")
    parser.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="MaskGIT-VQGAN state-dict file (.bin/.pt/.safetensors) to convert")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output: a directory for --tokenizer, a .ckpt file for CHECKPOINT_DIR")
    parser.add_argument("--model", default="onedc_sd15",
                        help="model preset of the released checkpoint (default: onedc_sd15, the published OneDC)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge the LoRA into the UNet weights (exact); default: keep it unmerged as released")
    parser.set_defaults(func=_cmd_import_reference)


# --------------------------------------------------------------------------- entry point
# name -> registrar(subparsers), in the order `onedc --help` lists them.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "compress": _register_compress,
    "decompress": _register_decompress,
    "info": _register_info,
    "eval": _register_eval,
    "sweep": _register_sweep,
    "export": _register_export,
    "import-reference": _register_import_reference,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``onedc`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="onedc", description="OneDC one-step diffusion image codec: real .onedc files.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS.values():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``onedc`` command line ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Usage errors exit through argparse (code 2); a :class:`~onedc.errors.OneDCError` prints
    ``error: <message>`` as a single line on stderr and returns the error's ``exit_code``.
    """
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        return int(args.func(args) or 0)
    except OneDCError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
