"""One whole ``onedc decompress`` of a large file at full size: peak memory and time, default settings.

::

    child "make":   full-size model (random weights, seeded) ─ saved as a stage checkpoint
                    ─ a sample photo resized to SIZE² ─ compress_image ─ image.onedc   (encode peak, time)
    child "decode": ``onedc decompress image.onedc --ckpt model.ckpt`` exactly as a user runs it
                    (default decode settings: --precision auto, LoRA merged, channels-last, the VAE tiled
                    to --max-memory 4 GiB) ─ its peak RSS (ru_maxrss of the child), wall time

The decode child is a fresh process, so its peak is the decode's own: loading the checkpoint,
preparing the decoder (bf16 copy, merged LoRA), entropy decoding, the UNet at 1/8 and the tiled
VAE. Usage: ``python benchmarks/decode_full.py --size 2048 [--model onedc_sd15] [--threads 2]
[--work DIR]`` (the work folder keeps the checkpoint, ~5.6 GB at full size, and the file, so a
second run with ``--work`` skips the encode). ``--decode-args`` passes more options to decompress.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def make(args: argparse.Namespace) -> dict:
    """Build, save and encode (in this process): the checkpoint and the .onedc file."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from onedc.coding.bundle import OneDCCodec
    from onedc.datamodules.image_folder import load_image, sample_photo_paths
    from onedc.families import family_of
    from onedc.io import atomic_write_bytes
    from onedc.training.config import compose, to_dict

    work = Path(args.work)
    model_cfg = to_dict(compose([f"model={args.model}"]).model)
    start = time.perf_counter()
    base = OneDCCodec.from_config(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        generator = family_of(model_cfg).build_generator(model_cfg)
    bundle = OneDCCodec.from_modules(base.vae, base.codec, generator, model_config=model_cfg, copy_trainable=False)
    ckpt = work / "model.ckpt"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save({"state_dict": bundle.state_dict(),
                "onedc": {"format": 1, "stage": "latent", "model": model_cfg, "tokenizer": {}}}, tmp)
    os.replace(tmp, ckpt)
    built = time.perf_counter() - start
    image = load_image(sample_photo_paths()["astronaut"])[None]
    image = F.interpolate(image, size=(args.size, args.size), mode="bicubic", align_corners=False).clamp(-1, 1)[0]
    start = time.perf_counter()
    with torch.inference_mode():
        data = bundle.compress_image(image)
    encode = time.perf_counter() - start
    atomic_write_bytes(work / "image.onedc", data)
    return {"build_and_save_s": built, "encode_s": encode, "encode_process_peak_gb": _hwm() / 1e9,
            "file_bytes": len(data), "bpp": 8 * len(data) / args.size ** 2, "ckpt_gb": ckpt.stat().st_size / 1e9}


def decode(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    out = work / "decoded"
    command = [sys.executable, "-m", "onedc.cli", "decompress", str(work / "image.onedc"), "-o", str(out),
               "--ckpt", str(work / "model.ckpt"), "--force"] + shlex.split(args.decode_args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if done.returncode:
        sys.exit(f"decompress failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"decode_command": " ".join(command[1:]), "decode_wall_s": wall, "decode_process_peak_gb": peak / 1e9,
            "decompress_stderr_tail": done.stderr.strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="square image side")
    parser.add_argument("--model", default="onedc_sd15", help="model preset (random weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="work folder (kept; reused when it has model.ckpt and image.onedc)")
    parser.add_argument("--decode-args", default="", help="more decompress options, e.g. '--max-memory 8'")
    parser.add_argument("--child", choices=("make",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "make":
        print(json.dumps(make(args)))
        return
    args.work = args.work or tempfile.mkdtemp(prefix="decode-full-")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"size": args.size, "model": args.model, "threads": args.threads, "work": str(work)}
    if not ((work / "model.ckpt").exists() and (work / "image.onedc").exists()):
        # The encode runs in its own child so that the decode child's peak (RUSAGE_CHILDREN keeps
        # the largest child) is read after a child that is smaller, or from a fresh parent run.
        made = subprocess.run([sys.executable, __file__, "--child", "make", "--size", str(args.size), "--model",
                               args.model, "--threads", str(args.threads), "--work", str(work)],
                              capture_output=True, text=True)
        if made.returncode:
            sys.exit(f"make failed:\n{made.stderr[-3000:]}")
        result.update(json.loads(made.stdout.strip().splitlines()[-1]))
        print(json.dumps(result), flush=True)
        # A fresh parent for the decode: RUSAGE_CHILDREN would report the encode child's peak otherwise.
        again = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--model", args.model,
                                "--threads", str(args.threads), "--work", str(work),
                                "--decode-args", args.decode_args], capture_output=True, text=True)
        if again.returncode:
            sys.exit(again.stderr[-3000:])
        result.update(json.loads(again.stdout.strip().splitlines()[-1]))
    else:
        result.update(decode(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
