"""The one home of report tables, plots and files: `unialign demo`, `unialign report`,
`bench/reproduce.py` and `bench/data_curve.py` write their Markdown tables, recall plots, learning
curve and report.json/report.md here.

Every number these tools write is quoted with the machine it was measured on (timings on a
shared 2-core VM mean little without the load average); the demo and bench/reproduce.py draw
the same recall bar chart, `unialign report` recall@K curves beside the paper's numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import atomic_path, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
RECALL_HEADERS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "mean")
MATPLOTLIB_INSTALL = "pip install matplotlib"


def describe_machine(info: dict[str, Any], load: bool = True) -> str:
    """One line naming the machine, e.g. for a report header; `load` adds the load average
    (meaningful only for a measurement taken right then)."""
    device = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    line = f"{info['cores']}-core CPU{' VM' if info.get('vm') else ''} ({info['cpu']}), {device}, torch {info['torch']}"
    return f"{line}, 1-min load average {info['loadavg_1m']}" if load else line


def chance_recalls(captions_per_image: Sequence[int]) -> dict[str, float]:
    """Expected recall (percent) of a random ranking, the floor every table row is read against.

    IR@K: the one right image among N is in the top K with probability K/N. TR@K: an image
    with c of the M captions misses all of them in a random top K with probability
    C(M-c, K) / C(M, K).
    """
    n, m = len(captions_per_image), sum(captions_per_image)
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        out[f"img_r{k}"] = 100.0 * min(k, n) / n
        out[f"txt_r{k}"] = 100.0 * sum(1 - math.comb(m - c, k) / math.comb(m, k) for c in captions_per_image) / n
    out["r_mean"] = sum(out.values()) / 6
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get one decimal (recalls are percentages)."""
    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Plots (matplotlib is optional: without it a report is written without its picture)


