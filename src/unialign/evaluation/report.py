"""`unialign report`: result JSONs -> one Markdown report beside the paper's published numbers.

Every eval writer puts `task`, `model` and `dataset` in its JSON; rows of a table are
models, columns datasets, and the paper's numbers (shipped in `data/paper_results.json`,
copied from the paper) follow as extra rows, so a reproduction can be read against the
paper at a glance. A result evaluated on a gallery of another size than the paper's
protocol (COCO 5K, Flickr30K 1K) is flagged, never silently compared. The tables, the
recall@K plot and the report files are made by `unialign.report`, as the demo's are.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..report import Curve, markdown_table, plot_recall_curves, write_report_files
from .specs import GLUE_TASKS, EvalError

TASKS = ("retrieval", "zeroshot", "linear_probe", "finetune_image", "glue")
KS = (1, 5, 10)
# dataset -> (column title, (images, captions) of the paper's protocol)
RETRIEVAL_PROTOCOL: dict[str, tuple[str, tuple[int, int]]] = {
    "coco": ("COCO 5K", (5000, 25010)),
    "flickr30k": ("Flickr30K 1K", (1000, 5000)),
}
CLASSIFICATION_TITLES = {"imagenet1k": "ImageNet-1K", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_BULKY = ("skipped", "history", "sweep")  # per-item lists: kept in the result files, not in the report


def published_results() -> dict[str, Any]:
    """The paper's numbers (docs/METHOD.md), as shipped with the package."""
    path = resources.files("unialign.evaluation") / "data" / "paper_results.json"
    return json.loads(path.read_text(encoding="utf-8"))


# CLIP_benchmark's dataset names -> the report's
_CLIP_BENCHMARK_DATASETS = {"mscoco_captions": "coco", "flickr30k": "flickr30k", "imagenet1k": "imagenet1k",
                            "cifar10": "cifar10", "cifar100": "cifar100"}


def from_clip_benchmark(item: dict[str, Any]) -> dict[str, Any]:
    """A CLIP_benchmark result (`{"task": "zeroshot_retrieval", "metrics": {...}, ...}`) in unialign's layout,
    so baselines evaluated there sit in the same tables (fractions become percent)."""
    metrics = item["metrics"]
    out: dict[str, Any] = {
        "model": f"{item.get('model')} {item.get('pretrained')}".strip(),
        "dataset": _CLIP_BENCHMARK_DATASETS.get(item.get("dataset", ""), item.get("dataset")),
        "source_format": "clip_benchmark",
    }
    if item["task"] == "zeroshot_retrieval":
        out["task"] = "retrieval"
        for key, value in metrics.items():
            side, _, k = key.partition("_retrieval_recall@")
            if k.isdigit():  # text retrieval = image->text (TR), image retrieval = text->image (IR)
                out[f"{'txt' if side == 'text' else 'img'}_r{k}"] = 100.0 * value
    else:
        out["task"] = "zeroshot"
        out.update({"top1": 100.0 * metrics["acc1"], "top5": 100.0 * metrics["acc5"],
                    "mean_per_class_recall": 100.0 * metrics["mean_per_class_recall"]})
    return out


def read_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Result objects from each file (a file may hold one object or a list), checked for task/model/dataset.

    CLIP_benchmark's zero-shot retrieval / classification JSONs are accepted too (converted).
    """
    results = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise EvalError(f"result file {path}: cannot read ({err})") from None
        except json.JSONDecodeError as err:
            raise EvalError(f"result file {path}: not valid JSON ({err})") from None
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            where = f"{path}" + (f"[{i}]" if isinstance(data, list) else "")
            if not isinstance(item, dict):
                raise EvalError(f"result file {where}: expected a JSON object, got {type(item).__name__}")
            if isinstance(item.get("metrics"), dict) and item.get("task") in ("zeroshot_retrieval",
                                                                                "zeroshot_classification"):
                item = from_clip_benchmark(item)
            for key in ("task", "model", "dataset"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise EvalError(f"result file {where}: field '{key}' is missing or not a string "
                                    f"(got {item.get(key)!r}); results of `unialign eval ...` carry it")
            if item["task"] not in TASKS:
                raise EvalError(f"result file {where}: field 'task' is {item['task']!r}, expected one of {TASKS}")
            results.append({**{k: v for k, v in item.items() if k not in _BULKY}, "file": str(path)})
    return results


def _index(results: list[dict[str, Any]], task: str) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str]]:
    """(model, dataset) -> result for one task (a later file replaces an earlier one, with a warning)."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    notes = []
    for r in results:
        if r["task"] != task:
            continue
        key = (r["model"], r["dataset"])
        if key in table:
            notes.append(f"{r['file']} replaces {table[key]['file']} for {key[0]} on {key[1]}")
        table[key] = r
    return table, notes


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ordered(names: set[str], known: Sequence[str]) -> list[str]:
    return [n for n in known if n in names] + sorted(names - set(known))


