"""The guidance model's text conditioning (docs/reference-model.md §10.2): a frozen CLIP tokenizer + text encoder.

::

    captions ─ CLIPTokenizer (pad to max_length, truncate) ─ CLIPTextModel ─ last hidden state (B, 77, 768)
    ""       ─ the same ──────────────────────────────────────────────────> unconditional embedding

As SD-1.5 and DMD2 encode prompts: padded to the tokenizer's ``model_max_length`` with
truncation, no attention mask, the encoder's last hidden state. The generator never sees text
(it is conditioned on the codec's semantic tokens); only the guidance UNets do.

Weights come from a local dir only: an SD model dir (``tokenizer/`` + ``text_encoder/``) or one
dir holding both. :func:`tiny_clip_tokenizer` builds a byte-level CLIP tokenizer with no merges
in code (tests and the tiny preset's random text encoder: nothing to download).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from onedc.errors import WeightsError

TEXT_FORMAT = ("a CLIP text encoder dir: an SD model dir with tokenizer/ and text_encoder/, or one dir holding "
               "the tokenizer files (vocab.json, merges.txt) and the CLIPTextModel (config.json + weights)")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_tokenizer(max_length: int = 77) -> Any:
    """A byte-level CLIP tokenizer without merges: every byte is a token (with and without ``</w>``).

    Encodes any text offline; its vocabulary (514 entries) is fixed, so a random text encoder of
    that vocabulary size is reproducible from its seed.
    """
    import json
    import tempfile

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1}
    for char in alphabet:
        vocab[char] = len(vocab)
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    # Through the vocab.json + merges.txt files every transformers version reads (4.x's Python
    # tokenizer takes file paths, 5.x's also accepts a dict).
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=int(max_length), local_files_only=True)


class TextEncoder(nn.Module):
    """A frozen CLIP tokenizer + text encoder: captions -> (B, max_length, width) embeddings.

    The tokenizer is a plain attribute (not model state); the encoder is frozen and in eval mode.
    """

    def __init__(self, tokenizer: Any, encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.max_length = int(min(tokenizer.model_max_length, encoder.config.max_position_embeddings))

    @property
    def width(self) -> int:
        """Width of the embeddings (the UNets' cross-attention width)."""
        return int(self.encoder.config.hidden_size)

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> Tensor:
        """Captions -> last hidden states (B, max_length, width), float32, no gradient."""
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        device = next(self.encoder.parameters()).device
        return self.encoder(ids.to(device))[0].float()

    def empty(self, batch: int) -> Tensor:
        """The unconditional embedding (that of ``""``) repeated ``batch`` times."""
        return self([""]).expand(batch, -1, -1)


def _text_dirs(path: Path) -> tuple[Path, Path]:
    if (path / "tokenizer").is_dir() and (path / "text_encoder").is_dir():
        return path / "tokenizer", path / "text_encoder"
    return path, path


def load_text_encoder(pretrained: str | Path) -> TextEncoder:
    """The CLIP tokenizer and text encoder of a local dir (see :data:`TEXT_FORMAT`); WeightsError if unfit."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise WeightsError(f"{path} is not a directory: expected {TEXT_FORMAT}")
    tokenizer_dir, encoder_dir = _text_dirs(path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(str(encoder_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise WeightsError(f"cannot load a CLIP text encoder from {path} ({reason}): expected {TEXT_FORMAT}") from err
    return TextEncoder(tokenizer, encoder.float())


def build_text_encoder(*, pretrained: str | Path | None = None, config: Mapping[str, Any] | None = None,
                       seed: int = 0, max_length: int = 77) -> TextEncoder:
    """A local CLIP dir, or (``pretrained=None``) a random ``CLIPTextModel`` of ``config`` with
    :func:`tiny_clip_tokenizer`, drawn from ``seed`` (global RNG untouched)."""
    if pretrained is not None:
        return load_text_encoder(pretrained)
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer(max_length)
    kwargs = {"vocab_size": len(tokenizer), "max_position_embeddings": int(max_length),
              "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **dict(config or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(CLIPTextConfig(**kwargs))
    return TextEncoder(tokenizer, encoder)
