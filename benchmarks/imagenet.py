"""EfficientNet-Lite quantized per method, scored on labelled ImageNet images against float.

    python benchmarks/imagenet.py --images ../shared/imagenet-samples             # the full table
    python benchmarks/imagenet.py --images DIR --profiles npu-a8w4 --methods qft  # one row
    python benchmarks/imagenet.py --images DIR --quick                            # fewer crops and steps
    python benchmarks/imagenet.py --images DIR --smoke                            # the test: a few of each

DIR holds images and a `labels.tsv` with (at least) the columns `file` and `class_index` (the standard
ImageNet class index), as ../shared/imagenet-samples does; an ImageNet validation folder arranged the same
way works too. A fixed seed splits it into --calibration images (used unlabelled) and the rest for
evaluation. Evaluation: the short side resized to crop / 0.875 (256 for Lite0's 224) bicubic, the centre
crop, the network's [-1, 1] scaling. Calibration: --crops random resized crops with flips of the calibration
images only.

Per profile and method: labelled top-1 and top-5, top-1 agreement with float, mean KL(float || quantized),
and the method's wall time, all from the simulator's integers; for QFT the eval-mode QGraph and the
TVM-compiled model run too and must give identical integers. --ablations adds QFT with each DoF group
frozen in turn. The process's peak resident memory is printed after each row.

QFT's settings here are those that did best on this network in the photo benchmark this one replaced (see
RESULTS.md's history): the KL loss, block-output losses of weight 100, rates in quantization steps with the
scales at a tenth, batch 16, each crop seen once, the start chosen among every closed-form method.
"""

from __future__ import annotations

import argparse
import csv
import platform
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qftsim.efficientnet import VARIANTS, efficientnet_lite
from qftsim.qft import CalibrationSet, quantize_graph
from qftsim.qgraph import DOF_GROUPS
from qftsim.sim import simulate

BASELINES = ("rtn", "mse", "cle+bias_correction")
EVAL_BATCH = 32
CHECK_BATCH = 16  # the eval-mode QGraph runs in float64: 32 images of 224 px peaked at 3.5 GiB


def load_labelled(folder: Path) -> list[tuple[Path, int]]:
    """(image path, class index) for every row of folder/labels.tsv, in file order; a clear error otherwise."""
    table = folder / "labels.tsv"
    if not table.is_file():
        raise SystemExit(f"{folder}: no labels.tsv (columns file and class_index, tab-separated)")
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"file", "class_index"} <= set(rows[0]):
        raise SystemExit(f"{table}: needs the columns file and class_index")
    items = [(folder / r["file"], int(r["class_index"])) for r in rows]
    missing = [p.name for p, _ in items if not p.is_file()]
    if missing:
        raise SystemExit(f"{table}: {len(missing)} files named there are missing, e.g. {missing[0]}")
    return items


