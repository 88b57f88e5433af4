"""Loading what a user brings: a model (.pt2 program or a factory) and calibration data (.npy, .npz, images)."""

from __future__ import annotations

import functools
import importlib
import pickle
import tokenize
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qftsim.errors import QftsimError
from qftsim.qft import CalibrationSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_exported_program(path: str | Path) -> nn.Module:
    """The module of a torch.export program (.pt2), with its shape guards removed so any batch size runs."""
    path = Path(path)
    if not path.is_file():
        raise QftsimError(f"{path}: no such model file")
    try:
        module = torch.export.load(str(path)).module()
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise QftsimError(f"{path}: not a torch.export program (.pt2): {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    graph = module.graph
    for node in list(graph.nodes):
        guard = (node.op == "call_module" and str(node.target).startswith("_guards")) or (
            node.op == "call_function" and node.target in (torch._assert, torch.ops.aten._assert_scalar.default))
        if guard:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def exported_input_shape(module: nn.Module) -> tuple[int | None, ...] | None:
    """The per-sample input shape a torch.export program was exported at (None for a dynamic dimension), or None
    when `module` is not such a program or has not exactly one input."""
    graph = getattr(module, "graph", None)
    shapes = [n.meta["val"].shape for n in graph.nodes if n.op == "placeholder" and "val" in n.meta] if graph else []
    if len(shapes) != 1:
        return None
    return tuple(d if isinstance(d, int) else None for d in shapes[0][1:])


def load_factory(spec: str, weights: str | Path | None = None) -> nn.Module:
    """`package.module:function` called with no arguments; optional weights via torch.load(weights_only=True)."""
    if ":" not in spec:
        raise QftsimError(f"factory {spec!r}: expected package.module:function")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise QftsimError(f"factory {spec!r}: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise QftsimError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(str(weights), weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise QftsimError(f"{weights}: not loadable with torch.load(weights_only=True) (a state dict of "
                              f"tensors; pickled objects are refused): {first_line}") from None
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise QftsimError(f"{weights}: does not fit {spec}: {str(exc).splitlines()[0]}") from None
    return model


# what numpy raises for a file that is not a whole .npy/.npz: cut short, a damaged header byte (its header is
# parsed as a Python literal), a damaged archive
NPY_ERRORS = (OSError, ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError, zipfile.BadZipFile)


def read_npy(path: str | Path, mmap: bool = False):
    """np.load without pickles (memory-mapped if `mmap`); a file it cannot read is one QftsimError."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except NPY_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QftsimError(f"{path}: not a readable .npy array ({reason})") from None


def load_calibration(path: str | Path, size: int | None = None, crop: int | None = None,
                     mean=(0.0,), std=(1.0,), channels: int = 3, key: str | None = None,
                     progress: bool = False) -> torch.Tensor | CalibrationSet:
    """A float batch from .npy or .npz (its only array, or `key`), or a folder of images as a CalibrationSet.

    Images are resized (shorter side to `size`), center-cropped to `crop`, and held as uint8 CHW; the set's
    batches are scaled to [0, 1] and normalized by per-channel `mean` and `std`. `progress` shows a bar over them.
    """
    path = Path(path)
    if not path.exists():
        raise QftsimError(f"{path}: no such calibration data")
    if path.is_dir():
        return _load_images(path, size, crop, mean, std, channels, progress=progress)
    try:
        if path.suffix == ".npy":
            array = read_npy(path)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.keys())
                if key is None and len(names) != 1:
                    raise QftsimError(f"{path}: holds {names}; choose one with --npz-key")
                if key is not None and key not in names:
                    raise QftsimError(f"{path}: no array {key!r}; it holds {names}")
                array = archive[key or names[0]]
        else:
            raise QftsimError(f"{path}: calibration data must be .npy, .npz or a folder of images")
    except NPY_ERRORS as exc:
        raise QftsimError(f"{path}: unreadable ({exc})") from None
    if array.dtype.kind not in "fiu" or array.ndim < 2:
        raise QftsimError(f"{path}: expected a numeric batch (N, ...), got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def first_sample(path: str | Path, size: int | None = None, crop: int | None = None, mean=(0.0,), std=(1.0,),
                 channels: int = 3, key: str | None = None) -> torch.Tensor:
    """The first sample of `load_calibration`'s batch, read alone (one image, or one row of an .npy): what the
    model is checked on before the whole data set is read."""
    path = Path(path)
    if path.is_dir():
        files = _image_files(path)
        return _load_images(path, size, crop, mean, std, channels, files[:1])[:]
    if path.suffix == ".npy" and path.is_file():
        head = read_npy(path, mmap=True)[:1]
        if head.dtype.kind not in "fiu" or head.ndim < 2:
            raise QftsimError(f"{path}: expected a numeric batch (N, ...), got {head.dtype} {head.shape}")
        return torch.from_numpy(np.array(head, dtype=np.float32))
    return load_calibration(path, size, crop, mean, std, channels, key)[:1]


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QftsimError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _load_images(folder: Path, size, crop, mean, std, channels, files: list[Path] | None = None,
                 progress: bool = False) -> CalibrationSet:
    try:
        from PIL import Image
    except ImportError:
        raise QftsimError("reading an image folder needs Pillow: pip install pillow") from None
    from tqdm import tqdm

    files = _image_files(folder) if files is None else files
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise QftsimError(f"--channels must be 1 or 3, got {channels}")
    batch = []
    for file in tqdm(files, desc=f"reading {folder}", unit="image", disable=not progress, leave=False):
        try:
            with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS and raises at twice that
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(file).convert(mode)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise QftsimError(f"{file}: larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (a "
                              "decompression bomb, or a photo to shrink first)") from None
        except OSError as exc:
            raise QftsimError(f"{file}: not a readable image ({exc})") from None
        if size:
            scale = size / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BILINEAR)
        if crop:
            if min(image.size) < crop:
                raise QftsimError(f"{file}: {image.size} is smaller than the crop {crop} (use --resize)")
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image)
        batch.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in batch}
    if len(shapes) != 1:
        raise QftsimError(f"{folder}: images have different sizes {sorted(shapes)[:3]}; use --resize and --crop")
    return CalibrationSet(np.stack(batch), functools.partial(_normalized, mean=torch.tensor(mean).view(1, -1, 1, 1),
                                                             std=torch.tensor(std).view(1, -1, 1, 1)))


def _normalized(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to [0, 1], then (x - mean) / std per channel, in float32."""
    return (pixels.float() / 255.0 - mean) / std
