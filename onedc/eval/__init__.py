"""Rate-distortion evaluation the way the field reports it, with real files (docs/architecture.md).

::

    image ─ OneDCCodec.compress_image ─> .onedc bytes ─ (written to OUT/files/) ─> bpp = 8·bytes / (H·W)
                                            └─ decompress_bytes(steps) ─> x̂
    image ─ Pillow JPEG / WebP / AVIF / JPEG-XL: a fixed quality ladder + per image the quality whose file bpp is
            closest to onedc's (binary search) ─> bytes ─> bpp, x̂
    (x, x̂) both rounded to 8 bits ─> PSNR, MS-SSIM                         (always)
                                   ─> LPIPS (AlexNet), DISTS (VGG16)        (when their weights are local)
    256-px patches of x and x̂ (grid + a grid shifted by 128 px) ─ Inception ─> FID, KID per codec setting

Outputs (see :func:`evaluate`): ``per_image.csv`` / ``per_image.json`` (one row per image and codec
setting), ``aggregate.json`` (means per codec setting, FID/KID, notes) and ``rd.png`` (bpp vs PSNR
and the other metrics: each onedc λ ladder, one point per checkpoint, against the anchors and other
codecs), ``bd.json`` (BD-rate and BD-metric of every metric, :mod:`onedc.eval.bd`) and
``compressai/<curve>.json`` (each curve in CompressAI's results layout). Another codec's
reconstructions and file sizes are scored the same way (:class:`~onedc.eval.run.Recon`).

Conventions. bpp divides the whole file (header included) by the original pixel count; the
aggregate bpp/PSNR/... are means over images (as CompressAI and the Kodak tables report them).
PSNR and MS-SSIM are computed on the 8-bit images a viewer would see (data range 255; the PSNR
convention is stated once, in :mod:`onedc.eval.pixels`).
MS-SSIM uses the standard 5 scales and 11-px Gaussian window when the image is large enough
(min side >= 176 for torchmetrics); smaller images use as many of the finest scales as fit,
with the standard weights renormalised to sum to 1, and a smaller odd window below 11 px
(:func:`ms_ssim_settings`; the row's ``ms_ssim_scales`` column says how many were used).

Perceptual backbones cannot be downloaded here: they are read from local files (``--weights-dir``,
else ``$ONEDC_WEIGHTS``, else torch hub's cache ``$TORCH_HOME/hub/checkpoints``), looked up as
``DIR/NAME``, ``DIR/checkpoints/NAME`` or ``DIR/hub/checkpoints/NAME``:

=========== ============================================== ===============================================
metric      file                                           source
=========== ============================================== ===============================================
LPIPS       ``alexnet-owt-7be5be79.pth``                   torchvision AlexNet (lpips v0.1 heads ship in the wheel)
DISTS       ``vgg16-397923af.pth``                         torchvision VGG16 (alpha/beta ship in torchmetrics)
FID, KID    ``weights-inception-2015-12-05-6726825d.pth``  torch-fidelity's Inception (needs ``torch-fidelity``)
=========== ============================================== ===============================================

A missing file leaves its columns empty and is named in one message; nothing is downloaded.
LPIPS and DISTS are computed on whole images; FID/KID follow HiFiC / MS-ILLM: non-overlapping
256x256 patches, plus a second pass over the image shifted by 128 px in both directions, all
pooled over the data set (images smaller than 256 px give no patches).

Anchor rows do not depend on the checkpoints: each scored one (values and FID features) is kept
in a persistent cache keyed by the reference pixels, codec, quality, encoder library, metric
networks' weights and scoring code (:mod:`~onedc.eval.cache`, default ``~/.cache/onedc``;
``--anchor-cache DIR`` / ``--no-anchor-cache``), so a second evaluation of the same images scores
only onedc's rows, with the same outputs.

Files: :mod:`~onedc.eval.pixels` (PSNR, MS-SSIM), :mod:`~onedc.eval.perceptual` (LPIPS, DISTS,
FID/KID and their weight files), :mod:`~onedc.eval.anchors` (Pillow JPEG/WebP),
:mod:`~onedc.eval.cache` (the anchor-row cache), :mod:`~onedc.eval.report` (rows, means,
CSV/JSON, the RD plot), :mod:`~onedc.eval.run` (:func:`evaluate`). Evaluation layer: it may import coding and below, never callbacks or stages.
"""
from onedc.eval.anchors import (ANCHOR_LADDERS, ANCHORS, BASELINES, JPEG_QUALITIES, WEBP_QUALITIES, anchor_available,
                                match_quality, missing_anchors, pillow_decode, pillow_encode)
from onedc.eval.bd import BD_METHODS, BD_METRICS, HIGHER_IS_BETTER, bd, bd_table, curves_of, format_bd_table
from onedc.eval.perceptual import (FID_PATCH, INCEPTION_FILE, VGG16_FILE, WEIGHT_URLS, WEIGHTS_ENV, PerceptualMetrics,
                                   fid_kid, fid_patches, find_weights, weights_dirs)
from onedc.eval.pixels import MS_SSIM_BETAS, MS_SSIM_KERNEL, ms_ssim_settings, ms_ssim_uint8, psnr, psnr_uint8, to_uint8
from onedc.eval.report import METRICS, ROW_FIELDS, aggregate, compressai_results, rd_plot, write_csv
from onedc.eval.run import EvalResult, Recon, checkpoint_labels, evaluate
from onedc.modules.losses import ALEXNET_FILE

__all__ = [
    "ANCHORS", "ANCHOR_LADDERS", "BD_METHODS", "BD_METRICS", "HIGHER_IS_BETTER", "Recon", "anchor_available", "bd",
    "bd_table", "compressai_results", "curves_of", "format_bd_table", "missing_anchors",
    "ALEXNET_FILE", "BASELINES", "FID_PATCH", "INCEPTION_FILE", "JPEG_QUALITIES", "METRICS", "MS_SSIM_BETAS",
    "MS_SSIM_KERNEL", "ROW_FIELDS", "VGG16_FILE", "WEBP_QUALITIES", "WEIGHTS_ENV", "WEIGHT_URLS", "EvalResult",
    "PerceptualMetrics", "aggregate", "checkpoint_labels", "evaluate", "fid_kid", "fid_patches", "find_weights",
    "match_quality", "ms_ssim_settings", "ms_ssim_uint8", "pillow_decode", "pillow_encode", "psnr", "psnr_uint8",
    "rd_plot", "to_uint8", "weights_dirs", "write_csv",
]
