"""The benchmarks (bench/*.py): importable and runnable at CI size, a failing measurement is
recorded while the rest still run, and bench/train_run.py kills and resumes a real training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, extra", [("train_step.py", ["--steps", "2"]), ("data.py", []), ("eval.py", [])])
def test_benchmarks_run_small(script, extra, tmp_path, monkeypatch):
    """In-process (no interpreter + torch import per script), at the --small sizes; then the
    Markdown table bench/perf_table.py makes of the result names every variant with its rate."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.json"
    result = bench_module(script).main(["--small", "--json", str(out), *extra])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["small"] is True and result["device"] and result["baseline"]
    rows = {"train_step": "variants", "data": "results", "eval": "runs"}[result["bench"]]
    errors = {k: v["error"] for k, v in result[rows].items() if "error" in v}
    assert not errors, errors
    perf = bench_module("perf_table.py")
    table = perf.render([out])
    assert "--small: a smoke run" in table
    for name, row in result[rows].items():
        shown = _as_shown(row["total_s"], 2) if rows == "runs" else _as_shown(row.get("pairs_per_s",
                                                                                      row.get("images_per_s")))
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {shown} |" in line, (name, shown, line)


def test_rerank_benchmark_counts_the_pairs_and_the_options_cost(tmp_path, monkeypatch):
    """bench/rerank.py at --small: re-ranking scores every distinct (image, caption) candidate
    pair of both directions once (images x K + captions x K, less the pairs both directions
    share), and each ALBEF option adds training work and parameters where it should."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    out = tmp_path / "out.json"
    result = bench_module("rerank.py").main(["--small", "--images", "8", "--k", "4", "--train-batch", "4",
                                              "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    ev = result["evaluation"]
    assert (ev["images"], ev["captions"], ev["k"]) == (8, 40, 4)
    assert max(8 * 4, 40 * 4) <= ev["pairs_scored"] <= 8 * 4 + 40 * 4
    assert ev["coco5k_extrapolated"]["pairs"] == 30000 * 4
    rows = result["training"]
    base, itm, queue, mod, both = rows.values()
    assert base["itm_head_params"] == 0 and base["momentum_model_params"] == 0 and base["x_baseline"] == 1
    assert itm["itm_head_params"] > 0 and itm["trainable_params"] == base["trainable_params"] + itm["itm_head_params"]
    assert itm["flops_per_pair"] > base["flops_per_pair"]
    # the momentum model is a copy of the whole student, stored but not trained
    assert queue["momentum_model_params"] >= base["trainable_params"] and queue["trainable_params"] == base["trainable_params"]
    assert queue["flops_per_pair"] > base["flops_per_pair"] and mod["flops_per_pair"] > base["flops_per_pair"]
    assert both["flops_per_pair"] > max(itm["flops_per_pair"], queue["flops_per_pair"])
    table = bench_module("perf_table.py").render([out])
    assert f"| {_as_shown(ev['rerank_s'], 2)} |" in table and "| all three |" in table


def test_a_failing_measurement_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    """One broken path (here the device decoder) must not lose the figures of the others: they are
    in the JSON on disk, and the failure is a row of its own with its error."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    data = bench_module("data.py")

    def broken(*args, **kwargs):
        raise RuntimeError("nvJPEG said no")

    monkeypatch.setattr(data, "unialign_device_decode", broken)
    out = tmp_path / "data.json"
    data.main(["--small", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    res = json.loads(out.read_text())["results"]
    assert res["unialign_devdec_w0"] == {"error": "RuntimeError: nvJPEG said no"}
    assert res["unialign_w0"]["images_per_s"] > 0 and res["unialign_w2"]["images_per_s"] > 0
    assert "| unialign_devdec_w0 | - | - | error: RuntimeError: nvJPEG said no |" in \
        bench_module("perf_table.py").render([out])


def test_train_run_kills_and_resumes_the_real_command(tmp_path, monkeypatch):
    """bench/train_run.py at --small: `unialign train` in a child, SIGKILLed after the step-4
    checkpoint, resumed from that checkpoint (not from 0) and run to step 16."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    out = tmp_path / "run.json"
    result = bench_module("train_run.py").main(["--small", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    run = result["runs"]["ddp"]
    assert run["ok"], run
    assert run["first"]["killed"] and run["first"]["returncode"] == -9
    assert 4 <= run["resumed_from_step"] < 16 and run["final_step"] == 16
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert "| ddp | True |" in bench_module("perf_table.py").render([out])


def _as_shown(value, digits: int = 1) -> str:
    """A figure as the perf table prints it: "-" when absent, floats with thousands separators and
    `digits` decimals, integers with thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def test_frozen_cache_benchmark_compares_the_same_run_with_and_without_the_caches(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.json"
    result = bench_module("frozen_cache.py").main(["--small", "--epochs", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["device"] and result["baseline"] and result["speedup"] > 0
    off, on = result["runs"].values()
    assert off["steps"] == on["steps"] > 0
    assert on["final_loss"] == pytest.approx(off["final_loss"], rel=1e-4)  # the caches change no result


def test_recipe_sweep_scores_each_fold_with_models_that_never_saw_it(tmp_path):
    """--folds 2: the held-out set's training images are cut in two; each half is scored (cv) by the
    unchanged and the changed model trained on the other half; the halves together are every image
    once, and the unchanged row of another sweep is the same run (reused)."""
    import json

    import yaml

    sweep = bench_module("recipe_sweep.py")
    out = tmp_path / "sweep"
    common = ["--small", "--seeds", "0", "--output", str(out), "--folds", "2"]
    lines = sweep.main(["--name", "hot", "--set", "train.base_lr=0.5", *common])
    assert [(x["name"], x["fold"]) for x in lines] == [
        ("base", "dataset_synthetic-fold0of2"), ("hot", "dataset_synthetic-fold0of2"),
        ("base", "dataset_synthetic-fold1of2"), ("hot", "dataset_synthetic-fold1of2")]
    assert all(0 <= x["cv"] <= 100 and 0 <= x["test"] <= 100 for x in lines)
    base, hot = lines[:2]
    assert hot["changes"] == {"train.base_lr": 0.5} and base["steps"] == hot["steps"] > 0
    assert base["final_loss"] != hot["final_loss"]
    assert [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()] == lines
    parts = [json.loads((out / "folds" / f"dataset_synthetic-fold{k}of2.json").read_text())["images"] for k in (0, 1)]
    held = [{(i["filepath"], i["filename"]) for i in part if i["split"] == "val"} for part in parts]
    trained = [{(i["filepath"], i["filename"]) for i in part if i["split"] == "train"} for part in parts]
    assert held[0] and held[1] and held[0] == trained[1] and held[1] == trained[0]
    for k in (0, 1):
        source = yaml.safe_load((out / "runs" / f"hot-s0-fold{k}of2" / "config.yaml").read_text())["data"]["train"][0]
        assert source["path"].endswith(f"fold{k}of2.json") and source["splits"] == ["train"]
    again = sweep.main(["--name", "cool", "--set", "train.base_lr=1e-5", *common])
    assert again[0]["train_s"] is None and again[0]["cv"] == base["cv"]
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        sweep.main(["--name", "x", "--set", "train.base_lr", *common])
    with pytest.raises(SystemExit, match="--folds wants K >= 2"):
        sweep.main(["--small", "--output", str(out), "--folds", "1", "--name", "x"])


def test_data_curve_trains_on_nested_shares_and_fits_the_rate(tmp_path):
    """--small: each fraction trains on a share of the held-out set's train + val images that holds every
    smaller share's (fraction 1: all of them, never a test image); a finished run is reused; the binomial
    tail, the even-odds rate and the fitted line against worked numbers."""
    import json

    curve = bench_module("data_curve.py")
    out = tmp_path / "curve"
    result = curve.main(["--small", "--fractions", "0.75", "1", "0.5", "--seeds", "0", "--output", str(out)])
    assert [r["fraction"] for r in result["rows"]] == [0.5, 0.75, 1.0]
    world = json.loads(next((out / "assets").glob("world-*/dataset_synthetic.json")).read_text())["images"]
    key = lambda image: (image["filepath"], image["filename"])  # noqa: E731
    shares = {f: json.loads((out / "subsets" / f"dataset_synthetic-{f:g}.json").read_text())["images"]
              for f in (0.5, 0.75, 1.0)}
    trained = {f: {key(i) for i in images if i["split"] == "train"} for f, images in shares.items()}
    assert trained[0.5] and trained[0.5] <= trained[0.75] < trained[1.0]
    assert trained[1.0] == {key(i) for i in world if i["split"] in ("train", "val")}
    assert all([key(i) for i in images if i["split"] == "test"] == [key(i) for i in world if i["split"] == "test"]
               for images in shares.values())
    pairs = {r["fraction"]: r["pairs"] for r in result["rows"]}
    assert pairs[1.0] == sum(len(i["sentences"]) for i in world if i["split"] in ("train", "val"))
    for run in result["runs"]:
        assert 0 <= run["r_mean"] <= 100 and 0 <= run["top3"] <= run["captions"]
        assert len(run["example_ranks_bank"]) == 4 and 0 <= run["top3_rate_bank"] <= 100
    assert json.loads((out / "curve.json").read_text())["rows"] == result["rows"]
    assert "| 0.75 |" in (out / "curve.md").read_text() and (out / "curve.png").stat().st_size > 0
    again = curve.main(["--small", "--fractions", "1", "--seeds", "0", "--output", str(out)])
    assert again["runs"][0]["train_s"] is None and again["runs"][0]["r_mean"] == result["runs"][-1]["r_mean"]
    assert curve.at_least(3, 4, 0.5) == pytest.approx(5 / 16)
    rate = curve.even_odds_rate()
    assert 4 * rate ** 3 * (1 - rate) + rate ** 4 == pytest.approx(0.5) and round(rate, 3) == 0.614
    assert curve.fit_log2([(2, 1.0), (8, 5.0), (4, 3.0)]) == pytest.approx((-1.0, 2.0))
    with pytest.raises(SystemExit, match="--fractions wants shares"):
        curve.main(["--small", "--fractions", "0", "--output", str(out)])
    with pytest.raises(SystemExit, match="--fractions 0.1: its .* training pairs make no full batch of 32"):
        curve.main(["--small", "--fractions", "0.1", "1", "--output", str(out)])


def test_frozen_cache_benchmark_needs_real_towers_for_the_hf_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="needs the real image tower"):
        bench_module("frozen_cache.py").main(["--small", "--row", "hf_dual"])


def test_shared_block_benchmark_compares_the_two_paths(tmp_path, monkeypatch):
    """bench/shared_block.py at --small: both paths timed in one run, and they agree (output, input gradient)."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    out = tmp_path / "out.json"
    result = bench_module("shared_block.py").main(["--small", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["device"] and result["baseline"]
    (row,) = result["shapes"].values()
    assert row["full_ms"] > 0 and row["cls_only_ms"] > 0 and row["speedup"] > 0
    assert row["max_abs_diff_output"] < 1e-5 and row["max_abs_diff_input_grad"] < 1e-5


def test_search_benchmark_measures_the_query_bank_against_exact_biased_search(tmp_path, monkeypatch):
    """bench/search.py --query-bank runs at CI size and reports the bank's cost beside the plain index's
    from the same run; on a flat index both searches are exact."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    out = tmp_path / "search.json"
    bench_module("search.py").main(["--n", "3000", "--dim", "16", "--queries", "40", "--exact-queries", "5",
                                    "--clusters", "30", "--query-bank", "500", "--index-type", "flat",
                                    "--json", str(out)])
    result = json.loads(out.read_text())
    bank = result["query_bank"]
    assert (bank["bank"], bank["beta"]) == (500, 14.3) and bank["bias_s"] >= 0
    assert bank["recall@10"] == 1.0 and result["recall@10"] == 1.0  # both exact
    assert bank["latency"]["p50_ms"] > 0 and result["latency"]["p50_ms"] > 0
