"""quantize(): float model + calibration data + profile -> IntModel, by rtn/mse/cle/bias correction or QFT.

QFT (Finkelstein et al., 2022) trains every quantization degree of freedom
of the QGraph jointly, by distillation from the float model on unlabeled
calibration data, starting from the best of the closed-form initialisations
(chosen by the distillation loss on the calibration data).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qftsim.capture import FGraph, FNode, capture, float_op, set_eval_mode
from qftsim.errors import QftsimError
from qftsim.profile import HardwareProfile, load_profile
from qftsim.qgraph import DOF_GROUPS, QGraph, _key, equalization_pairs

METHOD_PARTS = ("rtn", "mse", "cle", "bias_correction")
LOSSES = ("l2rel", "l2", "kl", "ce")
LR_UNITS = ("absolute", "step")
REPORT_SAMPLES = 32  # calibration samples behind the per-layer SQNR report
# samples per walk of the float graph for activation ranges: on EfficientNet-Lite0 at 224 px with 512 samples
# of data the process peaked at 1.6 GiB for rtn ranges; with all 256 range samples at once, its rtn method
# (ranges, loss, report) peaked at 4.9 GiB
RANGE_BATCH = 32
MSE_VALUES = 200_000  # values of each tensor behind its MSE range search
BIAS_CORRECTION_SAMPLES = 128  # enough for per-channel means
# samples per chunk of bias correction's walks: there, 3.4 GiB where all 128 at once in float64 took 10.6 GiB
BIAS_CORRECTION_CHUNK = 16


@dataclass
class QftConfig:
    """QFT's knobs (the ones Hailo's implementation exposes), with defaults."""

    epochs: int = 4
    dataset_size: int = 1024
    batch_size: int = 32
    # Rates in quantization steps with a warm-up: at absolute rates without warm-up, finetuning the MNIST
    # reference networks at W8A8 ended 2.6x to 14x above its start, since Adam's first step moves every DoF by
    # the full rate at once (the loss jumped 230x on that step; benchmarks/RESULTS.md, "QFT's default rates")
    learning_rate: float = 1e-2
    scale_lr_factor: float = 1.0  # log-scales and equalization factors: learning_rate x this, absolute
    weight_scale_lr_factor: float | None = None  # the weight scales' own factor (None: scale_lr_factor)
    # True: a weight scale trains as its channel's gain, carrying its integer weights along
    # (QGraph.hold_integer_weights); False: each of its steps also re-rounds them. None: True where weights
    # have 8 bits or more (EfficientNet-Lite0: better at 8 bits, worse at 4; benchmarks/RESULTS.md)
    weight_scales_as_gains: bool | None = None
    # "absolute": weights and biases move by about learning_rate per step (Adam). "step": in quantization
    # steps: a layer's weights by learning_rate x its mean weight step, its bias by learning_rate x its
    # output's scale, so one rate suits layers whose folded weights differ 100x in size (EfficientNet-Lite0)
    lr_unit: str = "step"
    warmup: float = 0.1  # the share of the steps over which the rate rises linearly from 0, before the cosine
    loss: str = "l2rel"
    # QFT's start: "best" tries every closed-form method (min-max or MSE ranges, with or without CLE, each with
    # and without bias correction) and keeps the one of lowest loss; a method name (e.g. "rtn+bias_correction")
    # starts from that one alone, skipping the search (most of QFT's set-up time on large networks)
    init: str = "best"
    # BRECQ-style reconstruction before the joint finetuning: block by block in order, this many Adam steps
    # that match each block's output to the float graph's, fed the quantized blocks before it (0: none).
    # Its rate is in quantization steps (weights, biases) and absolute for the log-scales
    reconstruction_steps: int = 0
    reconstruction_lr: float = 5e-2
    loss_layers: dict[str, float] = field(default_factory=dict)
    freeze: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    calibration_batches: int = 256  # samples used for ranges, bias correction and the exact loss

    def validate(self) -> None:
        if self.lr_unit not in LR_UNITS:
            raise QftsimError(f"lr_unit {self.lr_unit!r}; accepted: {', '.join(LR_UNITS)}")
        if self.loss not in LOSSES:
            raise QftsimError(f"loss {self.loss!r}; accepted: {', '.join(LOSSES)}")
        if self.init != "best":
            check_method(self.init, "init")
        bad = [g for g in self.freeze if g not in DOF_GROUPS]
        if bad:
            raise QftsimError(f"cannot freeze {bad[0]!r}; DoF groups: {', '.join(DOF_GROUPS)}")
        for key in ("epochs", "dataset_size", "batch_size", "reconstruction_steps"):
            if getattr(self, key) < (0 if key in ("epochs", "reconstruction_steps") else 1):
                raise QftsimError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.warmup < 1:
            raise QftsimError(f"warmup is a share of the steps in [0, 1), got {self.warmup}")
        for key in ("learning_rate", "scale_lr_factor", "weight_scale_lr_factor", "reconstruction_lr"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise QftsimError(f"{key} must be a finite rate >= 0, got {value}")
        if not -(2**63) <= self.seed < 2**64:  # what torch's generators take
            raise QftsimError(f"seed must be in [-2^63, 2^64), got {self.seed}")
        if self.weight_scales_as_gains not in (None, True, False):
            raise QftsimError("weight_scales_as_gains must be True, False or None, "
                              f"got {self.weight_scales_as_gains!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise QftsimError("device cuda requested but torch sees no CUDA device")


def quantize(model: nn.Module, calibration_data, profile, method: str = "qft", teacher_outputs=None, **knobs):
    """Quantize `model` for `profile`; returns (IntModel, report dict).

    method: "qft", or closed-form parts joined by "+": rtn, mse, cle, bias_correction
    (e.g. "cle+bias_correction"). knobs: the fields of QftConfig. teacher_outputs: the
    float model's outputs on the calibration data, if already at hand (saves that pass
    when one model is quantized several ways).
    """
    qgraph, report = quantize_graph(model, calibration_data, profile, method, teacher_outputs, **knobs)
    clock = time.perf_counter()
    int_model = qgraph.integerize()
    report["seconds"]["integerize"] = time.perf_counter() - clock
    return int_model, report


def quantize_graph(model: nn.Module, calibration_data, profile, method: str = "qft", teacher_outputs=None,
                   **knobs):
    """As quantize(), but returns the trained QGraph (evaluation mode) instead of its IntModel."""
    unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(QftConfig)})
    if unknown:
        raise QftsimError(f"unknown knob {unknown[0]!r}; accepted: "
                          f"{', '.join(f.name for f in dataclasses.fields(QftConfig))}")
    cfg = QftConfig(**knobs)
    cfg.validate()
    profile = load_profile(profile)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    data = calibration_set(calibration_data, cfg.dataset_size)
    torch.manual_seed(cfg.seed)
    fg = capture_checked(model, data)
    names = [n.name for n in fg.nodes]
    missing = [k for k in cfg.loss_layers if k not in names]
    if missing:
        raise QftsimError(f"loss layer {missing[0]!r} is not a node; nodes: {', '.join(names)}")
    if teacher_outputs is None:
        teacher = _teacher(model, data, cfg.batch_size, cfg.progress)
    else:
        teacher = torch.as_tensor(teacher_outputs).float()[: len(data)]
        if teacher.shape[0] != len(data):
            raise QftsimError(f"teacher_outputs has {teacher.shape[0]} rows for {len(data)} calibration samples")
    if not torch.isfinite(teacher).all():
        raise QftsimError(f"the float model's outputs on the calibration data are not finite (the data reaches "
                          f"{data.peak():.3g}: is it scaled as the model expects?)")
    seconds["capture"] = time.perf_counter() - clock
    report = {"method": method, "profile": profile.name, "seconds": seconds, "loss_curve": []}
    clock = time.perf_counter()
    # every closed-form baseline (min-max or MSE ranges, with or without CLE, each with and without bias
    # correction): which is best differs by network and profile (EfficientNet-Lite0 at 4-bit weights:
    # rtn+bias_correction and cle+bias_correction, far ahead of the MSE-range candidates)
    if method != "qft":
        bases, corrected = [method], False
    elif cfg.init == "best":  # each base also with bias correction
        bases, corrected = ["rtn", "mse"] + (["cle", "cle+mse"] if equalization_pairs(fg) else []), True
    else:
        bases, corrected = [cfg.init], False
    setup, stage = _stages(len(bases) * (2 + 2 * corrected), f"{method}: set-up", cfg.progress)
    inits = {}
    for base in bases:
        inits[base] = stage(f"{base} ranges", initialize, fg, profile, data, base, cfg)
        if corrected:  # the same ranges, then bias correction
            inits[f"{base}+bias_correction"] = stage(f"{base}+bias_correction", _bias_corrected, inits[base],
                                                     data[: cfg.calibration_batches])
    losses = {c: stage(f"{c} loss", evaluate_loss, q, data, teacher, cfg) for c, q in inits.items()}
    setup.close()
    if method == "qft":
        chosen = min(losses, key=losses.get)
        report.update(init_losses=losses, chosen_init=chosen)
        seconds["initialize"] = time.perf_counter() - clock
        clock = time.perf_counter()
        start, start_loss = inits[chosen], losses[chosen]
        if cfg.reconstruction_steps:
            start = copy.deepcopy(start)
            report["reconstruction"] = reconstruct_blocks(start, data, cfg)
            start_loss = report["reconstructed_loss"] = evaluate_loss(start, data, teacher, cfg)
        qg = copy.deepcopy(start)
        report["loss_curve"] = finetune(qg, data, teacher, cfg)
        finetuned_loss = report["final_loss"] = evaluate_loss(qg, data, teacher, cfg)
        report.update(start_loss=start_loss, finetuned_loss=finetuned_loss)
        if finetuned_loss > start_loss:  # never hand back worse than where finetuning started
            qg, report["final_loss"], report["kept_start"] = start, start_loss, True
        report["outcome"] = (f"QFT started from {chosen} (calibration loss {start_loss:.5g}); finetuning reached "
                             f"{finetuned_loss:.5g}: " + ("worse, so the start is returned" if report.get("kept_start")
                                                          else "kept"))
        if cfg.progress:
            print(report["outcome"])
        seconds["finetune"] = time.perf_counter() - clock
    else:
        qg, report["final_loss"] = inits[method], losses[method]
        seconds["initialize"] = time.perf_counter() - clock
    qg.eval()
    bar, stage = _stages(1, "per-layer report", cfg.progress)
    report["layers"] = stage("SQNR per layer", layer_report, qg, fg, data[:REPORT_SAMPLES])
    bar.close()
    return qg, report


def _stages(total: int, desc: str, enabled: bool):
    """A progress bar over `total` named stages, and `stage(name, work, *args)`, which runs one under its name."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)

    def stage(what: str, work, *args):
        bar.set_postfix_str(what, refresh=True)
        result = work(*args)
        bar.update(1)
        return result

    return bar, stage


