"""Smoke test of benchmarks/bench_peers.py: its building blocks run on a tiny size and return sane figures.

The benchmark is run by hand (and by benchmarks/gpu_bench.sh), so nothing else would notice a refactor of
the library breaking it. The peer's half needs transformers, which CI does not install: skipped there.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers  # noqa: E402

CPU = torch.device("cpu")
TINY_OURS = dict(encoder="vit", image_size=32, patch_size=8, d_model=32, n_heads=2, enc_layers=1, n_layers=1,
                 d_ff=64, vocab_size=50, dropout=0.0, attn_dropout=0.0)
TINY = bench_peers.Size(ours=TINY_OURS, peer_encoder=bench_peers.vit_fields(32, 8, 32, 1, 2, 64),
                        peer_decoder=bench_peers.gpt2_fields(TINY_OURS), train_batch={"cpu": 4}, runs={"cpu": 1})


HAS_PEER = importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def tiny_result() -> dict[str, Any]:
    """Every figure of the tiny size, measured once: both sides where transformers is installed, else ours."""
    bench = bench_peers.Bench.for_size(TINY, CPU, quick=True)
    return bench_peers.measure(TINY, bench, with_peer=HAS_PEER)


def numbers(tree: Any) -> list[float]:
    """Every number in a nested dict; fails on anything but a finite number or an 'unavailable' note."""
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in numbers(value)]
    if isinstance(tree, str):
        assert tree.startswith(bench_peers.UNAVAILABLE), tree
        return []
    assert isinstance(tree, (int, float)) and math.isfinite(tree), tree
    return [tree]


def check_common(result: dict[str, Any], sides: set[str]) -> None:
    rows = result["decode_captions_per_s"]
    assert set(rows) == set(bench_peers.CASES)
    precisions = bench_peers.precision_rows(CPU)
    for case, by_precision in rows.items():
        assert list(by_precision) == precisions
        for row in by_precision.values():
            assert set(bench_peers.our_variants(CPU, case)) | sides == set(row)
            assert all(rate > 0 for rate in numbers(row))
    assert list(result["train_images_per_s"]) == precisions
    assert all(set(row) == {"ours"} | sides for row in result["train_images_per_s"].values())
    step = result["step_b1"]
    assert step["step_ms"] > 0 and step["products_only_ms"] > 0
    assert set(step["ops_ms"]) == {*bench_peers.OP_CATEGORIES, "other_ops"}
    assert step["ops_ms"]["matrix_products"] > 0  # the profiler saw the step's products
    assert math.isfinite(step["python_dispatch_overhead_ms"])
    for batch in ("b1_greedy", "b32_greedy"):
        assert result["ceilings"][batch]["fp32"]["floor_ms"] > 0
    assert result["cached_vs_naive"]["naive_ms"] > 0
    assert result["train_ceiling"]["ours_products_attention_ms"] > 0
    assert 0 < result["train_ceiling"]["products_attention_share"] <= 1
    assert all(x > 0 for x in numbers(result["params"]))


def test_sizes_build_valid_configs() -> None:
    from captioner.config import ModelConfig

    for size in bench_peers.SIZES.values():
        ModelConfig(**size.ours)  # validates, builds nothing
        assert size.peer_decoder["n_embd"] == size.ours["d_model"]
        assert size.peer_decoder["vocab_size"] == size.ours["vocab_size"] < size.never
    vit_b = bench_peers.SIZES["realistic"].peer_encoder
    assert (vit_b["hidden_size"], vit_b["num_hidden_layers"], vit_b["num_attention_heads"], vit_b["patch_size"],
            vit_b["image_size"]) == (768, 12, 12, 16, 224)


def test_static_rows_only_where_decoding_takes_the_keyword(monkeypatch: pytest.MonkeyPatch) -> None:
    def old_greedy(model, images, opts, *, need_weights=False):  # the signature before `static`
        return "growing cache"

    def new_greedy(model, images, opts, *, need_weights=False, static=None):
        return static

    monkeypatch.setattr(bench_peers, "greedy", old_greedy)
    assert bench_peers.our_search(1, True) is None  # a static row cannot run: it is reported unavailable
    assert bench_peers.probe(None, None, None, None).startswith(bench_peers.UNAVAILABLE)
    assert bench_peers.our_search(1, False)(None, None, None) == "growing cache"  # the only path there is
    monkeypatch.setattr(bench_peers, "greedy", new_greedy)
    assert [bench_peers.our_search(1, s)(None, None, None) for s in (True, False, None)] == [True, False, None]

    def failing_greedy(model, images, opts, *, need_weights=False, static=None):
        raise NotImplementedError("no static cache for this case")

    monkeypatch.setattr(bench_peers, "greedy", failing_greedy)
    assert "no static cache" in bench_peers.probe(bench_peers.our_search(1, True), None, None, None)
    assert bench_peers.probe(bench_peers.our_search(1, False), None, None, None) is None  # not even called
    assert bench_peers.our_search(3, False).keywords.get("beam") == 3


def test_our_side_runs_and_returns_positive_figures(tiny_result: dict[str, Any]) -> None:
    check_common(tiny_result, sides={"peer"} if HAS_PEER else set())
    text = bench_peers.summary({"device": "cpu", "sizes": {"tiny": tiny_result}})
    assert "b32_beam3" in text and "train" in text


def test_our_side_alone_has_no_ratios() -> None:
    assert bench_peers.ratios({"b1_greedy": {"fp32": {"ours": 2.0}}}) == {}
    assert bench_peers.ratios({"train": {"fp32": {"ours": 2.0, "peer": 4.0}}}) == {"train": {"fp32": {"ours": 0.5}}}


def test_both_sides_run_and_give_ratios(tiny_result: dict[str, Any]) -> None:
    pytest.importorskip("transformers")
    ratios = tiny_result["ratios_ours_over_peer"]
    assert set(ratios) == {*bench_peers.CASES, "train"}
    assert all(r > 0 for r in numbers(ratios))
    assert tiny_result["train_ceiling"]["ceiling_vs_peer_fp32"] > 0
    assert tiny_result["ceilings"]["b1_greedy"]["fp32"]["ceiling_vs_peer"] > 0
    assert 0 < tiny_result["ceilings"]["b32_greedy"]["peer_encoder_share_fp32"]
