"""Fixed-size caches (the CUDA-graph decoding path) give the captions of the growing caches, token for token.

On the CPU the static states run eagerly; the recording itself is stood in for by a fake graph that
replays the step on the same buffers, so everything around `torch.cuda.CUDAGraph` is exercised here.
The one test that records a real graph needs a GPU.
"""

from __future__ import annotations

import os
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

from captioner.decoding import SearchOptions, beam_search, greedy, sample
from captioner.models import graphs
from captioner.models.captioner import CaptionModel

from .conftest import tiny_model_config

OPTS = SearchOptions(bos_id=1, eos_id=12, max_len=12, pad_id=0, unk_id=3)


def _model(encoder: str = "cnn", seed: int = 0) -> CaptionModel:
    """A random model with wide weights (all but the embedding): its captions differ from image to image."""
    torch.manual_seed(seed)
    model = CaptionModel(tiny_model_config(encoder, vocab_size=24, n_layers=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.normal_(0, 3 / p[0].numel() ** 0.5)
    return model


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def _same(a: list, b: list) -> None:
    assert [h.tokens for h in a] == [h.tokens for h in b]
    for x, y in zip(a, b, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=2e-5)


def test_the_random_model_ends_captions_at_different_lengths() -> None:
    lengths = {len(h.tokens) for h in greedy(_model(), _images(8), OPTS, static=False)}
    assert len(lengths) > 2, f"the tests below need captions of several lengths, got {lengths}"


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
@pytest.mark.parametrize("batch", [1, 5])
def test_static_greedy_and_beam_equal_growing(encoder: str, batch: int) -> None:
    model, images = _model(encoder), _images(batch)
    _same(greedy(model, images, OPTS, static=True), greedy(model, images, OPTS, static=False))
    for beam in (1, 3):
        _same(beam_search(model, images, OPTS, beam=beam, static=True),
              beam_search(model, images, OPTS, beam=beam, static=False))


def test_static_sampling_equals_growing() -> None:
    model, images = _model(), _images(3)
    draws = [sample(model, images, OPTS, n=2, static=static, generator=torch.Generator().manual_seed(7))
             for static in (True, False)]
    assert [[h.tokens for h in row] for row in draws[0]] == [[h.tokens for h in row] for row in draws[1]]


def test_a_kept_state_restarts_for_new_images_and_is_reused() -> None:
    model = _model()
    first, second = _images(4, seed=1), _images(4, seed=2)
    greedy(model, first, OPTS, static=True)
    kept = list(model.step_graphs._kept.values())
    again = greedy(model, second, OPTS, static=True)  # the same shape: the same buffers, new images
    assert list(model.step_graphs._kept.values()) == kept
    _same(again, greedy(model, second, OPTS, static=False))
    beam_search(model, second, OPTS, beam=3, static=True)  # another shape (12 rows): a second state
    assert len(model.step_graphs._kept) == 2


def test_reorder_keeps_the_caches_where_they_are() -> None:
    model = _model()
    steps = model.begin(model.encode(_images(2)).memory, per_image=3, static_len=5)
    steps.step(torch.tensor([1, 4, 5, 6, 7, 8]))
    before = [(c.k.data_ptr(), c.v.data_ptr()) for c in steps.state.self_caches]
    keys = steps.state.self_caches[0].k.clone()
    steps.reorder(torch.tensor([2, 2, 0, 3, 5, 4]))
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in steps.state.self_caches] == before
    assert torch.equal(steps.state.self_caches[0].k, keys[[2, 2, 0, 3, 5, 4]])
    with pytest.raises(AssertionError, match="own image"):
        steps.reorder(torch.tensor([3, 1, 2, 0, 4, 5]))  # row 0 would continue a beam of image 1


def test_weights_changed_in_place_are_read_and_replaced_weights_get_a_new_state() -> None:
    model, images = _model(), _images(3)
    greedy(model, images, OPTS, static=True)
    with torch.no_grad():  # an optimiser step: the same tensors, new values
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _same(greedy(model, images, OPTS, static=True), greedy(model, images, OPTS, static=False))
    assert len(model.step_graphs._kept) == 1
    model.decoder.to(torch.float64)  # new tensors: a state recorded on the old ones must not be replayed
    model.encoder.to(torch.float64)
    _same(greedy(model, images.double(), OPTS, static=True), greedy(model, images.double(), OPTS, static=False))
    assert len(model.step_graphs._kept) == 2


def test_growing_caches_by_default_and_attention_weights_need_them() -> None:
    model, images = _model(), _images(2)
    greedy(model, images, OPTS)
    greedy(model, images, OPTS, static=True, need_weights=True)
    assert not model.step_graphs._kept
    assert greedy(model, images, OPTS, static=True, need_weights=True)[0].cross is not None


def test_capacity_one() -> None:
    model, images = _model(), _images(3)
    opts = SearchOptions(bos_id=1, eos_id=2, max_len=1)
    _same(greedy(model, images, opts, static=True), greedy(model, images, opts, static=False))


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: `replay` runs the step on the recorded buffers."""

    def __init__(self, run, state, tokens: torch.Tensor, out: torch.Tensor) -> None:
        self.run, self.state, self.tokens, self.out, self.replays = run, state, tokens, out, 0

    def replay(self) -> None:
        logits, _ = self.run(self.tokens, self.state)
        self.out.copy_(logits)
        self.replays += 1


def _fake_record(run, state, tokens):
    for _ in range(graphs.WARMUP_STEPS):  # as _record does: steps that leave data in the caches
        run(tokens, state)
        state.index.zero_()
    logits, _ = run(tokens, state)  # a real recording runs nothing; this one leaves traces
    out = logits.clone()
    return FakeGraph(run, state, tokens, out), out


def test_recorded_steps_replay_into_the_same_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphs, "_record", _fake_record)
    model, images = _model(), _images(4)
    steps = graphs.StepGraphs()
    memory = model.encode(images).memory
    stepper = steps.stepper(model.decoder, memory, per_image=1, capacity=OPTS.max_len, record=True)
    assert isinstance(stepper.graph, FakeGraph) and stepper.state.position == 0 and int(stepper.state.index) == 0
    model.step_graphs = steps
    growing = model.begin

    def begin(memory: torch.Tensor, per_image: int = 1, static_len: int | None = None, record: bool = False,
              compiled: bool = False):
        if static_len is None:  # recording on the CPU
            return growing(memory, per_image=per_image)
        return steps.stepper(model.decoder, memory, per_image=per_image, capacity=static_len, record=True)

    monkeypatch.setattr(model, "begin", begin)
    for seed in (1, 2):  # the second call replays the kept recording for other images
        images = _images(4, seed=seed)
        _same(greedy(model, images, OPTS, static=True), greedy(model, images, OPTS, static=False))
        _same(beam_search(model, images, OPTS, beam=2, static=True),
              beam_search(model, images, OPTS, beam=2, static=False))
    assert stepper.graph.replays > 0


def test_a_failed_recording_decodes_step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_record", refuse)
    model, images = _model(), _images(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stepper = model.step_graphs.stepper(model.decoder, model.encode(images).memory, per_image=1,
                                            capacity=OPTS.max_len, record=True)
    assert stepper.graph is None and "without a CUDA graph" in str(caught[0].message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captions_equal_growing_caches() -> None:
    model = _model().cuda()
    for batch in (1, 4):
        images = _images(batch).cuda()
        for _ in range(2):  # recorded, then replayed from the kept recording
            _same(greedy(model, images, OPTS, static=True), greedy(model, images, OPTS, static=False))
            _same(beam_search(model, images, OPTS, beam=3, static=True),
                  beam_search(model, images, OPTS, beam=3, static=False))
    assert all(s.graph is not None for s in model.step_graphs._kept.values())


@pytest.mark.parametrize(("cuda_graph", "gpu", "static"), [(True, True, True), (False, True, False),
                                                        (True, False, False)])
def test_decode_settings_choose_the_graph(monkeypatch: pytest.MonkeyPatch, cuda_graph: bool, gpu: bool,
                                          static: bool) -> None:
    """Fixed-size (graphed) caches where they pay, unless --no-cuda-graph; growing ones on the CPU."""
    from captioner import decoding
    from captioner.data.vocab import Vocabulary

    monkeypatch.setattr(decoding, "fixed_caches_pay", lambda device: gpu)
    asked = []
    for name in ("greedy", "beam_search", "sample"):
        monkeypatch.setattr(decoding, name, lambda *a, _name=name, **kw: asked.append((_name, kw["static"])) or [])
    vocab = Vocabulary.build(["a cat"], min_count=1)
    for beam, sampled in ((1, False), (3, False), (1, True)):
        settings = decoding.DecodeSettings(beam=beam, sample=sampled, cuda_graph=cuda_graph)
        decoding.decode_batch(_model(), vocab, _images(1), settings)
    assert asked == [("greedy", static), ("beam_search", static), ("sample", static)]


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-cuda-graph"], False)])
def test_caption_and_evaluate_take_no_cuda_graph(monkeypatch: pytest.MonkeyPatch, flag: list[str],
                                                 expected: bool) -> None:
    from typer.testing import CliRunner

    from captioner import bulk, evaluation
    from captioner.cli import app

    seen = []

    def stop(*args, settings, **kwargs):
        seen.append(settings.cuda_graph)
        raise SystemExit(0)

    monkeypatch.setattr(bulk, "caption_many", lambda patterns, settings, **kw: stop(settings=settings))
    monkeypatch.setattr(evaluation, "run_evaluate", stop)
    for command in (["caption", "photo.jpg"], ["evaluate"]):
        result = CliRunner().invoke(app, [*command, *flag])
        assert result.exit_code == 0, result.output
    assert seen == [expected, expected]


def test_recording_under_autocast_keeps_autocast_but_not_its_cast_cache() -> None:
    cpu = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), graphs._no_cast_cache(cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_cache_enabled()  # a recording must cast the weights itself, every replay
    with graphs._no_cast_cache(cpu):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler, and none is installed")
def test_compiled_steps_give_the_growing_caches_captions() -> None:
    """The fixed-size step under torch.compile: the same tokens as the eager growing caches, compiled once per shape."""
    model, images = _model(), _images(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed compile would fall back silently to eager: make it fail here
        _same(greedy(model, images, OPTS, compiled=True), greedy(model, images, OPTS, static=False))
        _same(beam_search(model, images, OPTS, beam=2, compiled=True),
              beam_search(model, images, OPTS, beam=2, static=False))
        again = _images(3, seed=5)
        _same(greedy(model, again, OPTS, compiled=True), greedy(model, again, OPTS, static=False))
    assert [s.run is model.step_graphs._compiled for s in model.step_graphs._kept.values()] == [True, True]


@pytest.mark.parametrize(("static", "compiled", "device", "expected"), [
    (True, False, "cuda", dict(static_len=12, record=True, compiled=False)),
    (False, True, "cuda", dict(static_len=12, record=False, compiled=True)),  # --compile --no-cuda-graph
    (True, True, "cuda", dict(static_len=12, record=True, compiled=True)),
    (True, True, "cpu", dict(static_len=12, record=False, compiled=True)),
    (False, False, "cuda", dict(static_len=None, record=False, compiled=False)),
])
def test_a_search_records_only_what_it_was_asked_to(static: bool, compiled: bool, device: str, expected: dict) -> None:
    """CUDA graphs only for `static` on a GPU: --no-cuda-graph holds with --compile too."""
    from captioner import decoding

    class Model:
        def begin(self, memory, **kw):
            self.asked = kw

    model, memory = Model(), SimpleNamespace(device=torch.device(device))
    decoding._steps(model, memory, OPTS, static=static, compiled=compiled)
    assert model.asked == dict(per_image=1, **expected)


def test_a_failed_compile_decodes_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fn, **kw):
        def compiled(*args):
            raise RuntimeError("no working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", refuse)
    model, images = _model(), _images(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same(greedy(model, images, OPTS, compiled=True), greedy(model, images, OPTS, static=False))
        _same(greedy(model, _images(4), OPTS, compiled=True), greedy(model, _images(4), OPTS, static=False))
    said = [str(w.message) for w in caught if "without torch.compile" in str(w.message)]
    assert len(said) == 1 and "C++ compiler" in said[0]  # once, not again for the second shape
    assert all(s.run == model.decoder.step for s in model.step_graphs._kept.values())