# ---------------------------------------------------------------- data

class CalibrationSet:
    """Calibration samples held as given (uint8 pixels, say), made float32 model inputs a batch at a time by
    `transform` (None: the samples are the inputs): the float copy of all of them is never held (2048 crops at
    224 px: 0.3 GB as uint8, 1.2 GB as float32). Indexing (a slice, an index tensor) gives that float batch."""

    def __init__(self, samples, transform=None):
        self.samples = torch.from_numpy(samples) if isinstance(samples, np.ndarray) else samples
        self.transform = transform

    @staticmethod
    def of(data) -> CalibrationSet:
        """`data` itself if it is a CalibrationSet, else a tensor's or an ndarray's samples as inputs (unchecked)."""
        return data if isinstance(data, CalibrationSet) else CalibrationSet(data)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> torch.Tensor:
        part = self.samples[index]
        return (part if self.transform is None else self.transform(part)).float()

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self[:1].shape[1:])

    def subset(self, index) -> CalibrationSet:
        """These samples at `index` (a slice), still unconverted."""
        return CalibrationSet(self.samples[index], self.transform)

    def batches(self, size: int = 256):
        return (self[i:i + size] for i in range(0, len(self), size))

    def peak(self) -> float:
        """The largest |value| of the inputs (what error messages say about the data's scale)."""
        return max(float(b.abs().max()) for b in self.batches())


