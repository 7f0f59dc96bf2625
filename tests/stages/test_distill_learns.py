"""A 300-step distill run of the embedded default on the sample photos learns the teacher's tokens and the rate.

What holds on every CPU (spread measured by ``benchmarks/learning_spread.py --figures distill``
over native AVX2 and ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41`` kernels, seeds 0
and 1; the teacher and the VAE are quick-trained with the same kernels, so they differ too):

- token accuracy on the five training photos (256 px centre crops, 320 tokens): 0.400, 0.394,
  0.428, 0.444 against majority codes of 0.169 / 0.163, i.e. 2.37, 2.42, 2.54, 2.73 x majority
  (mean 2.52, sd 0.16): the bar of 1.7 x majority sits 5.1 sd below the mean and 0.67 below the
  worst run. With the random VAE of ``model=tiny_random`` the same runs gave 2.42 .. 3.06 x;
- the estimated val bpp falls to 0.084 .. 0.094 of its step-0 value (sd 0.006): bar 0.2.

What does not hold on every CPU, and is therefore not asserted: held-out token accuracy above
the majority code. On the two held-out photos (448 px crops, 392 tokens) it ended at 0.092,
0.105, 0.156 and 0.186 against majority codes of 0.125 / 0.115 (acc - majority mean +0.015, sd
0.046): 300 tiny steps on five photos fit the training tokens but generalise only within the
noise.
"""
import json

import pytest
import torch

from onedc.training.build import build_stage
from onedc.training.config import compose
from onedc.datamodules import load_image, sample_photo_paths
from onedc.training.pipeline import load_init_weights, run

OVERRIDES = ["trainer.logger=none", "trainer.enable_progress_bar=false", "stage.val_every_n_steps=300",
             "stage.checkpoint_every_n_steps=300", "data.val_crop_size=448"]
TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "rocket")
TRAIN_ACC_BAR = 1.7  # x the majority code; measured 2.37 .. 2.73 (see the docstring)


def training_photo_token_accuracy(cfg, final_ckpt) -> tuple[float, float]:
    """(token accuracy, majority-code accuracy) of ``final_ckpt`` on 256 px centre crops of the training photos."""
    module = build_stage(cfg, cfg.stage)
    load_init_weights(module, final_ckpt, cfg, prefixes=("codec.", "distill."))
    module.eval()
    crops = []
    for name in TRAIN_PHOTOS:
        image = load_image(sample_photo_paths()[name])
        top, left = (image.shape[1] - 256) // 2, (image.shape[2] - 256) // 2
        crops.append(image[:, top:top + 256, left:left + 256])
    with torch.no_grad():
        metrics = module._step(torch.stack(crops))
    counts = torch.bincount(metrics["_indices"].flatten())
    return float(metrics["token_acc"]), float(counts.max() / counts.sum())


@pytest.mark.slow
def test_300_distill_steps_fit_the_teacher_tokens_and_lower_the_rate(tmp_path):
    cfg = compose(["stage=distill", f"run_dir={tmp_path}", *OVERRIDES])
    result = run(cfg)[0]
    assert result.global_step == 300
    history = json.loads((result.run_dir / "val_history.json").read_text())
    start, end = history[0], history[-1]
    assert (start["step"], end["step"]) == (0, 300)
    assert end["bpp"] < 0.2 * start["bpp"], (start, end)
    accuracy, majority = training_photo_token_accuracy(cfg, result.final_ckpt)
    assert accuracy > TRAIN_ACC_BAR * majority, (accuracy, majority)
