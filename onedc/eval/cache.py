"""A persistent, content-keyed cache of anchor rows, so that a second ``onedc eval`` of the same photos
scores only the onedc rows.

An anchor row (JPEG/WebP/AVIF/JPEG-XL at one quality) depends on the reference pixels, the codec
and its quality, the encoder library, the metric networks' weights and onedc's scoring code:
never on the checkpoints. Each scored row (its values and its FID patch features) is one file,
keyed by all of those::

    <DIR>/anchors-v1/<image digest[:2]>/<image digest>/<codec>-q<quality>-<key digest[:20]>.safetensors
    <DIR>/anchors-v1/<image digest[:2]>/<image digest>/<codec>-sizes-<key digest[:20]>.json
    <DIR>/anchors-v1/<image digest[:2]>/<image digest>/reference-<key digest[:20]>.safetensors

The key (stored whole in each file and compared on reading) holds: the SHA-256 of the reference's
uint8 pixels and shape; the codec and quality; Pillow's version and the codec library's (libjpeg,
libwebp, libavif, the JPEG-XL plugin); the SHA-256 of every metric network's loaded weights
(LPIPS' AlexNet and heads, DISTS' VGG16 and alpha/beta, the FID feature extractor; "none" where
absent), torch / torchmetrics / lpips versions, the device type, :data:`METRIC_CODE_VERSION` and
the SHA-256 of onedc's scoring sources. Changing any part misses: the row is scored again and
written. The ``sizes`` file records the file size of every quality encoded so far (the matched-bpp
search reads it instead of encoding again); ``reference`` holds the reference's own FID features.

Files are written atomically (:func:`onedc.io.atomic_write`): two evals at once may both write an
entry, the last rename wins and both wrote the same values; a reader never sees half a file. An
unreadable or foreign file is ignored with one warning line and rewritten. Nothing is evicted: the
folder may be deleted at any time. Default folder: ``$ONEDC_CACHE_DIR``, else
``$XDG_CACHE_HOME/onedc``, else ``~/.cache/onedc``.

Values computed with another thread count agree to float rounding (oneDNN reductions), not
bit for bit; within one setting, the rows read back are exactly the rows computed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from onedc.errors import OneDCError
from onedc.io import atomic_write, atomic_write_bytes

CACHE_ENV = "ONEDC_CACHE_DIR"
LAYOUT = "anchors-v1"
#: Bump when anything that changes a scored value changes without changing the sources hashed in
#: :func:`scoring_sources_digest` (e.g. a dependency's behaviour onedc relies on).
METRIC_CODE_VERSION = 1
#: The values of a scored row the cache stores (the rest of a row names the image and setting).
SCORE_FIELDS: tuple[str, ...] = ("bytes", "bpp", "psnr", "ms_ssim", "ms_ssim_scales", "lpips", "dists")


def default_cache_dir() -> Path:
    """``$ONEDC_CACHE_DIR``, else ``$XDG_CACHE_HOME/onedc``, else ``~/.cache/onedc``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "onedc"


def _sha256(*chunks: bytes | memoryview) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def image_digest(image: Tensor) -> str:
    """SHA-256 of a uint8 (3, H, W) image's shape and pixels."""
    pixels = image.detach().cpu().contiguous()
    return _sha256(f"{pixels.dtype}{tuple(pixels.shape)}".encode(), pixels.view(-1).view(torch.uint8).numpy())


def module_digest(module: nn.Module | None) -> str:
    """SHA-256 of a module's class and state dict (names, dtypes, shapes, values); "none" for None."""
    if module is None:
        return "none"
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in module.state_dict().items():
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        if values.numel():
            digest.update(values.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def scoring_sources_digest() -> str:
    """SHA-256 of the sources that turn an anchor file into a row (scores, metrics, encoders)."""
    from onedc.eval import anchors, perceptual, pixels
    from onedc.coding import images

    texts = []
    for module in (anchors, perceptual, pixels, images):
        try:
            texts.append(Path(module.__file__).read_bytes())
        except (OSError, TypeError):  # no source file (frozen): the version constant alone
            texts.append(module.__name__.encode())
    return _sha256(*texts)


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def codec_environment(codec: str) -> dict[str, Any]:
    """Pillow's version and the library that writes ``codec`` (what decides the bytes of an anchor file)."""
    import PIL
    from PIL import features

    library = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}.get(codec)
    try:
        lib_version = features.version(library) if library else _version("pillow-jxl-plugin")
    except ValueError:  # a feature name this Pillow does not know
        lib_version = None
    return {"pillow": PIL.__version__, "codec": codec, "library": lib_version}