def _models(table: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(model for model, _ in table))  # first-seen order


def retrieval_section(results: list[dict[str, Any]], published: dict[str, Any]) -> tuple[str, list[str]]:
    """The paper's retrieval table: R@1/5/10 TR and IR per dataset, measured rows then the paper's."""
    table, notes = _index(results, "retrieval")
    datasets = _ordered({d for _, d in table} | {"coco", "flickr30k"}, list(RETRIEVAL_PROTOCOL))
    header = ["model"]
    for d in datasets:
        title = RETRIEVAL_PROTOCOL.get(d, (d, None))[0]
        header += [f"{title} TR", f"{title} IR"]
    rows = []
    for model in _models(table):
        row = [model]
        for d in datasets:
            r = table.get((model, d))
            if r is None:
                row += ["", ""]
                continue
            flag = ""
            expected = RETRIEVAL_PROTOCOL.get(d, (None, None))[1]
            if expected and r.get("n_images") is None:
                notes.append(f"{model} on {d}: gallery size not recorded ({r['file']})")
            elif expected and (r.get("n_images"), r.get("n_captions")) != expected:
                flag = " *"
                notes.append(f"{model} on {d}: {r.get('n_images')} images / {r.get('n_captions')} captions, "
                             f"not the paper's {expected[0]} / {expected[1]} ({r['file']})")
            row += ["/".join(_num(r.get(f"{side}_r{k}")) for k in KS) + flag for side in ("txt", "img")]
        rows.append(row)
    for entry in published.get("retrieval", []):
        row = [f"_{entry['model']}_"]
        for d in datasets:
            m = entry.get(d)
            row += (["/".join(_num(m[f"{side}_r{k}"]) for k in KS) for side in ("txt", "img")] if m else ["", ""])
        rows.append(row)
    text = ("## Image-text retrieval\n\nR@1/R@5/R@10 in percent; TR = image->text, IR = text->image "
            "(Karpathy test splits); * marks a gallery of another size than the paper's (see Notes). "
            "Rows in _italics_ are the paper's published numbers.\n\n" + markdown_table(header, rows))
    return text, notes


def _classification_section(results: list[dict[str, Any]], published: dict[str, Any], task: str, title: str,
                            what: str) -> tuple[str, list[str]]:
    table, notes = _index(results, task)
    pub = published.get(task, [])
    datasets = _ordered({d for _, d in table} | {d for e in pub for d in e if d != "model"},
                        list(CLASSIFICATION_TITLES))
    header = ["model"] + [CLASSIFICATION_TITLES.get(d, d) for d in datasets]
    rows = []
    for model in _models(table):
        row = [model]
        for d in datasets:
            r = table.get((model, d))
            row.append("" if r is None else f"{_num(r.get('top1'))} / {_num(r.get('top5'))}")
        rows.append(row)
    for entry in pub:
        rows.append([f"_{entry['model']}_"] + [f"{_num(entry[d]['top1'])} / -" if d in entry else ""
                                              for d in datasets])
    text = (f"## {title}\n\n{what} Cells: top-1 / top-5 accuracy in percent; _italics_: the paper.\n\n"
            + markdown_table(header, rows))
    return text, notes