def split(items: list, calibration: int, seed: int = 0) -> tuple[list, list]:
    """A fixed-seed split into `calibration` items and the rest."""
    if not 0 < calibration < len(items):
        raise SystemExit(f"--calibration {calibration}: the folder has {len(items)} images; "
                         "both the calibration and the evaluation share need at least one")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[:calibration]], [items[i] for i in order[calibration:]]


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def center_crop(image: Image.Image, crop: int) -> np.ndarray:
    """The short side resized to crop / 0.875 (bicubic), then the centre crop x crop, as uint8 HWC."""
    short = round(crop / 0.875)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def random_crops(images: list[Image.Image], count: int, crop: int, seed: int,
                 scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """`count` random resized crops with random flips (images taken in turn), as uint8 (N, crop, crop, 3)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, crop, crop, 3), dtype=np.uint8)
    for i in range(count):
        image = images[i % len(images)]
        w, h = image.size
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*np.log(ratio)))
        ch, cw = min(h, round(np.sqrt(area / aspect))), min(w, round(np.sqrt(area * aspect)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        piece = np.asarray(image.crop((left, top, left + cw, top + ch)).resize((crop, crop), Image.BICUBIC))
        out[i] = piece[:, ::-1] if rng.random() < 0.5 else piece
    return out


def as_input(pixels) -> torch.Tensor:
    """uint8 (N, H, W, 3) to the network's (N, 3, H, W) floats in [-1, 1]."""
    return torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def batched(fn, pixels: np.ndarray, batch: int = EVAL_BATCH) -> torch.Tensor:
    """fn over uint8 images in batches (converted per batch: the float copy of all of them is never held)."""
    return torch.cat([torch.as_tensor(fn(as_input(pixels[i:i + batch]))).double()
                      for i in range(0, len(pixels), batch)])


def scores(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Labelled top-1 / top-5, top-1 agreement with the float `reference` logits, mean KL(float || these)."""
    p_ref = reference.double().softmax(1)
    top5 = logits.topk(5, 1).indices
    kl = (p_ref * (p_ref.clamp_min(1e-30).log() - logits.double().log_softmax(1))).sum(1)
    return {"top1": float((top5[:, 0] == labels).double().mean()),
            "top5": float((top5 == labels[:, None]).any(1).double().mean()),
            "agree": float((top5[:, 0] == reference.argmax(1)).double().mean()),
            "kl": float(kl.mean())}


def integer_outputs(model, pixels: np.ndarray, run) -> torch.Tensor:
    """The model's integer output for the images, by `run(model, quantized batch) -> integers`."""
    quant_in = model.inputs[0].quant
    return batched(lambda b: run(model, quant_in.quantize(b.numpy())), pixels)


def simulator(model, q: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return simulate(model, q).outputs[model.outputs[0]]


def peak_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def block_outputs(net, factor: float) -> dict[str, float]:
    """{tensor name: factor / count} for every inverted-residual block's output and the head (the captured
    graph's names: a block's output is the residual add, or its projection where no add ends the block)."""
    if not factor:
        return {}
    from qftsim.capture import capture

    fg = capture(net, torch.zeros(2, 3, net.image_size, net.image_size))
    outs = [n.name for n in fg.nodes if n.kind == "add" or n.name.endswith("_project_conv") and not all(
        c.kind == "add" for c in fg.consumers(n.name))] + ["_conv_head"]
    return {name: factor / len(outs) for name in outs}


def exactness_check(qg, model, pixels: np.ndarray, simulated: torch.Tensor, target: str | None) -> str:
    """The eval-mode QGraph (and the compiled model, unless target is None) on the evaluation images: integers
    equal to the simulator's, or the run stops."""
    eval_mode = batched(lambda b: qg.run_integers(b)[qg.fg.output], pixels, batch=CHECK_BATCH)
    if not torch.equal(eval_mode, simulated):
        raise SystemExit("eval-mode QGraph differs from the simulator: the consistency contract is broken")
    said = "eval-mode == simulator"
    if target is None:
        return said
    import export

    compiled = export.compile_model(model, target)
    compiled_ints = integer_outputs(model, pixels, lambda m, q: compiled.run(q)[m.outputs[0]])
    if not torch.equal(compiled_ints, simulated):
        raise SystemExit("the compiled model differs from the simulator")
    return said + " == compiled"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True, help="a folder of images with labels.tsv")
    ap.add_argument("--network", default="lite0", choices=sorted(VARIANTS), help="the EfficientNet-Lite variant")
    ap.add_argument("--profiles", default="npu-a8w4,int8-default,litert-xnnpack")
    ap.add_argument("--methods", default=",".join(BASELINES + ("qft",)))
    ap.add_argument("--ablations", action="store_true", help="also QFT with each DoF group frozen in turn")
    ap.add_argument("--calibration", type=int, default=512, help="calibration images (the rest evaluate)")
    ap.add_argument("--crops", type=int, default=2048, help="calibration crops made from them")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=2e-3, help="QFT's rate, in quantization steps")
    ap.add_argument("--scale-lr-factor", type=float, default=0.1, help="scales' rate / --learning-rate")
    ap.add_argument("--block-loss", type=float, default=100.0,
                    help="also this factor times l2rel on each block's output, divided by the block count")
    ap.add_argument("--init", default="best", help="QFT's start: best (every closed-form method), or one")
    ap.add_argument("--seed", type=int, default=0, help="QFT's seed (the order of its batches)")
    ap.add_argument("--compile-target", default="x86-64", choices=["host", "x86-64", "none"],
                    help="the TVM target of QFT's compiled check (none: skip compiling)")
    ap.add_argument("--save", type=Path, metavar="DIR", help="write each model as DIR/PROFILE-METHOD.qft")
    ap.add_argument("--quick", action="store_true", help="128 calibration images, 512 crops")
    ap.add_argument("--smoke", action="store_true",
                    help="4 calibration images, 8 crops, int8-default, init rtn, the compiled check (the test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.calibration, args.crops = 128, 512
    if args.smoke:
        args.calibration, args.crops, args.profiles, args.init, args.batch_size = 4, 8, "int8-default", "rtn", 4
    torch.manual_seed(0)
    items = load_labelled(args.images)
    calibration_items, evaluation_items = split(items, args.calibration)
    net = efficientnet_lite(args.network)
    crop = net.image_size
    clock = time.perf_counter()
    calib = random_crops([rgb(p) for p, _ in calibration_items], args.crops, crop, seed=1)
    evaluation = np.stack([center_crop(rgb(p), crop) for p, _ in evaluation_items])
    labels = torch.tensor([c for _, c in evaluation_items])
    load_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    teacher_calib = batched(net, calib).float()
    teacher_eval = batched(net, evaluation)
    teacher_seconds = time.perf_counter() - clock
    print(f"# EfficientNet-{args.network.title()} at {crop}x{crop}, {platform.machine()} {torch.get_num_threads()} "
          f"threads; {args.images.name}: {len(calibration_items)} calibration images -> {args.crops} crops, "
          f"{len(evaluation_items)} evaluation images; QFT: {args.epochs} epochs, loss kl, lr {args.learning_rate:g} "
          f"in steps (scales x{args.scale_lr_factor:g}), batch {args.batch_size}, block loss {args.block_loss:g}, "
          f"init {args.init}, seed {args.seed}; images loaded in {load_seconds:.0f} s, float teacher "
          f"{teacher_seconds:.0f} s")
    profiles = args.profiles.split(",")
    width = max(len("profile"), *map(len, profiles))
    header = f"{'profile':{width}s} {'method':26s} {'top1':>6s} {'top5':>6s} {'agree':>6s} {'KL':>7s} {'seconds':>7s}"
    print(header + f" {'peak GiB':>8s}  check")
    float_scores = scores(teacher_eval, teacher_eval, labels)
    print(f"{'float':{width}s} {'':26s} {float_scores['top1']:6.3f} {float_scores['top5']:6.3f} "
          f"{float_scores['agree']:6.3f} {0.0:7.4f}", flush=True)
    methods = args.methods.split(",") + ([f"qft-freeze-{g}" for g in DOF_GROUPS] if args.ablations else [])
    loss_layers = block_outputs(net, args.block_loss)
    calib_input = CalibrationSet(calib, as_input)  # converted a batch at a time
    for profile in profiles:
        for method in methods:
            knobs = {"progress": False, "epochs": args.epochs, "dataset_size": args.crops, "loss": "kl",
                     "learning_rate": args.learning_rate, "scale_lr_factor": args.scale_lr_factor,
                     "batch_size": args.batch_size, "loss_layers": loss_layers, "init": args.init, "seed": args.seed}
            if method.startswith("qft-freeze-"):
                knobs["freeze"] = (method[len("qft-freeze-"):],)
            clock = time.perf_counter()
            qg, report = quantize_graph(net, calib_input, profile, "qft" if method.startswith("qft") else method,
                                        teacher_outputs=teacher_calib, **knobs)
            model = qg.integerize()
            seconds = time.perf_counter() - clock
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                model.save(args.save / f"{profile}-{method}.qft")
            ints = integer_outputs(model, evaluation, simulator)
            check = ""
            if method == "qft":
                check = exactness_check(qg, model, evaluation, ints,
                                        None if args.compile_target == "none" else args.compile_target)
            logits = torch.from_numpy(model.node(model.outputs[0]).quant.dequantize(ints.numpy()))
            s = scores(teacher_eval, logits, labels)
            print(f"{profile:{width}s} {method:26s} {s['top1']:6.3f} {s['top5']:6.3f} {s['agree']:6.3f} "
                  f"{s['kl']:7.4f} {seconds:7.0f} {peak_gib():8.2f}  {check}", flush=True)
            if "chosen_init" in report:
                split_seconds = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
                print(f"#   {report['outcome']}; {len(report['loss_curve'])} steps; time: {split_seconds}", flush=True)


if __name__ == "__main__":
    main()