def calibration_set(data, limit: int | None = None) -> CalibrationSet:
    """A CalibrationSet of (at most `limit`) samples from a CalibrationSet, a tensor, an ndarray or an iterable of
    batches; rejects empty or non-finite data."""
    if isinstance(data, (np.ndarray, torch.Tensor, CalibrationSet)):
        data = CalibrationSet.of(data)
    else:
        try:
            batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
        except TypeError:
            raise QftsimError(f"calibration data must be a tensor, an ndarray, a CalibrationSet or an iterable of "
                              f"batches, got {type(data).__name__}") from None
        if not batches:
            raise QftsimError("calibration data is empty")
        data = CalibrationSet(torch.cat([torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b)
                                         for b in batches]))
    data = data.subset(slice(limit))
    if len(data) == 0 or data.samples.numel() == 0:
        raise QftsimError("calibration data is empty")
    if not all(torch.isfinite(b).all() for b in data.batches()):
        raise QftsimError("calibration data contains NaN or Inf")
    return data


def capture_checked(model: nn.Module, data: torch.Tensor | CalibrationSet) -> FGraph:
    """The model captured on (up to) two samples of `data`, after checking that it runs them at batch 1 and 2."""
    set_eval_mode(model)
    pair = data[:2] if len(data) > 1 else data[:1].expand(2, *data.shape[1:])
    for batch in (pair[:1], pair):
        try:
            with torch.no_grad():
                model(batch)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            if len(batch) == 1:
                raise QftsimError(f"the model rejects calibration data of shape {tuple(data.shape[1:])} "
                                  f"(batch first): {type(exc).__name__}: {first_line}") from None
            raise QftsimError(f"the model runs one sample but not a batch of two ({type(exc).__name__}: "
                              f"{first_line}): a batch size is baked into it (a torch.export program exported "
                              "at batch 1 with a view/reshape); export it with a dynamic batch: "
                              "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))"
                              ", or reshape with x.flatten(1)") from None
    return capture(model, pair)


