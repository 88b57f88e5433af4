"""A report folder: PNG plots and a one-page Markdown summary that links them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qftsim.profile import HardwareProfile
from qftsim.sim import LayerReport, format_report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(folder: str | Path, profile: HardwareProfile, reports: dict[str, dict],
                 accumulators: list[LayerReport], summary_rows: list[tuple[str, str]],
                 data: str = "held-out data") -> Path:
    """Write plots and summary.md into `folder`; `reports` maps a method name to quantize()'s report;
    `data` says which inputs the accumulator table was measured on."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    images = []

    # per-layer SQNR of each method against float
    fig, ax = plt.subplots(figsize=(9, 4))
    for method, rep in reports.items():
        rows = rep["layers"]
        ax.plot(range(len(rows)), [min(r["sqnr_db"], 80) for r in rows], marker="o", label=method)
    names = [r["name"] for r in next(iter(reports.values()))["layers"]]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("SQNR vs float (dB)")
    ax.set_title("Per-layer SQNR")
    ax.legend()
    images.append(_save(fig, folder / "sqnr_per_layer.png", plt))

    # accumulator headroom per layer against the profile's width
    macs = [r for r in accumulators if r.acc_bits is not None]
    fig, ax = plt.subplots(figsize=(9, 4))
    used = [math.log2(max(abs(r.acc_min), abs(r.acc_max), 1)) + 1 for r in macs]
    ax.bar(range(len(macs)), used, color=["tab:red" if r.overflows else "tab:blue" for r in macs])
    bits = profile.accumulator.bits
    ax.axhline(bits, color="k", linestyle="--", label=f"accumulator: {bits} bits")
    ax.set_xticks(range(len(macs)), [r.name for r in macs], rotation=90, fontsize=7)
    ax.set_ylabel("bits used by the largest |accumulator|")
    ax.set_title("Accumulator use per layer (red: overflowed)")
    ax.legend()
    images.append(_save(fig, folder / "accumulator_headroom.png", plt))

    # QFT loss curve
    curves = {m: r["loss_curve"] for m, r in reports.items() if r.get("loss_curve")}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        discarded = []
        for method, curve in curves.items():
            rep = reports[method]
            (line,) = ax.plot(curve, label=f"{method}: each step's batch")
            if "start_loss" in rep:  # the exact graph's loss before and after, the figures QFT chose between
                ax.axhline(rep["start_loss"], color=line.get_color(), linestyle="--", label=f"{method}: start")
                ax.axhline(rep["finetuned_loss"], color=line.get_color(), linestyle=":",
                           label=f"{method}: finetuned" + (" (discarded: worse)" if rep.get("kept_start") else ""))
                if rep.get("kept_start"):
                    discarded.append(method)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("distillation loss")
        ax.set_title("QFT loss" + (f"; finetuning discarded for {', '.join(discarded)}, its start returned"
                                   if discarded else ""))
        ax.legend()
        images.append(_save(fig, folder / "qft_loss.png", plt))

    # scale histograms
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, rep in reports.items():
        act = [r["act_scale"] for r in rep["layers"]]
        weight = [r[k] for r in rep["layers"] for k in ("weight_scale_min", "weight_scale_max") if k in r]
        axes[0].hist(np.log2(act), bins=20, alpha=0.5, label=method)
        axes[1].hist(np.log2(weight), bins=20, alpha=0.5, label=method)
    axes[0].set_title("activation scales (log2)")
    axes[1].set_title("weight scales, per-layer min and max (log2)")
    axes[0].legend()
    images.append(_save(fig, folder / "scales.png", plt))

    lines = [f"# qftsim report: profile {profile.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows]
    lines += ["", f"## Accumulators and clamping (simulator, {data})", "", "```", format_report(accumulators),
              "```", ""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    return folder / "summary.md"


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