def glue_score(results: Sequence[dict[str, Any]]) -> float:
    """GLUE score of one model: the mean of its task scores (each task counted once)."""
    scores = {r["glue_task"]: r["score"] for r in results}
    return sum(scores.values()) / len(scores)


def glue_section(results: list[dict[str, Any]], published: dict[str, Any]) -> tuple[str, list[str]]:
    """Per-task dev scores and their mean; the mean is only comparable to the paper's with the same tasks."""
    table, notes = _index(results, "glue")
    tasks = _ordered({r["glue_task"] for r in table.values()}, list(GLUE_TASKS))
    header = ["model"] + tasks + ["GLUE score (tasks)"]
    rows = []
    for model in _models(table):
        mine = [r for (m, _), r in table.items() if m == model]
        by_task = {r["glue_task"]: r["score"] for r in mine}
        rows.append([model] + [_num(by_task.get(t)) if t in by_task else "" for t in tasks]
                    + [f"{_num(glue_score(mine))} ({len(by_task)})"])
    for entry in published.get("glue", []):
        rows.append([f"_{entry['model']}_"] + [""] * len(tasks) + [_num(entry["score"])])
    text = ("## GLUE (text encoder fine-tuned)\n\nDev-set task scores in percent: MCC (CoLA), mean of "
            "Pearson and Spearman (STS-B), mean of F1 and accuracy (MRPC, QQP), mean of matched and "
            "mismatched accuracy (MNLI), accuracy otherwise; the GLUE score is their mean over the tasks "
            "run (count in brackets).\n\n" + markdown_table(header, rows))
    return text, notes


def recall_curves(results: list[dict[str, Any]], published: dict[str, Any]) -> list[tuple[str, list[Curve]]]:
    """The recall@K plot's panels: one per retrieval dataset, measured curves then the paper's."""
    table, _ = _index(results, "retrieval")
    curves: list[tuple[str, str, dict[str, Any], bool]] = [(m, d, r, False) for (m, d), r in table.items()]
    curves += [(e["model"], d, e[d], True) for e in published.get("retrieval", []) for d in RETRIEVAL_PROTOCOL
               if d in e]
    datasets = _ordered({d for _, d, _, _ in curves}, list(RETRIEVAL_PROTOCOL))
    return [(RETRIEVAL_PROTOCOL.get(dataset, (dataset, None))[0],
             [(model, metrics, paper) for model, d, metrics, paper in curves if d == dataset])
            for dataset in datasets]


def build_report(result_files: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Write OUTPUT/report.md, OUTPUT/recall_at_k.png and OUTPUT/report.json; return the report.json content."""
    if not result_files:
        raise EvalError("give at least one result JSON")
    out = Path(output)
    results = read_results(result_files)
    published = published_results()
    sections = [
        retrieval_section(results, published),
        _classification_section(results, published, "zeroshot", "Zero-shot classification",
                                "Class names in CLIP's prompt templates, no training."),
        _classification_section(results, published, "linear_probe", "Linear probe",
                                "Logistic regression on frozen image embeddings, L2 chosen on a validation split."),
        _classification_section(results, published, "finetune_image", "Image encoder fine-tuned",
                                "Mean of patch tokens -> LayerNorm -> Linear, whole image encoder trained."),
        glue_section(results, published),
    ]
    notes = [n for _, section_notes in sections for n in section_notes]
    plotted = plot_recall_curves(recall_curves(results, published), out / "recall_at_k.png", KS)
    lines = ["# unialign evaluation report", "",
             f"Merged from {len(result_files)} result file(s). Published numbers: {published['source']}", ""]
    for text, _ in sections:
        lines += [text, ""]
    if plotted:
        lines += ["![recall@K](recall_at_k.png)", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Result files", ""] + [f"- `{r['file']}`: {r['task']}, {r['model']} on {r['dataset']}"
                                        for r in results]
    report = {"results": results, "published": published, "notes": notes,
              "files": {"markdown": "report.md", "plot": "recall_at_k.png" if plotted else None}}
    write_report_files(out, lines, report)
    return report