@torch.no_grad()
def _teacher(model: nn.Module, data: CalibrationSet, batch: int, progress: bool = False) -> torch.Tensor:
    from tqdm import tqdm

    starts = tqdm(range(0, len(data), batch), desc="float model's outputs", disable=not progress, leave=False)
    return torch.cat([model(data[i:i + batch]) for i in starts]).float()


def _bias_corrected(qg: QGraph, data: torch.Tensor) -> QGraph:
    corrected = copy.deepcopy(qg)
    correct_biases(corrected, corrected.fg, data)
    return corrected


# ---------------------------------------------------------------- initialisation

def initialize(fg: FGraph, profile: HardwareProfile, data: CalibrationSet, method: str, cfg: QftConfig) -> QGraph:
    """A QGraph set up by closed-form methods: rtn (min-max), mse ranges, cle, bias_correction."""
    parts = check_method(method)
    fg = copy.deepcopy(fg)
    if "cle" in parts:
        equalize(fg)
    qg = QGraph(fg, profile)
    sample = data[: cfg.calibration_batches]
    ranges = "mse" if "mse" in parts else "minmax"
    set_activation_ranges(qg, fg, sample, ranges)
    set_weight_scales(qg, ranges)
    if "bias_correction" in parts:
        correct_biases(qg, fg, sample)
    qg.eval()
    return qg


def check_method(method: str, what: str = "method") -> list[str]:
    """The parts of a closed-form method name ("cle+bias_correction"), or a clear error."""
    parts = method.split("+")
    bad = [p for p in parts if p not in METHOD_PARTS]
    if bad:
        use = "qft or parts" if what == "method" else "best or parts"
        raise QftsimError(f"unknown {what} {bad[0]!r}; use {use} of {', '.join(METHOD_PARTS)} joined by +")
    return parts


def equalize(fg: FGraph) -> None:
    """Closed-form cross-layer equalization (Nagel et al. DFQ): equal per-channel ranges across each pair."""
    for consumer_name, producer_name in equalization_pairs(fg).items():
        producer, consumer = fg.node(producer_name), fg.node(consumer_name)
        r1 = producer.weight.abs().flatten(1).amax(1)
        wc = consumer.weight
        r2 = (wc.abs().flatten(1).amax(1) if consumer.attrs["groups"] > 1
              else wc.abs().transpose(0, 1).flatten(1).amax(1))
        e = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-12)), torch.ones_like(r1))
        producer.weight = producer.weight / e.view(-1, *([1] * (producer.weight.dim() - 1)))
        producer.bias = producer.bias / e
        shape = (-1, 1, 1, 1) if consumer.attrs["groups"] > 1 else (1, -1, 1, 1)
        consumer.weight = consumer.weight * e.view(shape)


