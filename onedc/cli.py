"""The ``onedc`` console script: compress images to ``.onedc`` files and back.

::

    onedc compress photo.png shots/ -o out/ --ckpt runs/tiny-vq_tiny/distill/final.ckpt
    onedc decompress out/*.onedc -o decoded/ --ckpt runs/tiny-vq_tiny/distill/final.ckpt
    onedc info out/photo.onedc
    onedc import-reference --tokenizer maskgit-vqgan-imagenet-f16-256.bin -o models/maskgit-vqgan
    onedc import-reference --guidance model_2.safetensors -o models/guidance.safetensors

Subcommands live in :data:`SUBCOMMANDS` (name -> registrar adding its parser), so new ones
(export, eval, ...) plug in without touching :func:`main`. torch, diffusers and the model
code are imported inside the commands: ``onedc --help`` and ``onedc info`` start fast.
Every :class:`~onedc.errors.OneDCError` is printed as one ``error: ...`` line on stderr and
turned into its class's exit code; outputs are written atomically (temp file + rename).

Rules for real photo folders (issue 24), shared by the commands that write:

* **nothing is overwritten unasked**: an existing output needs ``--force``; an input (or the
  checkpoint, or an image beside the ``.onedc`` file being decoded) is never replaced;
* **checks first**: the checkpoint's existence, ``-o`` (a folder this process can create files in)
  and every output path are checked before the model loads, then every input's header
  (``--max-pixels``, corrupt ``.onedc`` containers, unreadable images);
* **batches**: every input is attempted; a failed one gets one ``error:`` line, a summary closes
  the run and the exit code is 2 if any failed; ``--fail-fast`` stops at the first failure;
* **layout**: outputs mirror the inputs' tree below the deepest folder common to all arguments
  (a folder argument counts as itself), so two files never share an output;
* stale temp files of a killed run are removed from the output folders, and two import-time
  messages of third-party libraries that do not concern the user are silenced
  (:func:`_quiet_third_party`), so stdout carries results only.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from onedc.errors import OneDCError
from onedc.progress import progress as _progress_bar
from onedc.progress import say as _say


def _about(path: Path, err: OneDCError) -> OneDCError:
    """The same error class with the file it concerns in front of the message (once)."""
    return err if str(err).startswith(f"{path}") or f" {path}" in str(err) else type(err)(f"{path}: {err}")


def _error(err: OneDCError) -> None:
    """Print ``err`` as the one ``error: ...`` line on stderr (whitespace folded)."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    """A one-line remark on stderr (what a listing skipped): stdout carries results only."""
    print(f"note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- inputs and outputs
def _find_inputs(inputs: Sequence[str], suffixes: frozenset[str], kind: str) -> list[tuple[Path, Path | None]]:
    """(file, the folder its output path is relative to) for every input; folders searched recursively.

    Files and folders are placed relative to the deepest folder common to all arguments (a folder
    argument counts as itself: :func:`_layout_root`). What an image folder listing skipped (other
    formats, hidden files) is said in one note per folder. Pure pathlib: no heavy import.
    """
    from onedc.coding.folders import scan_folder

    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            what = "an image format onedc lists" if kind == "image" else f"a {kind}"
            listing = scan_folder(item, suffixes, kind=what)
            if not listing.files:
                raise OneDCError(f"folder {item} holds no {kind}s (looked recursively for "
                                 f"{', '.join(sorted(suffixes))}): pass another folder")
            if listing.skipped and kind == "image":  # beside .onedc files, other files are expected
                _note(f"{item}: skipped {listing.describe_skipped()}")
            found += listing.files
        else:
            found.append(item)
    root = _layout_root(list(map(Path, inputs)))
    seen: set[str] = set()
    unique = []
    for path in found:  # a file named twice (itself and inside a folder argument) is coded once
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, root))
    return unique


def _layout_root(inputs: list[Path]) -> Path | None:
    """The deepest folder holding every argument (a folder argument counts as itself), or None."""
    anchors = [os.path.abspath(p if p.is_dir() else p.parent) for p in inputs]
    try:
        return Path(os.path.commonpath(anchors))
    except ValueError:  # different drives: no common folder, outputs go flat
        return None


def _targets(sources: list[tuple[Path, Path | None]], out_dir: Path, suffix: str) -> list[Path]:
    """OUT_DIR/<path relative to the layout root>/<stem><suffix> for each source: the tree mirrored.

    Two files of one folder that share a stem (photo.jpg, photo.png) keep their whole name
    (photo.jpg<suffix>), so distinct inputs get distinct outputs; the last check only guards
    names built to collide with that rule (photo.png.jpg beside photo.png and photo.jpg).
    """
    stems: dict[tuple[str, str], int] = {}
    for src, _ in sources:
        key = (os.path.dirname(os.path.abspath(src)), src.stem)
        stems[key] = stems.get(key, 0) + 1
    seen: dict[Path, Path] = {}
    targets = []
    for src, root in sources:
        folder = Path(os.path.dirname(os.path.abspath(src)))
        rel = Path(os.path.relpath(folder, root)) if root is not None else Path(".")
        name = src.name if stems[(str(folder), src.stem)] > 1 else src.stem
        dst = out_dir / rel / f"{name}{suffix}"
        if dst in seen:
            raise OneDCError(f"inputs {seen[dst]} and {src} would both be written to {dst}: "
                             "rename one or code them into different output folders")
        seen[dst] = src
        targets.append(dst)
    return targets


def _check_checkpoint(ckpt: str, what: str = "checkpoint") -> None:
    """A missing checkpoint is reported before anything else is done (listing, probing, loading)."""
    from onedc.errors import CheckpointError

    if not Path(ckpt).exists():
        advice = ("Give an existing .ckpt file, exported .safetensors file or DeepSpeed folder (--ckpt)"
                  if what == "checkpoint" else "Check the path")
        raise CheckpointError(f"{what} not found: {ckpt}. {advice}")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_outputs(pairs: list[tuple[Path, Path]], force: bool, out_dir: Path | None = None,
                   protected: Sequence[Path] = (), beside_source_is_original: bool = False,
                   folders_ok: bool = False) -> None:
    """Refuse a run that would lose a file, before the model loads: one line saying what and how to proceed.

    * ``out_dir`` (``-o``) must be a folder this process can create files in (probed with a temp
      file, which is removed);
    * no output may be an input (a source in ``pairs`` or a ``protected`` path such as the
      checkpoint), whatever ``--force`` says;
    * with ``beside_source_is_original`` (decompress), an existing output in its source's own
      folder is the image the file was most likely coded from: refused even with ``--force``;
    * an existing output is replaced only with ``--force`` (with ``folders_ok``, an output may be
      a folder that the command fills, such as eval's ``files/``).
    """
    from onedc.io import TEMP_NAME, remove_stale_temp_files

    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise OneDCError(f"-o {out_dir} is a file, not a folder: give a folder for the outputs")
    inputs = {key: src for src in [s for s, _ in pairs] + list(protected) if (key := _identity(src)) is not None}
    existing = []
    for src, dst in pairs:
        for parent in dst.parents:
            if parent.exists() and not parent.is_dir():
                raise OneDCError(f"cannot write {dst}: {parent} is a file, not a folder")
            if out_dir is not None and parent == out_dir:
                break
        key = _identity(dst)
        if key is None:
            continue
        if dst.is_dir() and not folders_ok:
            raise OneDCError(f"output {dst} is a folder: remove it or choose another -o")
        if key in inputs:
            raise OneDCError(f"output {dst} is the input {inputs[key]}: onedc never overwrites its inputs, "
                             "not even with --force; choose another -o")
        if beside_source_is_original and _identity(dst.parent) == _identity(src.parent):
            raise OneDCError(f"output {dst} lies beside {src} and is probably the image it was coded from: "
                             "onedc does not replace it, not even with --force; decompress into another folder (-o)")
        existing.append(dst)
    if existing and not force:
        more = f" (and {len(existing) - 1} more output(s))" if len(existing) > 1 else ""
        raise OneDCError(f"{existing[0]} already exists{more}: pass --force to replace "
                         f"{'them' if more else 'it'}")
    folders = {out_dir} if out_dir is not None else set()
    folders |= {dst.parent for _, dst in pairs}
    probe_dir = out_dir if out_dir is not None else next(iter(folders))
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        probe = probe_dir / f".onedc-probe.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        assert TEMP_NAME.match(probe.name)  # a killed probe is cleaned like any temp file
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OneDCError(f"cannot create files in the output folder {probe_dir} ({err.strerror or err}): "
                         "choose a folder you can write to (-o)") from err
    for folder in folders:
        remove_stale_temp_files(folder)  # debris of a killed earlier run into the same folder


class _Batch:
    """Every input attempted: one ``error:`` line per failed file, a closing summary, the exit code.

    ``fail_fast`` restores stop-at-first: the first failure is raised (one line, exit 2).
    """

    def __init__(self, verb: str, total: int, fail_fast: bool, summary_on_success: bool = True) -> None:
        self.verb, self.total, self.fail_fast = verb, total, fail_fast
        self.summary_on_success = summary_on_success
        self.done: list[Path] = []
        self.failed: list[Path] = []

    def fail(self, src: Path, err: OneDCError) -> None:
        """Record that ``src`` failed with ``err``: raise it under --fail-fast, else print its line."""
        err = _about(src, err)
        if self.fail_fast:
            raise err
        _error(err)
        self.failed.append(src)

    def finish(self) -> int:
        """Print the summary and return the exit code: 2 if any input failed, else 0.

        The summary closes a run of more than one input (on stderr when some failed, naming them;
        else on stdout); a single input's own line (result or ``error:``) says it all.
        """
        if self.failed and self.total > 1:
            names = ", ".join(map(str, self.failed))
            print(f"{self.verb}: {len(self.done)} of {self.total} done, {len(self.failed)} failed: {names}",
                  file=sys.stderr)
        elif self.total > 1 and self.summary_on_success:
            _say(f"{self.verb}: {len(self.done)} of {self.total} done")
        return 2 if self.failed else 0


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return value


def _add_batch_options(parser: argparse.ArgumentParser, limit: bool = True) -> None:
    """--force, --fail-fast and (for the commands that decode pixels) --max-pixels."""
    from onedc.coding.bitstream import DEFAULT_MAX_PIXELS  # pure Python: --help stays fast

    parser.add_argument("--force", action="store_true",
                        help="replace existing outputs (inputs are never replaced)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop at the first file that fails (default: code every input, then report)")
    if limit:
        parser.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                            help=f"refuse images larger than N pixels (height x width), from the header, before "
                                 f"anything is allocated (default: {DEFAULT_MAX_PIXELS:,}, 8192 x 6144)")


def _read_bytes(path: Path) -> bytes:
    """The bytes of a .onedc file; an unreadable path is a BitstreamError (callers add the path)."""
    from onedc.errors import BitstreamError

    try:
        return path.read_bytes()
    except OSError as err:
        raise BitstreamError(f"cannot read the file ({err.strerror or err})") from err


# --------------------------------------------------------------------------- compress
def _cmd_compress(args: argparse.Namespace) -> int:
    from onedc.coding.images import IMAGE_SUFFIXES, check_image_header

    _check_checkpoint(args.ckpt)
    sources = _find_inputs(args.inputs, IMAGE_SUFFIXES, "image")
    out_dir = Path(args.output)
    targets = _targets(sources, out_dir, ".onedc")
    sources = [src for src, _ in sources]
    _check_outputs(list(zip(sources, targets)), args.force, out_dir, protected=[Path(args.ckpt)])
    batch = _Batch("compress", len(sources), args.fail_fast)
    pending = []
    for src, dst in zip(sources, targets):  # headers only: bad or too large files fail before the model loads
        try:
            check_image_header(src, args.max_pixels)
        except OneDCError as err:
            batch.fail(src, err)
            continue
        pending.append((src, dst))
    if pending:
        _compress_files(args, pending, batch)
    return batch.finish()


def _compress_files(args: argparse.Namespace, pending: list[tuple[Path, Path]], batch: _Batch) -> None:
    from onedc.coding.bundle import OneDCCodec
    from onedc.coding.images import load_image
    from onedc.io import atomic_write_bytes

    codec = OneDCCodec.from_checkpoint(args.ckpt, device=args.device)
    for src, dst in _progress_bar(pending, "compress"):
        try:
            image = load_image(src, max_pixels=args.max_pixels)  # ImageReadError already names the file
            data = codec.compress_z_only(image) if args.z_only else codec.compress_image(image)
            atomic_write_bytes(dst, data)
        except OneDCError as err:
            batch.fail(src, err)
            continue
        height, width = image.shape[-2:]
        size = len(data)
        batch.done.append(src)
        _say(f"{src} -> {dst}: {height}x{width}, {size} bytes, {size * 8 / (height * width):.5f} bpp")


def _register_compress(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compress", help="images -> .onedc files",
        description="Compress images (files, or folders searched recursively) into .onedc files under OUT_DIR, "
                    "keeping the inputs' folder layout. Every input is attempted; failures are listed at the end "
                    "and make the exit code non-zero. Existing outputs are replaced only with --force.")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of images")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the .onedc files")
    parser.add_argument("--ckpt", required=True, help="model checkpoint (.ckpt from train.py)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    _add_batch_options(parser)
    parser.add_argument("--z-only", action="store_true",
                        help="write z-only files: only z is sent (fixed bits per 64x64 block), the decoder takes y "
                             "to be the hyperprior's means (the published model's extreme-rate mode)")
    parser.set_defaults(func=_cmd_compress)


# --------------------------------------------------------------------------- decompress
ONEDC_SUFFIXES = frozenset({".onedc"})


def _cmd_decompress(args: argparse.Namespace) -> int:
    from onedc.coding.bitstream import check_pixel_limit, decode_container

    _check_checkpoint(args.ckpt)
    sources = _find_inputs(args.inputs, ONEDC_SUFFIXES, ".onedc file")
    out_dir = Path(args.output)
    targets = _targets(sources, out_dir, ".png")
    sources = [src for src, _ in sources]
    _check_outputs(list(zip(sources, targets)), args.force, out_dir, protected=[Path(args.ckpt)],
                   beside_source_is_original=True)
    batch = _Batch("decompress", len(sources), args.fail_fast)
    pending = []
    for src, dst in zip(sources, targets):
        # The container alone (pure Python, no model): damaged files and sizes above the limit fail
        # here, from the header, before the model loads and before anything is allocated.
        try:
            check_pixel_limit(decode_container(_read_bytes(src)), args.max_pixels)
        except OneDCError as err:
            batch.fail(src, err)
            continue
        pending.append((src, dst))
    if pending:
        _decompress_files(args, pending, batch)
    return batch.finish()


def _decompress_files(args: argparse.Namespace, pending: list[tuple[Path, Path]], batch: _Batch) -> None:
    from onedc.coding.bundle import OneDCCodec
    from onedc.coding.images import save_image

    import time

    from onedc.coding.decode_options import DecodeOptions

    options = DecodeOptions(precision=args.precision, compile=args.compile, tile_size=args.tile_size,
                            max_memory_gb=args.max_memory, batch=args.batch)
    codec = OneDCCodec.from_checkpoint(args.ckpt, device=args.device, decode_options=options)
    codec.check_steps(args.steps, setting=f"--steps {args.steps}", source=args.ckpt)
    start, pixels = time.perf_counter(), 0
    # groups of up to --batch files: decompress_many batches the same-size ones within the memory bound;
    # a group with a failing file is decoded again file by file, so each failure is reported on its own
    for chunk in _progress_bar([pending[i:i + args.batch] for i in range(0, len(pending), args.batch)],
                               "decompress"):
        try:
            results = list(zip(chunk, codec.decompress_many([_read_bytes(src) for src, _ in chunk], steps=args.steps,
                                                            max_pixels=args.max_pixels)))
        except OneDCError:
            results = []
            for src, dst in chunk:
                try:
                    results.append(((src, dst), codec.decompress_bytes(_read_bytes(src), steps=args.steps,
                                                                       max_pixels=args.max_pixels)))
                except OneDCError as err:
                    batch.fail(src, err)
        for (src, dst), decoded in results:
            try:
                save_image(decoded.image, dst)
            except OneDCError as err:
                batch.fail(src, err)
                continue
            batch.done.append(src)
            pixels += decoded.header.height * decoded.header.width
            _say(f"{src} -> {dst}: {decoded.header.height}x{decoded.header.width}")
    seconds = time.perf_counter() - start
    if batch.done:
        _say(f"decoded {len(batch.done)} file(s), {pixels / 1e6:.2f} MP in {seconds:.1f} s: "
             f"{len(batch.done) / seconds:.3f} images/s, {pixels / 1e6 / seconds:.3f} MP/s "
             f"({codec.decode_report.get('dtype')}, batch <= {args.batch})")


def _gib(text: str) -> float:
    """argparse type: a memory size in GiB, > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a size in GiB > 0, got '{text}'")
    return value


def _register_decompress(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "decompress", help=".onedc files -> PNG images",
        description="Decompress .onedc files (or folders of them, searched recursively) into PNG images under "
                    "OUT_DIR, keeping the inputs' folder layout. Every input is attempted; failures are listed "
                    "at the end and make the exit code non-zero. Existing outputs are replaced only with --force.")
    parser.add_argument("inputs", nargs="+", metavar="FILE", help=".onedc files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the PNG images")
    parser.add_argument("--ckpt", required=True, help="the checkpoint the files were written with")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--steps", type=_positive_int, default=1, metavar="N",
                        help="generator steps: 1 = the one-step decoder (default); N > 1 = the multi-step DDIM "
                             "baseline (N UNet calls; needs a latent/finetune checkpoint)")
    _add_batch_options(parser)
    # speed settings (onedc.coding.decode_options): none changes the decoded ŷ, only the picture's rounding
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="UNet and VAE decoder precision: auto = bf16 on CPUs with native bf16 (AVX-512-BF16/AMX) "
                             "and bf16 GPUs, else fp32 (default: auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (slow start)")
    parser.add_argument("--tile-size", type=_positive_int, default=None, metavar="PX",
                        help="decode the VAE in overlapping tiles of PX pixels (multiple of 128; default: from --max-memory)")
    parser.add_argument("--max-memory", type=_gib, default=4.0, metavar="GIB",
                        help="bound on the VAE decoder's activations: larger images are tiled, batches sized to it "
                             "(default: 4)")
    parser.add_argument("--batch", type=_positive_int, default=8, metavar="N",
                        help="most same-size files decoded together (default: 8, fewer when --max-memory says so)")
    parser.set_defaults(func=_cmd_decompress)


