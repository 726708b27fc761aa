"""bench/reproduce.py's runs and report: what a variant and a group are, how a run is keyed, and the
report (verdicts against the seeds' noise, Markdown, one PNG per group, JSON) rewritten from every stored
result. Imported by bench/reproduce.py (bench/ is on the path of a script run from it)."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unialign.files import write_json_atomic, write_text_atomic
from unialign.report import RECALL_HEADERS, RECALL_KEYS, markdown_table, plot_recalls


@dataclass(frozen=True)
class Variant:
    """One setting of a group: a label and dotted-key overrides of the base config."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    rerank: int = 0  # > 0: scored after re-ranking each query's top K with the ITM head (model.itm)
    # which recalls of the run a row shows: "dual_metrics" reads a re-ranked run's dual-encoder
    # recalls (the same trained models, before re-ranking)
    scored: str = "metrics"
    hf_dual: bool = False  # trained as transformers' VisionTextDualEncoderModel (training.hf_dual)


def get_key(raw: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a raw config, or None where the path does not exist."""
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def variant_key(base: dict[str, Any], variant: Variant) -> str:
    """Identifies the run by what actually differs from the base config, so a setting that
    appears in several groups (e.g. the base itself) is trained once per seed."""
    effective: dict[str, Any] = {k: v for k, v in variant.overrides.items() if get_key(base, k) != v}
    if variant.rerank:
        effective["eval.rerank"] = variant.rerank
    if variant.hf_dual:
        effective["hf_dual"] = True
    return hashlib.sha256(json.dumps(effective, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Group:
    """One ablation: variants that differ from the base model in one setting, and the paper's claim."""

    name: str
    title: str
    claim: str  # the paper's claim, in words
    best: str  # label of the variant the paper found best (the claim holds when it wins clearly)
    variants: tuple[Variant, ...]
    note: str = ""


def aggregate(runs: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample std (0 for one seed) of each metric over seeds."""
    mean = {k: statistics.fmean(r["metrics"][k] for r in runs) for k in RECALL_KEYS}
    std = {k: statistics.stdev([r["metrics"][k] for r in runs]) if len(runs) > 1 else 0.0 for k in RECALL_KEYS}
    return mean, std


Stats = dict[str, tuple[dict[str, float], dict[str, float], int]]  # label -> (mean, std, seeds)


def comparisons(group: Group, stats: Stats) -> list[tuple[str, float, float, str]]:
    """The paper's choice against each other variant: (rival, difference of mean recall, noise, outcome).

    Noise is sqrt(std1^2 + std2^2) of the two variants' per-seed results; a difference inside
    it is "within noise", outside it "better" or "worse" ("narrowly" below 1.5x the noise).
    """
    best_mean, best_std, _ = stats[group.best]
    out = []
    for label, (mean, std, _) in stats.items():
        if label == group.best:
            continue
        diff = best_mean["r_mean"] - mean["r_mean"]
        noise = math.hypot(best_std["r_mean"], std["r_mean"])
        outcome = "better" if diff > noise else "worse" if diff < -noise else "within noise"
        if outcome != "within noise" and abs(diff) < 1.5 * noise:
            outcome += " (narrowly, < 1.5x noise)"
        out.append((label, diff, noise, outcome))
    return out


def verdict(group: Group, stats: Stats) -> str:
    """Held: the paper's choice beat every other variant beyond the seed noise; did not hold:
    some variant beat it beyond the noise; otherwise not resolved (with what was resolved)."""
    if len(stats) < 2:
        return "not run"
    if len(stats) < len(group.variants) or group.best not in stats:
        return f"partly run ({len(stats)} of {len(group.variants)} variants), no verdict"
    if min(n for _, _, n in stats.values()) < 2:
        return "one seed, no verdict"
    rows = comparisons(group, stats)
    detail = "; ".join(f"vs {label}: {diff:+.2f}, noise {noise:.2f}, {outcome}" for label, diff, noise, outcome in rows)
    outcomes = [outcome for *_, outcome in rows]
    narrowly = " narrowly" if any("narrowly" in o for o in outcomes) else ""
    if all(o.startswith("better") for o in outcomes):
        return f"held{narrowly} ({detail})"
    if any(o.startswith("worse") for o in outcomes):
        return f"did not hold ({detail})"
    return f"not resolved ({detail})"


def write_report(report: Path, runs: dict[str, Any], base: dict[str, Any], context: dict[str, Any],
                 all_groups: dict[str, Group]) -> None:
    """Markdown + one PNG per group + JSON, from every stored result of this scale."""
    report.parent.mkdir(parents=True, exist_ok=True)
    stem = report.stem.lower()
    summary: dict[str, Any] = {"context": context, "groups": {}}
    verdicts: list[tuple[str, str, str]] = []
    sections: list[str] = []
    for group in all_groups.values():
        stats: Stats = {}
        for variant in group.variants:
            key = variant_key(base, variant)
            done = [{**r, "metrics": r[variant.scored]} for run_id, r in runs.items()
                    if run_id.rsplit("-seed", 1)[0] == key]
            if done:
                mean, std = aggregate(done)
                stats[variant.label] = (mean, std, len(done))
        v = verdict(group, stats)
        verdicts.append((group.title, group.claim, v))
        summary["groups"][group.name] = {
            "claim": group.claim, "verdict": v,
            "variants": {label: {"mean": m, "std": s, "seeds": n} for label, (m, s, n) in stats.items()}}
        if len(stats) < 2:  # the base model alone compares nothing; drop a plot from an earlier report
            (report.parent / f"{stem}_{group.name}.png").unlink(missing_ok=True)
            continue
        rows = [[label, n, *(f"{m[k]:.1f} ± {s[k]:.1f}" for k in RECALL_KEYS)] for label, (m, s, n) in stats.items()]
        png = plot_recalls(list(stats), [m for m, _, _ in stats.values()], report.parent / f"{stem}_{group.name}.png",
                           f"{group.title} (mean ± std over seeds)", stds=[s for _, s, _ in stats.values()])
        sections += [f"## {group.title}", "", f"Paper: {group.claim}. **Here: {v}.**", ""]
        if group.best in stats:
            sections += [f"Mean recall of *{group.best}* minus each other variant's (noise = sqrt(std1² + std2²)):", ""]
            sections += [f"- {label}: {diff:+.2f} (noise {noise:.2f}): {outcome}"
                         for label, diff, noise, outcome in comparisons(group, stats)]
            sections += [""]
        if group.note:
            sections += [group.note, ""]
        sections += [markdown_table(("variant", "seeds", *RECALL_HEADERS), rows), ""]
        if png:
            sections += [f"![{group.name}]({png.name})", ""]
    write_json_atomic(report.parent / f"{stem}.json", {**summary, "runs": runs})
    not_run = [g.name for g in all_groups.values() if summary["groups"][g.name]["verdict"] == "not run"]
    if not_run:
        sections += ["## Not run", "",
                     (f"Groups {', '.join(not_run)} were not run at this scale (compute budget); run them with "
                     f"`python bench/reproduce.py --only {' '.join(not_run)}`."), ""]
    c = context
    lines = [
        "# Small-scale reproduction of the paper's claims",
        "",
        ("Generated by `bench/reproduce.py` from the runs stored in its `results.json` (latest invocation: "
         f"`{c['command']}`); every number below comes from those runs. Do not edit by hand: re-run it."),
        "",
        (f"Trained on: {c['machine']}. Training wall time of the runs in this report: {c['train_min']:.0f} min "
         f"in all, {c['run_s'][0]:.0f} to {c['run_s'][1]:.0f} s per run (model loading included, and other jobs' "
         "load where the machine was shared: wall times say little; the recalls do not depend on them)."),
        "",
        f"Setup: {c['setup']}",
        "",
        ("Metric: recall@K in percent on the held-out set (TR = image -> text, IR = text -> image); "
        "`mean` is the mean of the six recalls; mean ± sample std over seeds. A claim *held* when the "
        "paper's choice beat every other variant by more than the seed noise "
        "(sqrt(std1² + std2²) of the mean recall), *did not hold* when another variant beat it by more, "
        "and is *not resolved* otherwise. Groups marked *not run* were not run at this scale."),
        "",
        ("What this scale can show: every run sees a few thousand pairs (the paper: 3.3M pairs x 7 epochs) "
         f"and is scored on {c['eval_images']} images, where one image is {100 / max(c['eval_images'], 1):.2f} "
         "recall points. Differences of a point or two are therefore noise unless the seeds agree, and "
         "claims about what helps after long training (bank size, depth, batch) may not show at all."),
        "",
        "## Verdicts",
        "",
        markdown_table(("ablation", "paper's claim", "at this scale"), verdicts),
        "",
        *sections,
    ]
    write_text_atomic(report, "\n".join(lines) + "\n")