def _pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig: Any, path: Path, dpi: int) -> Path:
    """Write the figure atomically in the format its suffix names, and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip("."))
    plt.close(fig)
    return path


def plot_recalls(labels: Sequence[str], means: Sequence[dict[str, float]], path: Path, title: str,
                 stds: Sequence[dict[str, float]] | None = None,
                 chance: dict[str, float] | None = None) -> Path | None:
    """Grouped bars of R@1/5/10 both ways (and their mean) per model; error bars from `stds`;
    a dashed mark per metric at `chance` (a random ranking's expected recall).

    Returns None, after saying how to install it, when matplotlib is absent: the report
    is still written, only without the picture.
    """
    plt = _pyplot()
    if plt is None:
        print(f"matplotlib is not installed, so no plot ({path.name}); install it with: {MATPLOTLIB_INSTALL}")
        return None
    import numpy as np

    x = np.arange(len(RECALL_KEYS))
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(RECALL_KEYS) + 0.6 * len(labels)), 4.2))
    for i, (label, mean) in enumerate(zip(labels, means, strict=True)):
        err = [stds[i][k] for k in RECALL_KEYS] if stds is not None else None
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, [mean[k] for k in RECALL_KEYS], width, yerr=err,
               capsize=2 if err else 0, label=label)
    if chance is not None:
        half = 0.45
        for i, key in enumerate(RECALL_KEYS):
            ax.plot([x[i] - half, x[i] + half], [chance[key]] * 2, "k--", linewidth=1,
                    label="chance" if i == 0 else None)
    ax.set_xticks(x, RECALL_HEADERS)
    ax.set_ylabel("recall (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


# One curve: (model, metrics with txt_r{K} / img_r{K}, whether it is a published number).
Curve = tuple[str, dict[str, Any], bool]


def plot_recall_curves(panels: Sequence[tuple[str, Sequence[Curve]]], path: Path,
                       ks: Sequence[int] = (1, 5, 10)) -> bool:
    """Recall@K curves (TR solid, IR dashed), one panel per (title, curves); a model keeps its
    colour across panels, published curves are square-marked and faded. False when matplotlib
    is missing."""
    plt = _pyplot()
    if plt is None:
        log.warning("matplotlib is not installed (pip install 'unialign[eval]'): no recall@K plot")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 7), squeeze=False)
    colors: dict[str, Any] = {}
    for ax, (title, curves) in zip(axes[0], panels):
        for model, metrics, paper in curves:
            color = colors.setdefault(model, f"C{len(colors) % 10}")
            for side, style in (("txt", "-"), ("img", "--")):
                points = [(k, metrics.get(f"{side}_r{k}")) for k in ks]
                points = [(k, v) for k, v in points if v is not None]
                ax.plot([k for k, _ in points], [v for _, v in points], style, color=color,
                        marker="s" if paper else "o", alpha=0.55 if paper else 1.0,
                        label=f"{model} {'TR' if side == 'txt' else 'IR'}")
        ax.set_title(title)
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K (%)")
        ax.set_xticks(list(ks))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}  # one legend under all panels, so no curve is hidden behind it
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(handles=list(legend.values()), labels=list(legend), loc="lower center", ncol=2, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.028 * ((len(legend) + 1) // 2), 1, 1))
    _save(fig, path, dpi=130)
    return True


# (training pairs, mean, standard deviation over seeds) of one measure
CurvePoint = tuple[float, float, float]


def plot_learning_curve(rates: Sequence[CurvePoint], recalls: Sequence[CurvePoint], path: Path, target: float,
                        fit: tuple[float, float] | None = None) -> bool:
    """Top-K rate and mean recall against training pairs (log scale, error bars over seeds), the `target`
    rate as a dashed line and the fitted line rate = a + b log2(pairs) extended to it. False when
    matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        log.warning("matplotlib is not installed (pip install 'unialign[eval]'): no learning-curve plot")
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for points, label, color in ((rates, "captions with their image in the top 3 (%)", "C0"),
                                 (recalls, "mean recall", "C1")):
        ax.errorbar([x for x, _, _ in points], [y for _, y, _ in points], yerr=[e for _, _, e in points],
                    marker="o", capsize=3, color=color, label=label)
    if fit is not None and fit[1] > 0:
        a, b = fit
        x0, x1 = min(x for x, _, _ in rates), max(2 ** ((target - a) / b), max(x for x, _, _ in rates))
        xs = [x0 * (x1 / x0) ** (i / 50) for i in range(51)]
        ax.plot(xs, [a + b * math.log2(x) for x in xs], ":", color="C0", label=f"fit: {a:.1f} + {b:.1f} log2(pairs)")
    ax.axhline(target, linestyle="--", color="grey", label=f"target {target:g}%")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())  # 256, not 2^8
    ax.set_xlabel("training pairs")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save(fig, path, dpi=130)
    return True


# ---------------------------------------------------------------------------------------
# Report files


def write_report_files(output: Path, markdown: Sequence[str], data: dict[str, Any]) -> dict[str, Path]:
    """OUTPUT/report.json (`data`) and OUTPUT/report.md (the lines), each written atomically."""
    write_json_atomic(output / "report.json", data)
    write_text_atomic(output / "report.md", "\n".join(markdown) + "\n")
    return {"json": output / "report.json", "markdown": output / "report.md"}