# --------------------------------------------------------------------------- info
def _cmd_info(args: argparse.Namespace) -> int:
    from onedc.coding.bitstream import decode_container

    sources = [src for src, _ in _find_inputs(args.inputs, ONEDC_SUFFIXES, ".onedc file")]
    # stdout is "key: value" lines: a success summary there would read as one more field
    batch = _Batch("info", len(sources), args.fail_fast, summary_on_success=False)
    for src in sources:
        try:
            header = decode_container(_read_bytes(src))
        except OneDCError as err:
            batch.fail(src, err)
            continue
        if batch.done:
            print()
        batch.done.append(src)
        print(f"file: {src}")
        for key, value in header.describe().items():
            print(f"{key}: {value}")
    return batch.finish()


def _register_info(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "info", help="print the header fields of .onedc files",
        description="Verify .onedc files (magic, version, CRCs) and print their header fields, one per line. "
                    "Takes files and folders (searched recursively). Needs no checkpoint.")
    parser.add_argument("inputs", nargs="+", metavar="FILE", help=".onedc files or folders")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first file that fails")
    parser.set_defaults(func=_cmd_info)


# --------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace) -> int:
    from onedc.errors import CheckpointError

    _check_checkpoint(args.ckpt)
    output, ckpt = Path(args.output), Path(args.ckpt)
    if output.suffix != ".safetensors":
        raise CheckpointError(f"export writes a .safetensors file, got -o {output}")
    protected = [ckpt, *(p for p in ckpt.rglob("*") if p.is_file())] if ckpt.is_dir() else [ckpt]
    _check_outputs([(ckpt, output)], args.force, protected=protected)
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
    parser.add_argument("--force", action="store_true", help="replace an existing output (never the checkpoint)")
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
    from onedc.coding.images import scan_images
    from onedc.eval.run import REPORT_NAMES

    for group in groups:
        for ckpt in group:
            _check_checkpoint(ckpt)
    data, out_dir = Path(args.data), Path(args.output)
    images = scan_images(data).files if data.is_dir() else [data]
    _check_outputs([(data, out_dir / name) for name in REPORT_NAMES], args.force, out_dir,
                   protected=[*images, *(Path(c) for group in groups for c in group)], folders_ok=True)
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
                      z_only=args.z_only, fail_fast=args.fail_fast,
                      anchor_cache=False if args.no_anchor_cache else (args.anchor_cache or True))
    for entry in result.aggregate:
        values = ", ".join(f"{key} {entry[key]:.4f}" for key in ("bpp", "psnr", "ms_ssim", "lpips", "dists", "fid")
                           if entry.get(key) is not None)
        _say(f"{entry['codec']:<6} {entry['setting']:<24} {values}")
    _say(result.bd_text)
    _say(f"wrote {', '.join(str(p) for p in result.paths.values())}")
    if result.failed:
        names = ", ".join(result.failed)
        print(f"eval: {result.images - len(result.failed)} of {result.images} images scored, "
              f"{len(result.failed)} failed: {names}", file=sys.stderr)
        return 2
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
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--anchor-cache", default=None, metavar="DIR",
                       help="folder of the anchor-row cache (default: $ONEDC_CACHE_DIR, else ~/.cache/onedc): anchor "
                            "rows do not depend on the checkpoints, so a second eval of the same images scores only "
                            "onedc's rows")
    cache.add_argument("--no-anchor-cache", action="store_true",
                       help="score every anchor row again, reading and writing no cache")
    parser.add_argument("--z-only", action="store_true",
                        help="also code every checkpoint as z-only files (y = the prior means): one more point "
                             "per checkpoint, at the lowest rate, on its curve")
    parser.add_argument("--bd-method", default="akima", choices=("akima", "pchip"),
                        help="interpolation of the BD fits (bjontegaard package; default: akima)")
    parser.add_argument("--max-images", type=_positive_int, default=None, metavar="N", help="first N images only")
    parser.add_argument("--steps", type=_positive_int, default=1, metavar="N",
                        help="generator decoding steps (N > 1: multi-step baseline; needs a generator)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--force", action="store_true", help="replace the results of an earlier run in OUT_DIR")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop at the first image that fails (default: report on the others and list it)")
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
    """Dispatch on the mode: ``--tokenizer FILE`` (teacher), ``--guidance FILE`` (stage-II guidance state)
    or ``CHECKPOINT_DIR`` (codec checkpoint)."""
    if args.guidance is not None:
        if args.checkpoint is not None or args.vae is not None or args.tokenizer is not None:
            raise OneDCError("import-reference converts one thing at a time: give --guidance FILE alone")
        return _import_reference_guidance(args)
    if args.tokenizer is not None:
        if args.checkpoint is not None or args.vae is not None:
            raise OneDCError("import-reference converts one thing at a time: give either --tokenizer FILE "
                             "or CHECKPOINT_DIR --vae VAE_DIR, not both")
        return _import_reference_tokenizer(args)
    if args.checkpoint is not None:
        return _import_reference_checkpoint(args)
    raise OneDCError("nothing to import: give --tokenizer FILE (MaskGIT-VQGAN .bin), --guidance FILE "
                     "(model_2.safetensors) or CHECKPOINT_DIR --vae VAE_DIR")


