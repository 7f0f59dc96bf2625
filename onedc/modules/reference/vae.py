"""The reference VAE (docs/reference-model.md §6): SD-2.1 ``AutoencoderKL`` with 16×16 windowed mid-block attention.

::

    mid-block feature map (B, 512, h, w), h, w = H/8, W/8
      └─ split into 16×16 windows from the top-left (border windows smaller: 40 → 16, 16, 8)
         └─ each window alone: GroupNorm → q,k,v → softmax attention → proj → + window
      └─ windows put back in place

The whole diffusers ``Attention`` module, its GroupNorm included, sees one window at a time,
in the encoder's and the decoder's mid block; resnets are unchanged. The windowing is an
attention *processor*, so the module tree and the state-dict keys stay diffusers'
``AutoencoderKL`` ones (``reference/vae.txt``). On maps of at most 16×16 it is the global
attention. Encoding gives the posterior mean (deterministic, the parity fixtures' choice) or,
as the reference does at inference, a posterior sample.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from onedc.modules.vae import FrozenVAE, build_vae

# stabilityai/stable-diffusion-2-1, subfolder vae (§6): 83,653,863 parameters.
SD21_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
ATTENTION_WINDOW = 16
POSTERIORS = ("mean", "sample")


def _tiles(x: Tensor, tile_h: int, tile_w: int) -> Tensor:
    """(B, C, nh·th, nw·tw) -> (B·nh·nw, C, th, tw), tiles in row-major order per image."""
    b, c, h, w = x.shape
    nh, nw = h // tile_h, w // tile_w
    tiles = x.reshape(b, c, nh, tile_h, nw, tile_w).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(b * nh * nw, c, tile_h, tile_w)


def _untile(tiles: Tensor, batch: int, nh: int, nw: int) -> Tensor:
    """Inverse of :func:`_tiles`."""
    _, c, tile_h, tile_w = tiles.shape
    grid = tiles.reshape(batch, nh, nw, c, tile_h, tile_w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, c, nh * tile_h, nw * tile_w)


def apply_in_windows(x: Tensor, fn: Callable[[Tensor], Tensor], window: int = ATTENTION_WINDOW) -> Tensor:
    """``fn`` applied to each non-overlapping ``window``² tile of ``x`` (B, C, H, W), tiled from the top-left.

    When H or W is not a multiple of ``window`` the last row/column of tiles is smaller. Tiles
    of equal size are batched into one ``fn`` call (at most four calls: interior, right strip,
    bottom strip, corner); ``fn`` must treat batch entries independently and keep the shape.
    """
    batch, _, height, width = x.shape
    full_h, full_w = (height // window) * window, (width // window) * window
    row_bands = [(0, full_h, window)] + ([(full_h, height, height - full_h)] if height > full_h else [])
    col_bands = [(0, full_w, window)] + ([(full_w, width, width - full_w)] if width > full_w else [])
    rows = []
    for top, bottom, tile_h in row_bands:
        if bottom == top:
            continue
        cols = []
        for left, right, tile_w in col_bands:
            if right == left:
                continue
            region = x[:, :, top:bottom, left:right]
            nh, nw = (bottom - top) // tile_h, (right - left) // tile_w
            cols.append(_untile(fn(_tiles(region, tile_h, tile_w).contiguous()), batch, nh, nw))
        rows.append(torch.cat(cols, dim=3))
    return torch.cat(rows, dim=2)


class WindowedAttnProcessor:
    """A diffusers attention processor that runs the wrapped processor per spatial window.

    The wrapped processor does the whole ``Attention`` computation (GroupNorm, projections,
    softmax, output projection, residual), so each window is normalised with its own statistics.
    """

    def __init__(self, inner: Any, window: int = ATTENTION_WINDOW) -> None:
        self.inner = inner
        self.window = int(window)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        if hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("windowed attention is for spatial self-attention on (B, C, H, W) maps only")
        return apply_in_windows(hidden_states, lambda tiles: self.inner(attn, tiles, temb=temb), self.window)


def mid_block_attentions(autoencoder: nn.Module) -> list[nn.Module]:
    """The encoder's and decoder's mid-block attention modules of a diffusers ``AutoencoderKL``."""
    found = []
    for part in (autoencoder.encoder, autoencoder.decoder):
        found.extend(part.mid_block.attentions)
    return [attn for attn in found if attn is not None]


def use_windowed_mid_attention(autoencoder: nn.Module, window: int = ATTENTION_WINDOW) -> nn.Module:
    """Make the mid-block attention of ``autoencoder`` attend within ``window``² tiles (in place).

    Idempotent: an already windowed processor is re-wrapped around its inner processor. Weights
    and keys are untouched. Returns ``autoencoder``.
    """
    for attn in mid_block_attentions(autoencoder):
        inner = attn.processor.inner if isinstance(attn.processor, WindowedAttnProcessor) else attn.processor
        attn.set_processor(WindowedAttnProcessor(inner, window))
    return autoencoder


class ReferenceVAE(FrozenVAE):
    """The frozen SD-2.1 VAE as the reference runs it: windowed mid attention, fp32, mean or sample.

    ``posterior="mean"`` (default) encodes deterministically, which exact decoding needs;
    ``"sample"`` draws mean + exp(½·clamp(logvar, −30, 20))·N(0, 1) like the reference's
    inference (from the global RNG unless a ``generator`` is given). Encode and decode run in
    float32 with autocast switched off, as in the reference (§5.4).
    """

    def __init__(self, autoencoder: nn.Module, scaling_factor: float | None = None,
                 window: int | None = ATTENTION_WINDOW, posterior: str = "mean") -> None:
        super().__init__(autoencoder, scaling_factor)
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got '{posterior}'")
        self.posterior = posterior
        self.window = window
        if window:
            use_windowed_mid_attention(autoencoder, int(window))

    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Image (B,3,H,W) in [-1,1] -> scaled latent (B,4,H/8,W/8): posterior mean, or a sample."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a caller's autocast
            posterior = self.autoencoder.encode(x.float()).latent_dist
        draw = self.posterior == "sample" if sample is None else bool(sample)
        latent = posterior.sample(generator=generator) if draw else posterior.mean
        return latent.float() * self.scaling_factor

    def decode(self, v: Tensor) -> Tensor:
        """Scaled latent -> image in [-1,1] (unclamped), float32. Differentiable w.r.t. ``v``.

        The decoder runs in its weights' dtype: float32 as the reference, or bf16 once the fast
        decode path cast it (the latent is scaled in float32 first, then cast).
        """
        with torch.autocast(v.device.type, enabled=False):
            return self.autoencoder.decode((v.float() / self.scaling_factor).to(self.decode_dtype)).sample.float()


def build_reference_vae(*, pretrained: str | None = None, config: dict[str, Any] | None = None, seed: int = 0,
                        scaling_factor: float | None = None, window: int | None = ATTENTION_WINDOW,
                        posterior: str = "mean", device: str | torch.device | None = None) -> ReferenceVAE:
    """The §6 VAE from a local diffusers ``AutoencoderKL`` dir, or random weights of ``config``.

    ``config`` defaults to :data:`SD21_VAE_CONFIG` when no ``pretrained`` dir is given; loading
    and errors are :func:`onedc.modules.vae.build_vae`'s. ``scaling_factor`` overrides the
    config's (0.18215 for SD-2.1). ``window=None`` keeps global attention.
    """
    if pretrained is None and config is None:
        config = SD21_VAE_CONFIG
    frozen = build_vae(pretrained=pretrained, config=config, seed=seed, scaling_factor=scaling_factor, device=device)
    vae = ReferenceVAE(frozen.autoencoder, frozen.scaling_factor, window=window, posterior=posterior)
    return vae