@torch.no_grad()
def set_weight_scales(qg: QGraph, ranges: str) -> None:
    """Per-channel (or per-tensor) weight steps by min-max or MSE, never so small that the bias overflows.

    A channel whose weights are (near) zero still needs its bias: the step is
    kept at least |bias| / (input step * largest bias integer), the bias taking
    at most a quarter of the accumulator so that products still fit beside it.
    Activation ranges must be set first."""
    w_spec = qg.profile.weights
    bias_max = min(-qg.bias_range()[0], qg.bias_range()[1], qg.profile.accumulator.range[1] // 4)
    qmax = w_spec.qmax
    for n in qg.fg.nodes:
        if n.kind not in ("conv", "linear"):
            continue
        w = qg.effective_weight(n).detach().double().flatten(1)
        if not w_spec.per_channel:
            w = w.reshape(1, -1)
        peak = w.abs().amax(1).clamp(min=1e-12)
        scale = peak / qmax
        if ranges == "mse":
            best_err = torch.full_like(peak, math.inf)
            for ratio in np.linspace(0.5, 1.0, 11):
                step = (peak * ratio / qmax).view(-1, 1)
                err = ((w - torch.clamp(torch.round(w / step), w_spec.qmin, qmax) * step) ** 2).sum(1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                scale = torch.where(better, step.view(-1), scale)
        bias_floor = qg.bias[_key(n.name)].double().abs() / (float(qg.act_scale(n.inputs[0])) * bias_max)
        scale = torch.maximum(scale, bias_floor if w_spec.per_channel else bias_floor.max().reshape(1))
        qg.log_weight_scale[_key(n.name)].copy_(scale.log().float())


@torch.no_grad()
def set_activation_ranges(qg: QGraph, fg: FGraph, data: torch.Tensor, ranges: str) -> None:
    """Min-max or MSE ranges of every quantized tensor, from walks (FGraph.stream) of the float graph over
    `data` in batches of RANGE_BATCH samples, so that memory does not grow with the sample count. MSE ranges
    search a fixed-seed sample of MSE_VALUES values of each tensor, drawn evenly from the batches."""
    lows, highs, picked = {}, {}, {}
    starts = range(0, len(data), RANGE_BATCH)
    per_batch = -(-MSE_VALUES // len(starts))
    generator = torch.Generator().manual_seed(0)
    for start in starts:
        for node, _, out in fg.stream(data[start:start + RANGE_BATCH]):
            name = node.name
            values = out.reshape(-1)
            if qg.quant_source[name] != name or not values.numel():
                continue
            lo, hi = (float(v) for v in torch.aminmax(values))
            lows[name], highs[name] = min(lo, lows.get(name, lo)), max(hi, highs.get(name, hi))
            if ranges == "mse":
                picks = torch.randint(values.numel(), (per_batch,), generator=generator)
                picked.setdefault(name, []).append(values[picks].double())
    for name in (n.name for n in fg.nodes if qg.quant_source[n.name] == n.name):
        lo, hi = lows.get(name, 0.0), highs.get(name, 0.0)
        if name in picked:
            sample = torch.cat(picked[name])
            best = None
            for ratio in np.linspace(0.3, 1.0, 15):
                qg.set_act_range(name, lo * ratio, hi * ratio)
                q = qg.tensor_quant(name)
                err = float(((sample - torch.from_numpy(q.dequantize(q.quantize(sample.numpy())))) ** 2).mean())
                if best is None or err < best[0]:
                    best = (err, ratio)
            lo, hi = lo * best[1], hi * best[1]
        qg.set_act_range(name, lo, hi)


@torch.no_grad()
def correct_biases(qg: QGraph, fg: FGraph, x: torch.Tensor) -> None:
    """Empirical bias correction: per layer in order, move the bias by the mean pre-activation error.

    Streamed, so that memory does not grow with the sample count: the float and the quantized tensors of all
    samples are held (in float32) only where one tensor is live (`reconstruction_segments` with one layer);
    within such a segment each layer's error is summed over chunks of BIAS_CORRECTION_CHUNK samples, the
    segment's nodes before the layer recomputed per chunk with the corrections made so far."""
    qg.eval()
    x = x[:BIAS_CORRECTION_SAMPLES]
    first = fg.nodes[0].name
    real, exact = {first: x.float()}, {first: torch.cat([qg.quantize_input(b).float() for b in x.split(64)])}
    for segment in reconstruction_segments(fg, min_layers=1):
        for index, n in enumerate(segment):
            if n.kind in ("conv", "linear"):
                _correct_bias(qg, n, segment[:index], real, exact)
        out = segment[-1].name
        real, exact = ({out: _run_segment(segment, real, float_op, torch.float64, BIAS_CORRECTION_CHUNK)},
                       {out: _run_segment(segment, exact, qg.node_forward, torch.float64, BIAS_CORRECTION_CHUNK)})


def _correct_bias(qg: QGraph, n: FNode, before: list[FNode], real: dict, exact: dict) -> None:
    """Move n's bias by the mean difference of its float and quantized pre-activations, from the segment's
    inputs `real` (float) and `exact` (integers) through the nodes `before` it."""
    plain = dataclasses.replace(n, act=None)
    quantized_w = qg.int_weight(n).double() * qg.weight_scale(n).double().view(-1, *([1] * (n.weight.dim() - 1)))
    step = (qg.act_scale(n.inputs[0]) * qg.weight_scale(n)).double()
    quantized = dataclasses.replace(plain, weight=quantized_w, bias=qg.int_bias(n).double() * step)
    count = len(next(iter(real.values())))
    error, values = 0.0, 0
    for start in range(0, count, BIAS_CORRECTION_CHUNK):
        part = slice(start, start + BIAS_CORRECTION_CHUNK)
        real_env = {name: t[part].double() for name, t in real.items()}
        exact_env = {name: t[part].double() for name, t in exact.items()}
        if before:
            _segment_output(before, real_env, float_op)
            _segment_output(before, exact_env, qg.node_forward)
        real_in = qg.dequantize(n.inputs[0], exact_env[n.inputs[0]])
        difference = float_op(plain, [real_env[n.inputs[0]]]) - float_op(quantized, [real_in])
        error = error + difference.sum([0] + list(range(2, difference.dim())))
        values += difference.numel() // difference.shape[1]
    qg.bias[_key(n.name)] += (error / values).float()


# ---------------------------------------------------------------- QFT

def loss_fn(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    student, teacher = student.float(), teacher.float()
    if kind == "l2rel":
        dims = tuple(range(1, teacher.dim()))
        return (((student - teacher) ** 2).sum(dims) / (teacher**2).sum(dims).clamp(min=1e-12)).mean()
    if kind == "l2":
        return F.mse_loss(student, teacher)
    if kind == "kl":
        return F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean")
    return F.cross_entropy(student, teacher.argmax(1))


def exact_batches(qg: QGraph, x: torch.Tensor, keep: tuple[str, ...] = (), batch: int = 64):
    """Yield, per batch of `batch` inputs `x`, the evaluation-mode graph's real output and its `keep` tensors by
    name, in float64.

    Computed by the simulator on the integerized graph: the same values (the
    consistency contract), several times faster than the graph's own float64
    evaluation on large networks."""
    from qftsim.sim import AccumulatorOverflowWarning, simulate

    model = qg.integerize()
    out_name = model.outputs[0]
    for i in range(0, len(x), batch):
        q = model.inputs[0].quant.quantize(x[i:i + batch].detach().cpu().numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccumulatorOverflowWarning)
            result = simulate(model, q, keep_tensors=bool(keep))
        yield (torch.from_numpy(model.quant_of(out_name).dequantize(result.outputs[out_name])),
               {k: torch.from_numpy(model.quant_of(k).dequantize(result.tensors[k])) for k in keep})


def evaluate_loss(qg: QGraph, data: CalibrationSet, teacher: torch.Tensor, cfg: QftConfig) -> float:
    """The distillation loss of the exact (evaluation-mode) graph on the first calibration_batches samples."""
    n = cfg.calibration_batches
    out = torch.cat([out for out, _ in exact_batches(qg, data[:n])])
    return float(loss_fn(cfg.loss, out, teacher[:n].cpu()))


def finetune(qg: QGraph, data, teacher: torch.Tensor, cfg: QftConfig) -> list[float]:
    """Train every unfrozen DoF group jointly (Adam, cosine schedule) on `data` (a CalibrationSet or a tensor);
    returns the loss per step."""
    import torch.distributed as dist

    data = CalibrationSet.of(data)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:  # data parallel: each rank trains on its shard, gradients are averaged
        rank, world = dist.get_rank(), dist.get_world_size()
        data, teacher = data.subset(slice(rank, None, world)), teacher[rank::world]
    device = torch.device(cfg.device)
    qg.to(device)
    teacher = teacher.to(device)
    param_groups = _param_groups(qg, cfg)
    if not param_groups or cfg.epochs == 0:
        return []
    _train_only(qg, param_groups)
    _train_scales_as(qg, cfg)
    optimizer = torch.optim.Adam(param_groups)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    schedule = _cosine(optimizer, total, cfg.warmup)
    generator = torch.Generator().manual_seed(cfg.seed)
    curve = []
    qg.train()
    from tqdm import tqdm

    # the bar shows this epoch's mean of the output loss: the function of the printed calibration losses
    bar = tqdm(total=total, desc="QFT", disable=not cfg.progress, leave=False)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data), generator=generator)
        output_losses = []
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = data[idx].to(device)
            out, inner = qg(x, keep=tuple(cfg.loss_layers))
            loss = loss_fn(cfg.loss, out, teacher[idx.to(device)])
            output_losses.append(float(loss.detach()))
            for layer, target in layer_targets(qg.fg, x, cfg.loss_layers).items():
                loss = loss + cfg.loss_layers[layer] * loss_fn("l2rel", inner[layer], target)
            if not torch.isfinite(loss):
                bar.close()
                raise QftsimError(f"QFT step {len(curve) + 1} of {total}: the loss is {float(loss)} (not finite); "
                                  f"the calibration data reaches {data.peak():.3g}: is it scaled as "
                                  "the model expects?")
            optimizer.zero_grad()
            loss.backward()
            if distributed:
                for group in param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= dist.get_world_size()
            _step(qg, optimizer, schedule)
            curve.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix_str(f"{cfg.loss} loss {sum(output_losses) / len(output_losses):.4g} (epoch mean)")
    bar.close()
    qg.eval()
    qg.to("cpu")
    return curve


def reconstruction_segments(fg: FGraph, min_layers: int = 3) -> list[list[FNode]]:
    """The nodes after the input cut into blocks: each ends where its output is the only tensor that later
    nodes read and holds at least `min_layers` conv/linear nodes; the last block ends at the output."""
    last_use = fg.last_uses()
    live = {fg.nodes[0].name}
    segments, current = [], []
    for i, n in enumerate(fg.nodes[1:], 1):
        current.append(n)
        live = {s for s in live | {n.name} if last_use.get(s, -1) > i}
        if live == {n.name} and sum(m.kind in ("conv", "linear") for m in current) >= min_layers:
            segments.append(current)
            current = []
    return segments + ([current] if current else [])


def reconstruct_blocks(qg: QGraph, data, cfg: QftConfig) -> list[dict]:
    """Block-wise reconstruction (BRECQ, Li et al. 2021): for each block in order, train its unfrozen DoFs
    so that its output, fed the exact outputs of the blocks before it, matches the float graph's (l2rel).

    A block sees whole feature maps as targets, more signal per calibration image than the network's
    output (on EfficientNet-Lite0 at 4-bit weights it helped on a selection run and not on the full one:
    benchmarks/RESULTS.md). Every process of a data-parallel run does the same work on all the data, so
    they agree without communicating. Returns each block's last node and its first and last step's loss."""
    rates = dataclasses.replace(cfg, learning_rate=cfg.reconstruction_lr, lr_unit="step", scale_lr_factor=1.0,
                                weight_scale_lr_factor=None)
    device = torch.device(cfg.device)
    nodes = qg.fg.nodes
    qg.eval()
    data = CalibrationSet.of(data)
    with torch.no_grad():
        exact = {nodes[0].name: torch.cat([qg.quantize_input(b).float() for b in data.batches(64)])}
    real = {nodes[0].name: data[:]}
    generator = torch.Generator().manual_seed(cfg.seed)
    segments = reconstruction_segments(qg.fg)
    from tqdm import tqdm

    bar = tqdm(total=len(segments) * cfg.reconstruction_steps, desc="reconstruction", disable=not cfg.progress,
               leave=False)
    rows = []
    for segment in segments:
        out = segment[-1].name
        target = _run_segment(segment, real, float_op, torch.float32)
        param_groups = _param_groups(qg, rates, segment)
        _train_only(qg, param_groups)
        _train_scales_as(qg, cfg)
        curve = []
        if param_groups:
            optimizer = torch.optim.Adam(param_groups)
            schedule = _cosine(optimizer, cfg.reconstruction_steps)
            qg.to(device).train()
            for _ in range(cfg.reconstruction_steps):
                idx = torch.randint(len(data), (cfg.batch_size,), generator=generator)
                got = _segment_output(segment, {name: t[idx].to(device) for name, t in exact.items()},
                                      qg.node_forward)
                loss = loss_fn("l2rel", qg.dequantize(out, got), target[idx].to(device))
                optimizer.zero_grad()
                loss.backward()
                _step(qg, optimizer, schedule)
                curve.append(float(loss.detach()))
                bar.update(1)
            qg.eval().to("cpu")
        with torch.no_grad():
            real = {out: target}
            exact = {out: _run_segment(segment, exact, qg.node_forward, torch.float64)}
        rows.append({"block": out, "first_loss": curve[0] if curve else None,
                     "last_loss": curve[-1] if curve else None})
    bar.close()
    for p in qg.parameters():
        p.requires_grad_(True)
    return rows


def _train_scales_as(qg: QGraph, cfg: QftConfig) -> None:
    """Whether `qg` trains its weight scales as gains (QftConfig.weight_scales_as_gains)."""
    gains = cfg.weight_scales_as_gains
    qg.weight_scales_as_gains = qg.profile.weights.bits >= 8 if gains is None else gains


def _step(qg: QGraph, optimizer: torch.optim.Optimizer, schedule) -> None:
    """One optimizer and schedule step; weight scales that train as gains carry their integer weights along."""
    steps = qg.weight_steps() if qg.weight_scales_as_gains else None
    optimizer.step()
    schedule.step()
    if steps is not None:
        qg.hold_integer_weights(steps)


def _cosine(optimizer: torch.optim.Optimizer, total: int, warmup: float = 0.0):
    """The learning rate decayed from its initial value to 0 over `total` steps along half a cosine, its first
    `warmup` share of steps scaled by a linear rise from 0 (Adam's early steps are sign-like: each DoF moves by
    the full rate whatever its gradient's size)."""
    rise = max(1, round(warmup * total))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / rise) * 0.5 * (1 + math.cos(math.pi * s / total)))