def _import_reference_tokenizer(args: argparse.Namespace) -> int:
    from onedc.modules.maskgit import import_maskgit_tokenizer

    out = import_maskgit_tokenizer(args.tokenizer, args.output)
    _say(f"{args.tokenizer} -> {out}: diffusers VQModel; use tokenizer=maskgit_vqgan tokenizer.pretrained={out}")
    return 0


def _import_reference_guidance(args: argparse.Namespace) -> int:
    """--guidance model_2.safetensors -o OUT: the authors' stage-II guidance state, checked, in module keys."""
    from onedc.training.config import compose, to_dict
    from onedc.families.reference.released import import_guidance

    unet = to_dict(compose([f"guidance={args.guidance_preset}"]).guidance)["unet"]
    out = import_guidance(args.guidance, args.output, unet_config=unet)
    _say(f"{args.guidance} -> {out}: the DMD2 guidance state (real + fake UNet, classifier); continue the authors' "
         f"stage II with train.py stage=dmd guidance={args.guidance_preset} guidance.pretrained={out}")
    return 0


def _import_reference_checkpoint(args: argparse.Namespace) -> int:
    """CHECKPOINT_DIR --vae VAE_DIR -o OUT.ckpt: the released codec + generator + an SD-2.1 VAE."""
    if args.vae is None:
        raise OneDCError(f"import-reference {args.checkpoint} needs the VAE the checkpoint was trained with: "
                         "add --vae DIR (a diffusers SD-2.1 VAE dir, e.g. stable-diffusion-2-1/vae)")
    _check_checkpoint(args.checkpoint)
    _check_checkpoint(args.vae, what="VAE folder")
    output = Path(args.output)
    inputs = [p for folder in (Path(args.checkpoint), Path(args.vae)) for p in [folder, *folder.rglob("*")]]
    _check_outputs([(Path(args.checkpoint), output)], args.force, protected=inputs)
    from onedc.families.reference.released import import_reference
    from onedc.training.config import compose, to_dict

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
                    "into an onedc checkpoint. --guidance model_2.safetensors -o OUT.safetensors: the stage-II DMD2 "
                    "guidance state for stage=dmd guidance.pretrained=OUT. Outputs are written atomically.")
    parser.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT_DIR",
                        help="released codec checkpoint folder (model.safetensors + model_1.safetensors)")
    parser.add_argument("--vae", default=None, metavar="VAE_DIR", help="VAE directory (with CHECKPOINT_DIR)")
    parser.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="MaskGIT-VQGAN state-dict file (.bin/.pt/.safetensors) to convert")
    parser.add_argument("--guidance", default=None, metavar="FILE",
                        help="the authors' stage-II guidance file (model_2.safetensors) to convert")
    parser.add_argument("--guidance-preset", default="sd15",
                        help="guidance= preset whose UNet the --guidance file holds (default: sd15)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output: a directory for --tokenizer, a .ckpt file for CHECKPOINT_DIR, "
                             "a .safetensors file for --guidance")
    parser.add_argument("--model", default="onedc_sd15",
                        help="model preset of the released checkpoint (default: onedc_sd15, the published OneDC)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT.ckpt (CHECKPOINT_DIR mode; an existing tokenizer folder "
                             "is never replaced: remove it first)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge the LoRA into the UNet weights (exact); default: keep it unmerged as released")
    parser.set_defaults(func=_cmd_import_reference)


