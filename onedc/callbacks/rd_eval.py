"""Real-file rate-distortion points during training, logged to TensorBoard.

::

    validation epoch end (rank 0, TensorBoard logger only)
      first `max_images` validation images (fixed)
        ─ OneDCCodec.from_modules(vae, codec, generator)   snapshot of the weights validation used
        ─ compress_image ─> bytes ─> bpp_real = 8·bytes / pixels
        ─ decompress_bytes ─> x̂ ─> PSNR, MS-SSIM (8-bit, the convention of onedc.eval.pixels)
      ─> rd/bpp_real, rd/psnr, rd/ms_ssim scalars
      ─> rd/curve image: this run's (bpp, PSNR) trajectory over JPEG / WebP ladders of the same images

The likelihood bpp of validation is an estimate; this callback measures the files the codec
actually writes (header included), so the two can be compared in TensorBoard. It runs in
``on_validation_epoch_end``, before the EMA callback swaps the raw weights back, so it scores the
weights validation scored (the EMA, where a stage has one). The live modules are not touched:
:meth:`~onedc.coding.bundle.OneDCCodec.from_modules` copies the trainable ones. Under DeepSpeed
ZeRO-3 the parameters are sharded across ranks and rank 0 alone cannot run the model: the
callback then does nothing and says so once.
"""
from __future__ import annotations

import io
import logging
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import Tensor

from onedc.callbacks.tensorboard import first_validation_images, tensorboard_logger
from onedc.eval.anchors import JPEG_QUALITIES, WEBP_QUALITIES, pillow_decode, pillow_encode
from onedc.eval.pixels import ms_ssim_uint8, psnr_uint8
from onedc.eval.report import aggregate, rd_plot
from onedc.coding.images import to_uint8
from onedc.coding.bundle import OneDCCodec

log = logging.getLogger("onedc")


class RDEvalCallback(Callback):
    """At the end of every validation, code ``max_images`` validation images to real files and log RD.

    Args:
        max_images: how many validation images (the first ones, the same every time) to code.
        baselines: draw JPEG and WebP quality ladders of the same images in the plot.
        steps: generator steps used to decode (1 = the one-step decoder).
        tag: TensorBoard tag prefix.
    """

    def __init__(self, max_images: int = 4, baselines: bool = True, steps: int = 1, tag: str = "rd") -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.max_images = int(max_images)
        self.baselines = bool(baselines)
        self.steps = int(steps)
        self.tag = tag
        self.history: list[dict[str, float]] = []
        self._images: Tensor | None = None
        self._baseline_entries: list[dict[str, Any]] | None = None
        self._warned = False

    def _baseline(self, references: list[Tensor]) -> list[dict[str, Any]]:
        """Aggregate JPEG/WebP ladder entries of the fixed images (computed once: they never change)."""
        if self._baseline_entries is None:
            rows = []
            for codec, qualities in (("jpeg", JPEG_QUALITIES), ("webp", WEBP_QUALITIES)):
                for quality in qualities:
                    for x in references:
                        data = pillow_encode(x, codec, quality)
                        decoded = pillow_decode(data)
                        rows.append({"codec": codec, "setting": f"q={quality}", "bpp": len(data) * 8 / x[0].numel(),
                                     "psnr": psnr_uint8(x, decoded), "ms_ssim": ms_ssim_uint8(x, decoded)[0],
                                     "lpips": None, "dists": None, "quality": quality})
            self._baseline_entries = aggregate(rows)
        return self._baseline_entries

    @torch.no_grad()
    def evaluate(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Code the fixed images with the module's current weights: mean bpp_real, psnr, ms_ssim."""
        identity = getattr(pl_module, "identity", None)
        bundle = OneDCCodec.from_modules(pl_module.vae, pl_module.codec, getattr(pl_module, "generator", None),
                                         model_config=getattr(identity, "model", None))
        bpp, psnr, ms_ssim = [], [], []
        for image in self._images:
            data = bundle.compress_image(image)
            decoded = to_uint8(bundle.decompress_bytes(data, steps=self.steps if bundle.generator else 1).image)
            reference = to_uint8(image)
            bpp.append(len(data) * 8 / (image.shape[-2] * image.shape[-1]))
            psnr.append(psnr_uint8(reference, decoded))
            ms_ssim.append(ms_ssim_uint8(reference, decoded)[0])
        return {"bpp": float(np.mean(bpp)), "psnr": float(np.mean(psnr)),
                "ms_ssim": float(np.mean(ms_ssim)) if None not in ms_ssim else float("nan")}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = tensorboard_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        if getattr(trainer.strategy, "zero_stage_3", False):
            if not self._warned:
                log.warning("RDEvalCallback: parameters are sharded (ZeRO-3), rank 0 cannot code alone: skipped")
                self._warned = True
            return
        if self._images is None:
            self._images = first_validation_images(trainer, self.max_images)
            if self._images is None:
                return
        step = int(trainer.global_step)
        result = self.evaluate(pl_module)
        self.history = [h for h in self.history if h["step"] != step] + [{"step": step, **result}]
        writer = logger.experiment
        writer.add_scalar(f"{self.tag}/bpp_real", result["bpp"], global_step=step)
        writer.add_scalar(f"{self.tag}/psnr", result["psnr"], global_step=step)
        writer.add_scalar(f"{self.tag}/ms_ssim", result["ms_ssim"], global_step=step)
        writer.add_image(f"{self.tag}/curve", self.plot(), global_step=step, dataformats="HWC")

    def plot(self) -> np.ndarray:
        """The RD plot (H, W, 3) uint8: the run's trajectory over the baselines' ladders."""
        entries = self._baseline([to_uint8(x) for x in self._images]) if self.baselines else []
        last = self.history[-1]["step"] if self.history else 0
        png = rd_plot(entries, history=self.history,
                      title=f"{len(self._images)} validation image(s), real files, step {last}")
        with Image.open(io.BytesIO(png)) as image:
            return np.asarray(image.convert("RGB")).copy()

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
