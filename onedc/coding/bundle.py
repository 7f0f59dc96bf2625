"""Inference bundle: a trained OneDC model that turns images into ``.onedc`` files and back.

::

    compress_image:    x (3,H,W) ─pad to 64─> VAE enc ─> v ─┐
                       x_padded ────────────────────────────┴─> codec.compress ─> z, y streams
                       streams + sizes + model id ─> encode_container ─> bytes
    decompress_bytes:  bytes ─> decode_container (magic, version, CRCs, model id)
                       ─> codec.decompress ─> ŷ, ẑ, features, tokens
                       ─> _latent_from: generator(features, tokens) | light latent_hat (stage 1)
                       ─> VAE dec ─> clamp [-1,1] ─> crop to (H, W)

Every file carries the bundle's model identity (:mod:`onedc.coding.identity`), so a file decoded
with another model fails with ``ModelMismatchError`` instead of producing a wrong picture.
Weights are read by :mod:`onedc.coding.checkpoints` and the parts rebuilt from their model config
by the model's family (:mod:`onedc.families`: ``model.family`` light or reference), which also
names the decoder-side weights of the model identity and bounds the y stream. Coding layer of
docs/architecture.md.

Exactness: the decoder recomputes the integer coding decisions of ŷ (rANS table and mean of
every symbol) from ẑ with the encoder's network, in float64 outside autocast, and takes the few
decisions that lie near a boundary from the file's fix list (``onedc.modules.decisions``). A file
therefore decodes to the same ŷ, bit for bit, on any CPU or GPU, thread count, batch size and
memory layout, with the rest of the model in bf16 or not; the file's decision checksum turns
any disagreement into :class:`~onedc.errors.CodingMismatchError`. Format-1 files (float32
decisions) are still read, on the kind of machine that wrote them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from onedc.coding.bitstream import (
    DEFAULT_MAX_PIXELS,
    MAX_PADDED_PIXELS,
    MAX_SIDE,
    FLAG_Z_ONLY,
    Container,
    check_pixel_limit,
    decode_container,
    encode_container,
)
from onedc.coding.checkpoints import read_weights
from onedc.coding.decode_options import DecodeOptions, batch_size, prepare_decoder, vae_plan
from onedc.errors import BitstreamError, CheckpointError, CodingMismatchError, OneDCError
from onedc.coding.identity import model_identity
from onedc.families import FamilyCodec, ModelFamily, family_of, generator_settings, load_part, split_parts, weights_only_config
from onedc.modules.coding_tables import tables_missing
from onedc.modules.decode_speed import set_vae_tiling
from onedc.modules.streams import DecodedLatents, pack_indices, pad_to_multiple, unpack_indices

__all__ = ["DecodedImage", "OneDCCodec"]


@dataclass(frozen=True)
class DecodedImage:
    """The result of :meth:`OneDCCodec.decompress_bytes`.

    ``image`` is (3, H, W) in [-1, 1] at the original size; ``y_hat`` (1, M, H'/16, W'/16),
    ``z_hat`` (1, d, H'/64, W'/64) and ``latent`` (1, C, H'/8, W'/8) are on the padded grid
    (H', W'), exactly as the decoder computed them; ``header`` is the parsed container.
    """

    image: Tensor
    y_hat: Tensor
    z_hat: Tensor
    latent: Tensor
    header: Container


# --------------------------------------------------------------------------- the bundle
class OneDCCodec(nn.Module):
    """A trained OneDC model for coding files: frozen VAE + hyperprior codec (+ one-step generator).

    Build it with :meth:`from_checkpoint` (stage checkpoints now, exported weights later) or
    :meth:`from_config` (random weights, for tests and benchmarks). Everything runs in eval mode
    without gradients. Submodule names match the stage checkpoints (``vae``, ``codec``,
    ``generator``), so ``state_dict()`` has the same prefixes.
    """

    def __init__(self, vae: nn.Module, codec: FamilyCodec, generator: nn.Module | None = None,
                 generator_settings: Mapping[str, Any] | None = None, family: ModelFamily | None = None) -> None:
        super().__init__()
        #: the model family that built the codec (light by default): identity prefixes, stream bounds
        self.family = family or family_of({})
        self.vae = vae
        self.codec = codec
        self.generator = generator
        self.generator_settings = dict(generator_settings or {})
        if tables_missing(codec):
            codec.update(force=True)
        self.requires_grad_(False)
        self.eval()
        self._model_id: bytes | None = None
        #: the decoder's speed settings (None: the modules as built, untiled; see :meth:`prepare_decoding`)
        self.decode_options: DecodeOptions | None = None
        self.decode_report: dict[str, Any] = {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        decode_options: DecodeOptions | None = DecodeOptions()) -> "OneDCCodec":
        """Load the inference bundle from a checkpoint file or folder, on ``device``.

        The reader is chosen by suffix from :data:`CHECKPOINT_READERS` (``.ckpt``: a stage
        checkpoint with its ``onedc`` metadata); folders and unknown suffixes are read as stage
        checkpoints. The VAE, codec and (if the checkpoint has one) generator are rebuilt from
        the stored model config and loaded strictly; training-only weights are ignored. A
        trainable-only checkpoint's frozen parts are read back from their sources first
        (:func:`onedc.coding.checkpoints.fill_frozen`). Any problem raises
        :class:`~onedc.errors.CheckpointError` naming the file. ``decode_options``
        (default: LoRA merged, SDPA, channels-last, fp32, VAE tiles within 4 GiB) are applied by
        :meth:`prepare_decoding`; ``None`` keeps the modules as built.
        """
        loaded = read_weights(path)
        return cls.from_weights(loaded.model_config, loaded.state_dict, device=device, source=Path(path),
                                decode_options=decode_options)

    @classmethod
    def from_weights(cls, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor],
                     device: str | torch.device = "cpu", source: str | Path = "<weights>",
                     decode_options: DecodeOptions | None = None) -> "OneDCCodec":
        """Rebuild the bundle from a model config dict and a prefixed state dict (``vae.*``, ...), then apply ``decode_options``."""
        device = _check_device(device)
        source = Path(source)
        model_config = weights_only_config(model_config)
        family = family_of(model_config)
        parts = split_parts(state_dict)
        try:
            vae = family.build_vae(model_config)
            codec = family.build_codec(model_config, vae.latent_channels)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: its model config cannot build the VAE/codec "
                                  f"({type(err).__name__}: {err})") from err
        load_part("vae", vae, parts["vae"], source)
        family.load_codec(codec, parts["codec"], source)
        generator, settings = None, {}
        if parts["generator"]:
            try:
                generator = family.build_generator(model_config)
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{source}: its model config cannot build the generator "
                                      f"({type(err).__name__}: {err})") from err
            load_part("generator", generator, parts["generator"], source)
            settings = generator_settings(model_config)
        bundle = cls(vae, codec, generator, generator_settings=settings, family=family).to(device)
        if decode_options is not None:
            bundle.prepare_decoding(decode_options)
        return bundle

    @classmethod
    def from_modules(cls, vae: nn.Module, codec: FamilyCodec, generator: nn.Module | None = None,
                     model_config: Mapping[str, Any] | None = None, copy_trainable: bool = True) -> "OneDCCodec":
        """A bundle over modules that live elsewhere (a training run), leaving them undisturbed.

        The bundle puts its parts in eval mode without gradients and rebuilds the codec's rANS
        tables, so with ``copy_trainable`` (the default) every part that is in training mode or
        has a parameter with ``requires_grad`` is deep-copied first (a snapshot of the current
        weights); frozen eval-mode parts (the VAE, a frozen codec) are shared, not copied, since
        the bundle changes nothing in them (their tables are rebuilt from the same weights).
        ``model_config`` (the dict a checkpoint stores) names the family and supplies the
        generator's decode settings, so the model id equals the one of a checkpoint holding these
        weights.
        """
        def snapshot(module: nn.Module | None) -> nn.Module | None:
            if module is None or not copy_trainable:
                return module
            live = module.training or any(p.requires_grad for p in module.parameters())
            return copy.deepcopy(module) if live else module

        codec = snapshot(codec)
        codec.update(force=True)  # tables of the current weights (a live codec's may be stale)
        generator = snapshot(generator)
        settings = generator_settings(model_config or {}) if generator is not None else {}
        return cls(snapshot(vae), codec, generator, generator_settings=settings, family=family_of(model_config or {}))

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any], device: str | torch.device = "cpu",
                    seed: int = 0) -> "OneDCCodec":
        """A bundle with random codec weights (VAE from its config seed), tables built: tests, benchmarks."""
        model_config = copy.deepcopy(dict(model_config))
        family = family_of(model_config)
        vae = family.build_vae(model_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            codec = family.build_codec(model_config, vae.latent_channels)
        codec.update(force=True)
        return cls(vae, codec, family=family).to(_check_device(device))

    def prepare_decoding(self, options: DecodeOptions) -> "OneDCCodec":
        """Apply the decoder's speed settings in place (once; see :mod:`onedc.coding.decode_options`).

        The model id is computed first, from the weights as loaded: a merged LoRA or a bf16 cast
        changes the state dict, not the model the files were written with. ŷ is unaffected (its
        decisions run in float64 in the codec), so files stay bit-compatible. The modules are
        changed in place: use it on a bundle that owns them (``from_checkpoint``), not on one
        built by :meth:`from_modules` over a live training run.
        """
        if self.decode_options is not None:
            raise OneDCError("the decoder was already prepared; load the checkpoint again to change its settings")
        _ = self.model_id
        self.decode_report = prepare_decoder(self.generator, self.vae, options, self.device)
        self.decode_options = options
        return self

    @property
    def decode_dtype(self) -> torch.dtype:
        """The dtype the VAE decoder (and the generator's UNet) compute in."""
        return self.vae.decode_dtype

    # ---------------------------------------------------------------- identity
    @property
    def model_id(self) -> bytes:
        """The 16-byte identity written into every file (see :func:`model_identity`); cached."""
        if self._model_id is None:
            settings = {
                "fsq_levels": list(self.codec.fsq.levels),
                "vae_scaling_factor": float(getattr(self.vae, "scaling_factor", 1.0)),
                "stride": int(self.codec.downsample),
                "generator": self.generator_settings if self.generator is not None else None,
            }
            self._model_id = model_identity(self.state_dict(), settings, self.family.decoder_prefixes())
        return self._model_id

    @property
    def device(self) -> torch.device:
        """Device of the bundle's weights."""
        return next(self.codec.parameters()).device

    # ---------------------------------------------------------------- coding
    def _prepare(self, x: Tensor, mode: str = "replicate") -> tuple[Tensor, tuple[int, int]]:
        """(3,H,W) image in [-1,1] -> (1,3,H',W') padded to the codec's multiple, and (H, W).

        ``mode`` ``reflect`` (z-only files of the published model) falls back to replication where a
        side is shorter than its padding, which reflection cannot fill.
        """
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected one RGB image of shape (3, H, W), got {tuple(x.shape)}")
        height, width = int(x.shape[1]), int(x.shape[2])
        stride = self.codec.downsample
        padded_pixels = -(-height // stride) * stride * -(-width // stride) * stride
        if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE) or padded_pixels > MAX_PADDED_PIXELS:
            raise OneDCError(f"image of {height}x{width} pixels is too large for a .onedc file "
                             f"(at most {MAX_SIDE} per side and {MAX_PADDED_PIXELS} padded pixels): split it into tiles")
        if mode == "reflect" and (-height) % stride < height and (-width) % stride < width:
            padded = torch.nn.functional.pad(x[None].to(self.device, torch.float32),
                                             (0, (-width) % stride, 0, (-height) % stride), mode="reflect")
            return padded, (height, width)
        return pad_to_multiple(x[None].to(self.device, torch.float32), stride)

    @torch.no_grad()
    def quantised_forward(self, x: Tensor) -> Any:
        """Codec forward pass (eval) on the padded image: ŷ, ẑ and likelihoods, as ``compress`` sees them.

        Public for the checks that compare against what the coder codes (the reference-parity and
        portability checks, ``benchmarks/portability.py``).
        """
        padded, _ = self._prepare(x)
        return self.codec(padded, self.vae.encode(padded))

    @torch.no_grad()
    def compress_image(self, x: Tensor) -> bytes:
        """Compress one image (3, H, W) in [-1, 1] of any size into the bytes of a ``.onedc`` file.

        The image is replicate-padded to the codec's multiple (64) on the bottom/right, encoded
        by the VAE, coded by the hyperprior codec (z fixed-length, y rANS) and wrapped in the
        container with its original size and this model's id.
        """
        padded, size = self._prepare(x)
        return self._compress_prepared(padded, self.vae.encode(padded), size)[0]

    @torch.no_grad()
    def compress_z_only(self, x: Tensor) -> bytes:
        """Compress one image (3, H, W) in [-1, 1] into a z-only ``.onedc`` file: the z stream and the header.

        Only the fixed-length z indices are written (z_bits per 64×64 block, flag ``z-only``); the
        decoder takes ŷ to be the hyperprior's means (the family's ``z_only_latents``; for the
        published model its extreme-rate mode, docs/reference-model.md §4.9). The image is padded
        to the codec's multiple with the family's ``z_only_padding`` (reflection for the published
        model, as its release does; replication where the image is too small to reflect).
        """
        padded, size = self._prepare(x, mode=self.family.z_only_padding)
        indices = self.family.z_only_indices(self.codec, padded, self.vae.encode(padded))
        z_height, z_width = int(indices.shape[-2]), int(indices.shape[-1])
        return encode_container(Container(
            model_id=self.model_id, height=size[0], width=size[1], stride=self.codec.downsample,
            z_height=z_height, z_width=z_width, z_bits=self.codec.fsq.bits_per_index,
            z_stream=pack_indices(indices[0].cpu().numpy(), self.codec.fsq.bits_per_index), y_stream=b"",
            fix_stream=b"", symbol_crc=0, flags=FLAG_Z_ONLY))

    @torch.no_grad()
    def compress_with_estimate(self, x: Tensor) -> tuple[bytes, float, float]:
        """Compress one image and estimate its rate from the same VAE pass: (file bytes, bits, z bits).

        The estimate is the family's own rate model on the eval codec pass of the padded image
        (``codec.rate_bits`` and ``codec.z_bits_per_image``): what training pays for, against what
        the coder wrote (:func:`onedc.coding.rate.rate_table`).
        """
        padded, size = self._prepare(x)
        v = self.vae.encode(padded)  # one VAE pass for both: the estimate sees what is coded
        data = self._compress_prepared(padded, v, size)[0]
        out = self.codec(padded, v)
        return data, float(self.codec.rate_bits(out)[0]), float(self.codec.z_bits_per_image(out.z_hat.shape[-2:]))

    @torch.no_grad()
    def compress_images(self, images: list[Tensor], return_y_hat: bool = False) -> list[bytes] | tuple[list[bytes], Tensor]:
        """Compress several images of one size (3, H, W) as one batch: one ``.onedc`` file each.

        The files decode like the ones :meth:`compress_image` writes (the coding decisions do not
        depend on the batch). ``return_y_hat`` also returns the encoder's ŷ (B, M, h, w): what
        every decoder must rebuild, bit for bit.
        """
        if not images:
            return ([], torch.empty(0)) if return_y_hat else []
        prepared = [self._prepare(x) for x in images]
        sizes = {size for _, size in prepared}
        if len(sizes) != 1:
            raise OneDCError(f"compress_images needs images of one size, got {sorted(sizes)}: compress them one by one")
        padded = torch.cat([p for p, _ in prepared])
        files, y_hat = self._compress_prepared(padded, self.vae.encode(padded), sizes.pop(), with_y_hat=True)
        return (files, y_hat) if return_y_hat else files

    def _compress_prepared(self, padded: Tensor, v: Tensor, size: tuple[int, int], with_y_hat: bool = False):
        """Padded images + their VAE latents -> the bytes of one file per image (and ŷ)."""
        height, width = size
        coded = self.codec.compress(padded, v)
        y_strings, z_strings = coded["strings"]
        z_height, z_width = coded["shape"]
        files = [encode_container(Container(
            model_id=self.model_id, height=height, width=width, stride=self.codec.downsample,
            z_height=int(z_height), z_width=int(z_width), z_bits=self.codec.fsq.bits_per_index,
            z_stream=z_stream, y_stream=y_stream, fix_stream=fixes, symbol_crc=checksum,
        )) for y_stream, z_stream, fixes, checksum in zip(y_strings, z_strings, coded["fixes"], coded["checksums"])]
        return (files, coded["y_hat"]) if with_y_hat else files

    @torch.no_grad()
    def decompress_bytes(self, data: bytes, steps: int = 1,
                         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DecodedImage:
        """Decode the bytes of a ``.onedc`` file written by this model into an image.

        The container is verified first (magic, version, CRCs, model id) and its declared size
        checked against ``max_pixels`` (height x width; ``None``: no limit) before anything is
        allocated: a larger file raises :class:`~onedc.errors.PixelLimitError`, so an untrusted
        file cannot exhaust memory. Then ẑ and ŷ are entropy-decoded, turned into a VAE latent by
        :meth:`_latent_from` and decoded by the VAE. Every other failure raises a
        :class:`~onedc.errors.BitstreamError` subclass, including errors inside the entropy
        decoder on a file whose checksum was forged. ``steps > 1`` decodes with the multi-step
        baseline of the generator (see :meth:`_latent_from`).
        """
        self.check_steps(steps)
        header = decode_container(data, expected_model_id=self.model_id)
        check_pixel_limit(header, max_pixels)
        decoded = self._z_only_decode(header) if header.z_only else self._entropy_decode(header)
        latent = self._latent_from(decoded, steps=steps)
        image = self._vae_decode(latent)
        return DecodedImage(image=image[0, :, : header.height, : header.width], y_hat=decoded.y_hat,
                            z_hat=decoded.z_hat, latent=latent, header=header)

    @torch.no_grad()
    def decompress_many(self, files: list[bytes], steps: int = 1,
                        max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[DecodedImage]:
        """Decode several files, one generator and VAE call per group of same-size files; results in order.

        Each file is checked and entropy-decoded on its own (its ŷ is the one
        :meth:`decompress_bytes` gives, bit for bit); files of one padded size are then batched
        through the generator and the VAE, at most as many as the decode options' memory bound
        and ``batch`` allow (one at a time without options). Batching changes the picture only
        by kernel rounding. Every file is checked against ``max_pixels`` from its header first, as
        in :meth:`decompress_bytes`; the first failing file raises its error.
        """
        self.check_steps(steps)
        headers = [decode_container(data, expected_model_id=self.model_id) for data in files]
        for header in headers:
            check_pixel_limit(header, max_pixels)
        entries = [(header, self._z_only_decode(header) if header.z_only else self._entropy_decode(header))
                   for header in headers]
        results: list[DecodedImage | None] = [None] * len(entries)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (header, _) in enumerate(entries):
            groups.setdefault(tuple(header.padded_size), []).append(index)
        for padded, members in groups.items():
            limit = 1 if self.decode_options is None else batch_size(self.decode_options, padded, self.decode_dtype)
            for start in range(0, len(members), limit):
                chunk = members[start:start + limit]
                decoded = DecodedLatents(*(None if all(entries[i][1][k] is None for i in chunk)
                                           else torch.cat([entries[i][1][k] for i in chunk])
                                           for k in range(len(entries[chunk[0]][1]))))
                latent = self._latent_from(decoded, steps=steps)
                images = self._vae_decode(latent)
                for row, index in enumerate(chunk):
                    header, own = entries[index]
                    results[index] = DecodedImage(image=images[row, :, : header.height, : header.width],
                                                  y_hat=own.y_hat, z_hat=own.z_hat, latent=latent[row:row + 1],
                                                  header=header)
        return results  # type: ignore[return-value]

    def _vae_decode(self, latent: Tensor) -> Tensor:
        """Latent batch -> images clamped to [-1, 1]: untiled, or in tiles sized to the memory bound."""
        if self.decode_options is not None:
            plan = vae_plan(self.decode_options, tuple(latent.shape[-2:]), latent.shape[0], self.decode_dtype,
                            self.vae.downsample)
            set_vae_tiling(self.vae.autoencoder, plan.tile)
        return self.vae.decode(latent).clamp(-1.0, 1.0)

    def _z_only_decode(self, header: Container) -> DecodedLatents:
        """A z-only file's latents: ẑ from its z stream, ŷ = the prior means (the family's ``z_only_latents``)."""
        codec = self.codec
        if header.stride != codec.downsample or header.z_bits != codec.fsq.bits_per_index:
            raise BitstreamError(f"file codes z at stride {header.stride} with {header.z_bits}-bit indices, the model "
                                 f"at stride {codec.downsample} with {codec.fsq.bits_per_index}: the header is inconsistent")
        indices = unpack_indices(header.z_stream, header.z_height * header.z_width, header.z_bits)
        if (indices >= codec.fsq.codebook_size).any():
            raise BitstreamError("z stream holds an index outside the FSQ codebook: the file is corrupt")
        z_hat = codec.fsq.indices_to_codes(
            torch.from_numpy(indices).view(1, header.z_height, header.z_width).to(self.device))
        return self.family.z_only_latents(codec, z_hat)

    def _entropy_decode(self, header: Container) -> DecodedLatents:
        """Container streams -> decoder-side latents, with every coder failure as BitstreamError."""
        codec = self.codec
        if header.stride != codec.downsample or header.z_bits != codec.fsq.bits_per_index:
            raise BitstreamError(f"file codes z at stride {header.stride} with {header.z_bits}-bit indices, the model "
                                 f"at stride {codec.downsample} with {codec.fsq.bits_per_index}: the header is inconsistent")
        y_len = len(header.y_stream)
        if y_len < 8 or y_len % 4:
            # CompressAI's rANS64 writes whole 32-bit words and an 8-byte final state.
            raise BitstreamError(f"y stream of {y_len} bytes is not a rANS stream (8+ bytes, whole 32-bit words)")
        # CompressAI's C++ rANS decoder reads without bounds checks, so a stream whose CRC was
        # forged could make it read past the buffer and crash the process. Zero words after the
        # stream bound that: each decoded symbol reads at most two 32-bit words (symbol +
        # escape), and zeros end every escape sequence. A valid stream never reads them.
        symbols = self.family.y_symbols(codec, header.padded_size)
        y_stream = header.y_stream + bytes(8 * symbols + 64)
        legacy = header.version == 1  # float32 decisions, no fix list, no checksum
        try:
            return codec.decompress([[y_stream], [header.z_stream]], (header.z_height, header.z_width),
                                    fixes=[header.fix_stream], checksums=[header.symbol_crc], legacy=legacy)
        except CodingMismatchError:
            raise
        except Exception as err:  # the coder raises ValueError/RuntimeError/IndexError/...: all mean "bad stream"
            raise BitstreamError(
                f"the entropy decoder rejected the payload ({type(err).__name__}: {err}) although its CRC32 "
                "matched: the file was altered and its checksum recomputed, or written by an incompatible encoder"
            ) from err

    def check_steps(self, steps: int, setting: str | None = None, source: str | Path | None = None) -> None:
        """Refuse a decoding step count this bundle cannot run, before any work is done.

        The one home of the rule "multi-step decoding needs a generator": the CLI, ``onedc eval``
        and :meth:`decompress_bytes` all ask here. ``setting`` is how the caller's user spelled
        the count (default ``steps=N``; the CLI passes ``--steps N``), ``source`` the checkpoint.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise OneDCError(f"steps must be a whole number >= 1, got {steps!r}")
        if steps > 1 and self.generator is None:
            raise OneDCError(f"{setting or f'steps={steps}'} (multi-step decoding) needs a one-step generator, and "
                             f"{source or 'this model'} has none (a distill-stage checkpoint): use steps=1, or a "
                             "latent/finetune checkpoint")

    def _latent_from(self, decoded: DecodedLatents, steps: int = 1) -> Tensor:
        """THE generator slot: decoder-side latents -> the clean VAE latent that the VAE decodes.

        With a one-step generator (stages 2-3) it predicts the latent from g_s's features,
        cross-attending to the semantic tokens; without one (stage 1) the codec's light
        reconstruction ``latent_hat`` is used. ``steps > 1`` runs the generator's multi-step
        DDIM baseline (``OneStepGenerator.multi_step``: N UNet calls from T down to 0), a
        compute/quality comparison point rather than the trained decoder; it needs a generator.
        """
        self.check_steps(steps)
        if self.generator is not None:
            if steps > 1:
                return self.generator.multi_step(decoded.features, decoded.tokens, steps)
            return self.generator(decoded.features, decoded.tokens)
        return decoded.latent_hat


def _check_device(device: str | torch.device) -> torch.device:
    """Turn a user-given device into a torch.device, refusing ones this machine lacks."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise OneDCError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OneDCError(f"device {device} requested but CUDA is not available here: use --device cpu")
    return device
