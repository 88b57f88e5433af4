"""Build the pool of natural colour photographs for the EfficientNet-Lite0 benchmark (run once).

    python benchmarks/photo_pool.py [--cache DIR] [--bundled-only]

Sources, all offline from the package registries: the photos bundled with
scikit-image and scikit-learn, and the sample and wallpaper photos of four
Debian packages, fetched with `apt-get download` and unpacked with
`dpkg-deb -x` into a scratch folder (nothing is installed). Only the files
listed below are kept (diagrams, renders, grey-scale, abstract art and the
second image of stereo pairs are left out), each downscaled to a short side of
PHOTO_SIDE pixels and stored as PNG with a manifest saying where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_SIDE = 448
DEBIAN = {
    "opencv-doc": ("usr/share/doc/opencv-doc/examples/data", [
        "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
        "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg",
        "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png",
        "squirrel_cls.jpg", "stuff.jpg"]),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds", ["Kleiber_by_Lukas_Baubkus.jpg"]),
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds", [
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg",
        "aitzgorri_by_Aitzol_Berasategi.jpg", "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg",
        "greentock_by_Peter_Nerlich.jpg", "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg"]),
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature", [
        "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg", "LadyBird.jpg",
        "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg"]),
    # Plasma wallpapers are folders with one image per resolution: the largest landscape one is taken.
    "plasma-workspace-wallpapers": ("usr/share/wallpapers", [
        "BytheWater", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Kite", "OneStandsOut", "Path",
        "Volna", "summer_1am"]),
}


def default_cache() -> Path:
    return Path(os.environ.get("QFTSIM_CACHE", Path.home() / ".cache" / "qftsim")) / "photos"


def bundled_photos():
    """Yield (name, source, RGB array) for the colour photos of scikit-image and scikit-learn.

    The stereo motorcycle pair is counted once (its left image)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        yield f"skimage-{name}", f"scikit-image:data.{name}()", getattr(data, name)()
    yield "skimage-motorcycle", "scikit-image:data.stereo_motorcycle()[0]", data.stereo_motorcycle()[0]
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images):
        yield f"sklearn-{Path(name).stem}", f"scikit-learn:load_sample_images():{Path(name).name}", image


def debian_photos(scratch: Path):
    """Yield (name, source, RGB array) for the listed files of the Debian packages, downloaded into `scratch`."""
    for package, (folder, files) in DEBIAN.items():
        print(f"fetching {package} ...", flush=True)
        fetch = subprocess.run(["apt-get", "download", package], cwd=scratch, capture_output=True, text=True)
        if fetch.returncode:
            raise SystemExit(f"apt-get download {package} failed:\n{fetch.stderr}")
        deb = next(scratch.glob(f"{package}_*.deb"))
        root = scratch / package
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        for file in files:
            path = root / folder / file
            if path.is_dir():
                images = [p for p in (path / "contents" / "images").iterdir() if "x" in p.stem]
                path = max(images, key=lambda p: _landscape_pixels(p.stem))
            with Image.open(path) as im:
                yield f"{package}-{Path(file).stem}", f"{package}:/{path.relative_to(root)}", np.asarray(
                    im.convert("RGB"))
        shutil.rmtree(root)
        deb.unlink()


def _landscape_pixels(stem: str) -> int:
    width, height = (int(v) for v in stem.split("x"))
    return width * height if width >= height else 0


def _store(folder: Path, name: str, image: np.ndarray) -> None:
    im = Image.fromarray(image)
    scale = PHOTO_SIDE / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
    tmp = folder / f".{name}.png"
    im.save(tmp)
    tmp.replace(folder / f"{name}.png")


def build_pool(cache: Path, bundled_only: bool = False) -> Path:
    """Write the photos and manifest.json into `cache` (skipping what is already there); return the folder."""
    cache.mkdir(parents=True, exist_ok=True)
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for name, source, image in bundled_photos():
        if name not in manifest:
            _store(cache, name, image)
            manifest[name] = source
    if not bundled_only and not any(k.startswith(tuple(DEBIAN)) for k in manifest):
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise SystemExit("apt-get and dpkg-deb are needed to fetch the Debian photo packages "
                             "(or pass --bundled-only)")
        with tempfile.TemporaryDirectory() as scratch:
            for name, source, image in debian_photos(Path(scratch)):
                _store(cache, name, image)
                manifest[name] = source
    tmp = cache / ".manifest.json"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(manifest_path)
    counts = {}
    for name in manifest:
        source = next((p for p in DEBIAN if name.startswith(p)), name.split("-")[0])
        counts[source] = counts.get(source, 0) + 1
    print(f"{len(manifest)} photos in {cache}: " + ", ".join(f"{n} from {s}" for s, n in counts.items()))
    return cache


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--bundled-only", action="store_true", help="only the scikit-image and scikit-learn photos")
    args = ap.parse_args()
    build_pool(args.cache, args.bundled_only)


if __name__ == "__main__":
    sys.exit(main())