def _run_segment(segment: list[FNode], env: dict[str, torch.Tensor], op, dtype, chunk: int = 64) -> torch.Tensor:
    """The segment's last output by op(node, inputs) over all samples, in chunks computed in `dtype` and
    stored in float32 (integers of up to 24 bits are exact there)."""
    count = len(next(iter(env.values())))
    return torch.cat([_segment_output(segment, {name: t[i:i + chunk].to(dtype) for name, t in env.items()}, op).float()
                      for i in range(0, count, chunk)])


def _segment_output(segment: list[FNode], env: dict[str, torch.Tensor], op) -> torch.Tensor:
    """The last output of `segment`, each node computed by op(node, inputs) from `env` (which it extends)."""
    for n in segment:
        env[n.name] = op(n, [env[s] for s in n.inputs])
    return env[segment[-1].name]


@torch.no_grad()
def _param_groups(qg: QGraph, cfg: QftConfig, nodes=None) -> list[dict]:
    """Adam's parameter groups, one per parameter: every unfrozen DoF of `nodes` (default: the whole graph)
    at its learning rate (QftConfig.lr_unit)."""
    step = cfg.lr_unit == "step"
    scale_lr = cfg.learning_rate * cfg.scale_lr_factor
    weight_scale_lr = scale_lr if cfg.weight_scale_lr_factor is None else cfg.learning_rate * cfg.weight_scale_lr_factor
    groups = []

    def add(dof: str, param: nn.Parameter, lr: float) -> None:
        if dof not in cfg.freeze:
            groups.append({"params": [param], "lr": lr})

    for n in qg.fg.nodes if nodes is None else nodes:
        k = _key(n.name)
        if n.kind in ("conv", "linear"):
            add("weights", qg.weight[k], cfg.learning_rate * (float(qg.weight_scale(n).mean()) if step else 1.0))
            add("biases", qg.bias[k], cfg.learning_rate * (float(qg.act_scale(n.name)) if step else 1.0))
            add("weight_scales", qg.log_weight_scale[k], weight_scale_lr)
        if qg.quant_source[n.name] == n.name:
            add("act_scales", qg.log_act_scale[k], scale_lr)
        if k in qg.log_equalization:
            add("equalization", qg.log_equalization[k], scale_lr)
    return groups