def _cmd_make_shards(args: argparse.Namespace) -> int:
    """Write webdataset or MDS shards from a folder or an HF dataset (onedc.datamodules.shards)."""
    from onedc.datamodules.shards import make_shards

    summary = make_shards(args.src, args.output, fmt=args.format, shard_size=args.shard_size,
                          progress=not args.quiet, image_column=args.image_column,
                          caption_column=args.caption_column, key_column=args.key_column)
    skipped = f", skipped {len(summary['skipped'])} unreadable" if summary["skipped"] else ""
    _say(f"{args.src} -> {summary['out']}: {summary['samples']} samples ({summary['captions']} with captions) "
         f"in {summary['shards']} {args.format} shard(s){skipped}")
    return 0


def _register_make_shards(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "make-shards", help="write webdataset tars or MDS shards from a folder or an HF dataset",
        description="SRC is a folder of images (captions from sidecar .txt files) or a Hugging Face dataset "
                    "(save_to_disk dir, .arrow/.parquet). OUT must not exist; it appears complete or not at all. "
                    "Train on the result with data=webdataset data.shards=OUT/index.wids.json or "
                    "data=streaming data.path=OUT.")
    parser.add_argument("src", metavar="SRC", help="image folder or HF dataset")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="new output directory")
    parser.add_argument("--format", choices=("webdataset", "mds"), default="webdataset")
    parser.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N", help="samples per shard")
    parser.add_argument("--image-column", default="image", help="HF image column (default: image)")
    parser.add_argument("--caption-column", default=None, help="HF caption column (default: none)")
    parser.add_argument("--key-column", default=None, help="HF sample-name column (default: row number)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_make_shards)


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
    "make-shards": _register_make_shards,
}


def _is_deepspeed_accelerator_note(record: logging.LogRecord) -> bool:
    """False for DeepSpeed's "Setting accelerator to CPU" line (printed on stdout when a DeepSpeed
    checkpoint folder is converted on a machine without a GPU): onedc converts on the CPU on purpose."""
    return not str(record.msg).startswith("Setting accelerator to CPU")


def _quiet_third_party() -> None:
    """Silence the two messages that libraries print at import and that do not concern the user.

    Each is matched precisely (message and origin), so any other warning still shows: torch's
    ``torch.jit.script`` deprecation FutureWarning, raised when compressai imports torch_geometric
    (onedc never calls ``torch.jit.script``), and DeepSpeed's accelerator note, which its logger
    prints on *stdout*, where the results go. The logger filter survives DeepSpeed's own set-up of
    its "DeepSpeed" logger (``getLogger`` returns the same object; it only sets level and handler).
    """
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                            module=r"torch\.jit\._script")
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if _is_deepspeed_accelerator_note not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_is_deepspeed_accelerator_note)


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
    _quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except OneDCError as err:
        _error(err)
        return int(getattr(err, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
