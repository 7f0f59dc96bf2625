"""Spread of the learned figures that the tests assert, over kernel sets and seeds.

A test that trains and asserts a learned figure (token accuracy, a falling rate or loss) must
pass on any CPU. PyTorch and oneDNN pick kernels per instruction set, so the float results of
every step differ in the last bits between machines, and a few hundred steps amplify that into
another model. This script re-runs each test's training with other kernels
(``ATEN_CPU_CAPABILITY=default``, ``ONEDNN_MAX_CPU_ISA=SSE41``, each in its own process) and other
seeds, and prints each figure's mean, standard deviation and range, and its margin to the test's
bar in standard deviations. The tests' docstrings quote these numbers; the bars keep a margin
of at least three standard deviations.

Usage: ``python benchmarks/learning_spread.py [--figures distill rate latent end_to_end] [--seeds 0 1 2]
[--kernels native avx2 default sse41] [--jobs 2]``. The distill figure takes ~1.5 min per run on one
core, the others well under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNELS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "both": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
BASE = ["trainer.logger=none", "trainer.enable_progress_bar=false"]


def distill(run_dir: str, seed: int) -> dict[str, float]:
    """tests/stages/test_distill_learns.py: 300 distill steps on the sample photos."""
    from onedc.training.config import compose
    from onedc.training.pipeline import run

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "stages"))
    from test_distill_learns import OVERRIDES, training_photo_token_accuracy  # the test's own config

    cfg = compose(["stage=distill", f"run_dir={run_dir}", f"seed={seed}", *OVERRIDES])
    result = run(cfg)[0]
    history = json.loads((result.run_dir / "val_history.json").read_text())
    start, end = history[0], history[-1]
    train_acc, train_majority = training_photo_token_accuracy(cfg, result.final_ckpt)
    return {"train_acc": train_acc, "train_majority": train_majority, "train_acc_over_majority": train_acc / train_majority,
            "token_acc": end["token_acc"], "majority_acc": end["majority_acc"],
            "acc_over_majority": end["token_acc"] - end["majority_acc"],
            "acc_gain": end["token_acc"] / max(start["token_acc"], 1e-9), "bpp_ratio": end["bpp"] / start["bpp"]}


def rate(run_dir: str, seed: int) -> dict[str, float]:
    """tests/bitstream/test_rate_after_training.py: payload vs estimate after 120 distill steps."""
    from onedc.coding.bundle import OneDCCodec
    from onedc.coding.rate import rate_table
    from onedc.datamodules import sample_photo_paths

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from shared_runs import short_distill_run  # the test's own run

    final = short_distill_run(Path(run_dir), [f"seed={seed}"])
    rows = rate_table(OneDCCodec.from_checkpoint(final), list(sample_photo_paths().values()))
    return {"max_abs_rel_diff": max(abs(r["rel_diff"]) for r in rows)}


def latent(run_dir: str, seed: int) -> dict[str, float]:
    """tests/stages/test_latent.py: validation latent loss of the short latent run vs its start."""
    import pytest

    from onedc.training import pipeline
    from onedc.training.config import compose

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "stages"))
    from test_latent import DISTILL, LATENT, _run_with_probe  # the test's own configs

    distill_cfg = compose(DISTILL + [f"run_dir={run_dir}/d", f"seed={seed}"])
    distill_ckpt = pipeline.run(distill_cfg)[0].final_ckpt
    cfg = compose(LATENT + [f"run_dir={run_dir}/l", f"seed={seed}", f"init_from={distill_ckpt}", "trainer.logger=none"])
    with pytest.MonkeyPatch.context() as monkeypatch:
        probe, _ = _run_with_probe(monkeypatch, cfg)
    end = probe.records["val"][-1]["val/latent_loss"]
    return {"vs_start": end / probe.records["val_start"], "vs_zero": end / probe.records["val_zero"],
            "start_vs_zero": probe.records["val_start"] / probe.records["val_zero"]}


def end_to_end(run_dir: str, seed: int) -> dict[str, float]:
    """tests/stages/test_end_to_end_psnr.py: PSNR of the held-out photos through real files after 120 distill steps."""
    from onedc.datamodules import sample_photo_paths
    from onedc.eval import evaluate

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from shared_runs import short_distill_run  # the test's own run

    final = short_distill_run(Path(run_dir), [f"seed={seed}"])
    photos = sample_photo_paths()
    result = evaluate([final], [photos["grace_hopper"], photos["motorcycle_right"]], Path(run_dir) / "eval",
                      baselines=False, progress=False, say=lambda message: None)
    rows = {row["image"]: row for row in result.rows}
    return {f"psnr_{name}": row["psnr"] for name, row in rows.items()} | {
        f"bpp_{name}": row["bpp"] for name, row in rows.items()}


def teacher(run_dir: str, seed: int) -> dict[str, float]:
    """tests/modules/test_teachers.py: linear read-out of the shipped tiny teacher's codes."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "modules"))
    from test_teachers import _linear_probe_accuracy, build_teacher, tokenizer_options

    torch.manual_seed(seed)  # the teacher is a shipped file: seed only moves the probe
    accuracy, majority = _linear_probe_accuracy(build_teacher(**tokenizer_options("vq_tiny")))
    return {"acc_over_majority": accuracy - majority}


FIGURES = {"distill": distill, "rate": rate, "latent": latent, "end_to_end": end_to_end, "teacher": teacher}


def one_run(figure: str, kernels: str, seed: int, caches: str) -> dict:
    """Run one figure in a fresh process with the given kernel set; return its values."""
    with tempfile.TemporaryDirectory(prefix="onedc-spread-") as tmp:
        # A cache dir per kernel set, from when the tiny VAE and teacher were trained on first use;
        # they are shipped files now (onedc/assets), so the same weights serve every kernel set.
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ONEDC_CACHE=f"{caches}/{kernels}",
                   **KERNELS[kernels])
        out = subprocess.run([sys.executable, __file__, "--worker", figure, tmp, str(seed)], env=env,
                             capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            raise RuntimeError(f"{figure} {kernels} seed {seed} failed:\n{out.stderr[-2000:]}")
        return {"figure": figure, "kernels": kernels, "seed": seed, **json.loads(lines[-1][7:])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--kernels", nargs="+", default=["native", "avx2", "default", "sse41"], choices=list(KERNELS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        figure, run_dir, seed = args.worker
        print("RESULT " + json.dumps(FIGURES[figure](run_dir, int(seed))), flush=True)
        return
    # Kernel sets alternate, so the first runs at once fill different caches.
    jobs = [(f, k, s) for f in args.figures for s in args.seeds for k in args.kernels]
    with tempfile.TemporaryDirectory(prefix="onedc-spread-caches-") as caches, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: one_run(*job, caches), jobs))
    for r in results:
        print(json.dumps(r))
    for figure in args.figures:
        rows = [r for r in results if r["figure"] == figure]
        for key in [k for k in rows[0] if k not in ("figure", "kernels", "seed")]:
            values = [r[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{figure:<8} {key:<18} n={len(values)} mean {statistics.mean(values):.4f} sd {sd:.4f} "
                  f"range {min(values):.4f} .. {max(values):.4f}")


if __name__ == "__main__":
    main()