class AnchorCache:
    """The anchor rows of one evaluation's setting (its metric networks, device and code), on disk.

    Build with :meth:`open`. ``say`` gets the warning lines (an unreadable entry; a folder that
    cannot be written, after which the run goes on without writing).
    """

    def __init__(self, root: Path, metric_environment: Mapping[str, Any], say: Callable[[str], None]) -> None:
        self.root = Path(root)
        self.metric_environment = dict(metric_environment)
        self.say = say
        self.writable = True
        self.hits = 0
        self.misses = 0
        self._codec_env: dict[str, dict[str, Any]] = {}

    @classmethod
    def open(cls, where: str | Path | None, networks: Mapping[str, nn.Module | None], device: torch.device,
             say: Callable[[str], None]) -> "AnchorCache":
        """The cache in ``where`` (None: :func:`default_cache_dir`) for these metric ``networks`` on ``device``."""
        import torchmetrics

        root = Path(where).expanduser() if where is not None else default_cache_dir()
        environment = {
            "metric_code": METRIC_CODE_VERSION, "sources": scoring_sources_digest(),
            "torch": torch.__version__, "torchmetrics": torchmetrics.__version__, "lpips": _version("lpips"),
            "device": torch.device(device).type,
            "networks": {name: module_digest(module) for name, module in sorted(networks.items())},
        }
        return cls(root / LAYOUT, environment, say)

    # ------------------------------------------------------------------ keys and paths
    def _codec(self, codec: str) -> dict[str, Any]:
        if codec not in self._codec_env:
            self._codec_env[codec] = codec_environment(codec)
        return self._codec_env[codec]

    def _key(self, image: str, kind: str, codec: str | None = None, quality: int | None = None) -> dict[str, Any]:
        key: dict[str, Any] = {"layout": LAYOUT, "kind": kind, "image": image}
        if codec is not None:
            key["codec"] = self._codec(codec)
        if quality is not None:
            key["quality"] = int(quality)
        if kind != "sizes":  # file sizes depend on the encoder only
            key["metrics"] = self.metric_environment
        return key

    def _path(self, key: Mapping[str, Any], stem: str, suffix: str) -> Path:
        digest = _sha256(json.dumps(key, sort_keys=True).encode())[:20]
        image = key["image"]
        return self.root / image[:2] / image / f"{stem}-{digest}{suffix}"

    # ------------------------------------------------------------------ reading and writing
    def _warn(self, path: Path, why: str) -> None:
        self.say(f"warning: anchor cache entry {path} ignored ({why}); it is scored again and rewritten")

    def _read_entry(self, path: Path, key: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor | None] | None:
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if json.loads(meta["key"]) != json.loads(json.dumps(key)):
                    raise ValueError("its key differs from this evaluation's")
                values = json.loads(meta["values"])
                features = handle.get_tensor("features") if meta["features"] == "tensor" else None
            if not isinstance(values, dict):
                raise ValueError("no values")
        except Exception as err:  # a damaged, truncated or foreign file: ignore it
            self._warn(path, " ".join(str(err).split()) or type(err).__name__)
            return None
        return values, features

    def _write(self, path: Path, write: Callable[[Path], None]) -> None:
        if not self.writable:
            return
        try:
            write(path)
        except OneDCError as err:  # read-only or full: evaluate on, without the cache's writes
            self.writable = False
            self.say(f"warning: anchor cache not written ({err}); this run goes on without writing it")

    def _write_entry(self, path: Path, key: Mapping[str, Any], values: Mapping[str, Any],
                     features: Tensor | None) -> None:
        from safetensors.torch import save

        tensors = {} if features is None else {"features": features.detach().cpu().contiguous()}
        meta = {"key": json.dumps(key, sort_keys=True), "values": json.dumps(dict(values)),
                "features": "none" if features is None else "tensor"}
        self._write(path, lambda p: atomic_write_bytes(p, save(tensors, metadata=meta)))

    def get(self, image: str, codec: str, quality: int) -> tuple[dict[str, Any], Tensor | None] | None:
        """(score values, FID patch features or None) of ``codec`` at ``quality`` of the image ``image``, or None."""
        key = self._key(image, "row", codec, quality)
        found = self._read_entry(self._path(key, f"{codec}-q{int(quality)}", ".safetensors"), key)
        if found is not None and not set(SCORE_FIELDS) <= set(found[0]):
            found = None
        self.hits += found is not None
        self.misses += found is None
        return found

    def put(self, image: str, codec: str, quality: int, values: Mapping[str, Any], features: Tensor | None) -> None:
        """Store a scored row's values (:data:`SCORE_FIELDS`) and its FID patch features."""
        key = self._key(image, "row", codec, quality)
        self._write_entry(self._path(key, f"{codec}-q{int(quality)}", ".safetensors"), key,
                          {name: values[name] for name in SCORE_FIELDS}, features)

    def reference_features(self, image: str) -> tuple[bool, Tensor | None]:
        """(found, FID patch features of the reference itself)."""
        key = self._key(image, "reference")
        found = self._read_entry(self._path(key, "reference", ".safetensors"), key)
        return (True, found[1]) if found is not None else (False, None)

    def put_reference_features(self, image: str, features: Tensor | None) -> None:
        key = self._key(image, "reference")
        self._write_entry(self._path(key, "reference", ".safetensors"), key, {}, features)

    def sizes(self, image: str, codec: str) -> dict[int, int]:
        """quality -> file size in bytes of ``codec`` files of the image, as far as known."""
        key = self._key(image, "sizes", codec)
        path = self._path(key, f"{codec}-sizes", ".json")
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            if data["key"] != json.loads(json.dumps(key)):
                raise ValueError("its key differs from this evaluation's")
            return {int(q): int(n) for q, n in data["sizes"].items()}
        except Exception as err:
            self._warn(path, " ".join(str(err).split()) or type(err).__name__)
            return {}

    def put_sizes(self, image: str, codec: str, sizes: Mapping[int, int]) -> None:
        """Add ``sizes`` to the known file sizes (merged with what another run wrote meanwhile)."""
        key = self._key(image, "sizes", codec)
        path = self._path(key, f"{codec}-sizes", ".json")
        merged = {**(self.sizes(image, codec) if path.is_file() else {}), **{int(q): int(n) for q, n in sizes.items()}}
        text = json.dumps({"key": key, "sizes": {str(q): n for q, n in sorted(merged.items())}}, sort_keys=True)
        self._write(path, lambda p: atomic_write(p, lambda handle: handle.write(text.encode())))

