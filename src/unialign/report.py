"""Shared by `unialign demo` and `bench/reproduce.py`: machine description, Markdown tables, plots.

Every number either tool writes is quoted with the machine it was measured on (timings on a
shared 2-core VM mean little without the load average), and both draw the same recall chart,
so the helpers live in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import atomic_path

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


def plot_recalls(labels: Sequence[str], means: Sequence[dict[str, float]], path: Path, title: str,
                 stds: Sequence[dict[str, float]] | None = None,
                 chance: dict[str, float] | None = None) -> Path | None:
    """Grouped bars of R@1/5/10 both ways (and their mean) per model; error bars from `stds`;
    a dashed mark per metric at `chance` (a random ranking's expected recall).

    Returns None, after saying how to install it, when matplotlib is absent: the report
    is still written, only without the picture.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    plt.close(fig)
    return path