def demo_table(report: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    """The demo's headline table, one row per trained model and one for chance (or, given
    `results`, the same rows on another held-out set, without chance)."""
    scored = [(row["label"], (results or report["results"])[row["key"]]) for row in report["rows"]]
    bank = all("query_bank" in r for _, r in scored)  # the headline set's rows (see query_bank_note)
    rows = [[label, *(float(r[k]) for k in RECALL_KEYS), *([float(r["query_bank"]["r_mean"])] if bank else [])]
            for label, r in scored]
    if results is None:
        chance = [float(report["chance"][k]) for k in RECALL_KEYS]
        rows.append(["chance (random ranking)", *chance, *([chance[-1]] if bank else [])])
    return markdown_table(("model", *RECALL_HEADERS, *(["mean, query bank"] if bank else [])), rows)


def query_bank_note(report: dict[str, Any]) -> str:
    """What the table's last column is."""
    bank = next(iter(report["results"].values()))["query_bank"]
    return (f"mean, query bank: the same models' mean recall with query-bank normalisation (the inverted "
            f"softmax over the {bank['bank_captions']} training captions and {bank['bank_images']} training "
            f"images, at each model's logit scale; docs/EVALUATION.md); the other columns rank by the cosine.")


def demo_extra_tables(report: dict[str, Any]) -> list[str]:
    """Lines of one table per further held-out set of the demo."""
    lines = []
    for name, results in report["results_extra"].items():
        first = next(iter(results.values()))
        lines += [f"Second held-out set, {name}: {first['n_images']} images, {first['n_captions']} captions.", "",
                  demo_table(report, results), ""]
    return lines


def write_demo_report(output: Path, report: dict[str, Any]) -> dict[str, Path]:
    """`unialign demo`'s report.json, report.md and recall.png (the plot only when matplotlib is
    installed); the search examples' picture is drawn before and only linked here."""
    results = report["results"]
    plot = plot_recalls([row["label"] for row in report["rows"]], [results[row["key"]] for row in report["rows"]],
                        output / "recall.png",
                        f"retrieval on {report['eval']['name']} ({report['eval']['images']} images)",
                        chance=report["chance"])
    report["files"] = {"json": "report.json", "markdown": "report.md", "plot": plot.name if plot else None,
                       "search_examples": report["search_examples_png"]}
    e = report["eval"]
    lines = [
        "# unialign demo report",
        "",
        f"Machine: {describe_machine(report['machine'])}.",
        f"Wall time: {report['wall_time_s']['total']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_time_s"].items() if "total" not in k)
        + f"); CPU time {report['wall_time_s']['cpu_total']:.0f} s.",
        "",
        (f"Retrieval on {e['name']}: {e['images']} images, {e['captions']} captions, never seen in training. "
         "TR = image -> text, IR = text -> image, recall@K in percent."),
        "",
        demo_table(report),
        "",
        query_bank_note(report),
        "",
        *demo_extra_tables(report),
    ]
    if plot:
        lines += [f"![recall]({plot.name})", ""]
    lines += ["## What was used", ""] + [f"- {k}: {v}" for k, v in report["used"].items()]
    if report["missing"]:
        lines += ["", "Missing real assets (stand-ins used instead):", ""]
        lines += [f"- {k}: `{v}`" for k, v in report["missing"].items()]
    lines += ["", (f"Training: {report['steps_per_run']} steps of {report['scale']['batch_size']} pairs per model, "
              f"{report['scale']['image_size']} px images, precision {report['precision']}."), "",
              "## Text-to-image search (pretrained + KD model, top 3)", ""]
    found = sum(any(t["correct"] for t in ex["top"]) for ex in report["search"])
    every = report["search_all"]
    lines += [f"Queries: the {len(report['search'])} test captions first in blake2b order of their text (a fixed "
              f"rule, not a choice); the captioned image is in the top 3 for {found} of them. Over all "
              f"{every['captions']} test captions it is in the top {every['top_k']} for {every['found']} "
              f"({100 * every['found'] / max(every['captions'], 1):.1f}%; {every['found_plain']} by the cosine "
              f"alone). The search ranks as an index built with `--query-bank` does, the bank being the "
              f"{every['query_bank']} training captions (docs/SEARCH.md).", ""]
    lines += [f"![search examples]({report['search_examples_png']})", ""]
    for ex in report["search"]:
        hits = ", ".join(f"{t['file']}{' (correct)' if t['correct'] else ''}" for t in ex["top"])
        lines.append(f"- \"{ex['query']}\" -> {hits} [answer: {ex['correct']}, rank {ex['correct_rank']}]")
    files = write_report_files(output, lines, report)
    return {**files, **({"plot": plot} if plot else {}), "search_examples": output / report["search_examples_png"]}