def _train_only(qg: QGraph, param_groups: list[dict]) -> None:
    """Gradients for the parameters in `param_groups` and for nothing else."""
    chosen = {id(p) for g in param_groups for p in g["params"]}
    for p in qg.parameters():
        p.requires_grad_(id(p) in chosen)


@torch.no_grad()
def layer_targets(fg: FGraph, x: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    """The float graph's tensors named in `layers` for batch x: computed per batch, since holding
    them for the whole calibration set can take more memory than the machine has."""
    if not layers:
        return {}
    return {n.name: out for n, _, out in fg.stream(x) if n.name in layers}


# ---------------------------------------------------------------- report

@torch.no_grad()
def layer_report(qg: QGraph, fg: FGraph, x: torch.Tensor, batch: int = 8) -> list[dict]:
    """Per quantized tensor: SQNR of the exact integer graph vs float over `x`, and its scale.

    Streamed in batches of `batch` samples: every tensor of a large network for all of `x` at once (float and
    integer) took 3.5 GiB on EfficientNet-Lite0 at 224 px with 32 samples."""
    qg.eval()
    names = tuple(n.name for n in fg.nodes[1:] if qg.quant_source[n.name] == n.name)
    signal, noise = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for start, (_, exact) in zip(range(0, len(x), batch), exact_batches(qg, x, keep=names, batch=batch)):
        for n, _, real in fg.stream(x[start:start + batch].double()):
            if n.name in exact:
                signal[n.name] += float((real**2).sum())
                noise[n.name] += float(((real - exact.pop(n.name)) ** 2).sum())
    rows = []
    for n in fg.nodes[1:]:
        if n.name not in signal:
            continue
        sqnr = 10 * math.log10(signal[n.name] / noise[n.name]) if noise[n.name] > 0 else math.inf
        row = {"name": n.name, "kind": n.kind, "sqnr_db": sqnr,
               "act_scale": float(qg.act_scale(n.name)), "zero_point": qg.zero_points[n.name]}
        if n.kind in ("conv", "linear"):
            ws = qg.weight_scale(n).detach()
            row.update(weight_scale_min=float(ws.min()), weight_scale_max=float(ws.max()))
        rows.append(row)
    return rows
