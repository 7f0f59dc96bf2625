"""Weight files as users have them: plain state-dict files (``.bin``/``.pt``/``.pth``/``.safetensors``).

One reader and one strict loader for every module that accepts such a file (teachers, the
generator's UNet). Whatever is wrong with a file (unreadable, not a state dict, missing or
unexpected keys, wrong shapes) becomes one :class:`~onedc.errors.WeightsError` line that names
the file and the first offending keys, instead of torch's multi-line ``RuntimeError``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from onedc.errors import WeightsError

__all__ = ["STATE_DICT_SUFFIXES", "check_state_dict", "load_state_dict_file", "read_state_dict"]

STATE_DICT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth")

_SHOWN_KEYS = 4  # keys named per problem: enough to recognise the file, still one readable line


def read_state_dict(path: str | Path, *, expected: str) -> dict[str, Tensor]:
    """The tensors of a state-dict file; ``expected`` (what the file should be) ends every error.

    ``.safetensors`` is read with safetensors, anything else with ``torch.load(weights_only=True)``
    (no code from the file runs). A training checkpoint's nested ``state_dict`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: expected {expected}")
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise WeightsError(f"weights file {path} has an unknown suffix (not {'/'.join(STATE_DICT_SUFFIXES)}): "
                           f"expected {expected}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, wrong format, pickled code: all mean "not a weights file"
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise WeightsError(f"cannot read {path} as a state dict ({reason}): expected {expected}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else "a dict with non-tensor values"
        raise WeightsError(f"{path} does not hold a state dict of tensors (found {found}): expected {expected}")
    return state


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else "")


def check_state_dict(state: Mapping[str, Tensor], shapes: Mapping[str, torch.Size | Sequence[int]],
                     path: str | Path, what: str, expected: str = "") -> None:
    """Raise one :class:`WeightsError` line unless ``state`` has exactly the keys and ``shapes`` given.

    The message names ``path``, ``what`` the file should fit, and the first missing, unexpected
    and mis-shaped keys (with both shapes); ``expected`` is appended as the fix.
    """
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(shapes[k])}" for k in shapes
             if k in state and tuple(state[k].shape) != tuple(shapes[k])]
    parts = []
    if missing:
        parts.append(f"missing keys: {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_names(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes (file vs model): {_names(wrong)}")
    if parts:
        tail = f"; expected {expected}" if expected else ""
        raise WeightsError(f"{path} does not fit {what}: {'; '.join(parts)}{tail}")


def load_state_dict_file(module: nn.Module, path: str | Path, *, what: str, expected: str,
                         state: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Load a state-dict file into ``module`` strictly; every mismatch is one :class:`WeightsError` line.

    ``state`` skips reading when the caller already has the file's tensors. A module built on
    the meta device gets the file's tensors assigned (no second copy, no random init wasted);
    floating tensors end in the module's original dtype either way.
    """
    if state is None:
        state = read_state_dict(path, expected=expected)
    reference = module.state_dict()
    check_state_dict(state, {k: v.shape for k, v in reference.items()}, path, what, expected)
    meta = any(t.is_meta for t in reference.values())
    if meta:
        state = {k: (v.to(reference[k].dtype) if v.is_floating_point() else v) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=meta)
    return module
