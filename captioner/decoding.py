"""Auto-regressive decoding: greedy, beam search and sampling, and `decode_batch`, the one place that turns
`DecodeSettings` into a search and token ids into words.

Every search encodes the images once and takes its steps from `CaptionModel.begin`, which computes each
decoder layer's cross-attention keys/values once and then feeds one token per row per step while the
self-attention KV caches fill. Beam search runs all beams of all images as one batch of (images x beams)
rows and reorders the caches when beams are pruned. The tests hold every search to a reference that
re-decodes the whole prefix at each step (tests/reference.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from captioner.config import DecodeSettings
from captioner.data.vocab import Vocabulary
from captioner.models.captioner import CaptionModel, Stepper

# A search's choice at one step: logits (rows, V) -> (the token of each row (rows,), its log-probability (rows,)).
Choose = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Caption:
    """A caption of one image: its token ids, its log-probability, and optionally where it looked.

    The searches return token ids; `decode_batch` reads them with the vocabulary into `text`.
    """

    tokens: list[int]  # without <bos>/<eos>
    logprob: float  # sum of the log-probabilities of the tokens and of the final <eos> (if reached)
    score: float  # the value the search ranked by (logprob, or length-normalised for beam search)
    cross: torch.Tensor | None = None  # (T, L, H, N): cross-attention of each generated token (+ <eos> step)
    grid: tuple[int, int] | None = None  # (h, w) of the encoder grid: N = h*w regions
    runners_up: list[Caption] = field(default_factory=list)  # beam search's next best, when n_best > 1
    text: str = ""  # the words, once decode_batch has read the tokens

    @property
    def words(self) -> list[str]:
        """The caption's words; specials are never generated, so they align with `cross`."""
        return self.text.split()


def check_search(**values: Any) -> None:
    """A search's settings checked by the rules `DecodeSettings` declares: ConfigError naming the one broken."""
    DecodeSettings(**values)


@dataclass
class SearchOptions:
    """Which tokens start and end a caption, and how long a caption may grow."""

    bos_id: int
    eos_id: int
    max_len: int = 30  # generated tokens, <eos> included
    pad_id: int | None = None  # never generated when given (it carries no meaning)
    unk_id: int | None = None  # never generated when given ("<unk>" is not a caption word)

    def __post_init__(self) -> None:
        check_search(max_len=self.max_len)

    def banned(self) -> list[int]:
        """Token ids that a search must never emit (<bos> and, when given, <pad> and <unk>)."""
        return [t for t in (self.bos_id, self.pad_id, self.unk_id) if t is not None]


def _log_probs(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """Log-softmax in float32 with the banned ids at -inf."""
    logits = logits.float()
    logits[:, banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def fixed_caches_pay(device: torch.device) -> bool:
    """Fixed-size caches pay on a GPU, where each step replays a CUDA graph; on the CPU growing ones are as fast."""
    return device.type == "cuda"


def _steps(model: CaptionModel, memory: torch.Tensor, opts: SearchOptions, *, per_image: int = 1,
           static: bool = False, compiled: bool = False, need_weights: bool = False) -> Stepper:
    """A search's steps: fixed-size caches when `static` (replayed from a CUDA graph on a GPU) or `compiled`
    (the step under torch.compile); growing caches when attention weights are asked for (only they record them)."""
    fixed = (static or compiled) and not need_weights
    return model.begin(memory, per_image=per_image, static_len=opts.max_len if fixed else None,
                       record=fixed and static and memory.device.type == "cuda", compiled=fixed and compiled)


def _extend(steps: Stepper, opts: SearchOptions, choose: Choose, *, rows: int, device: torch.device,
            grid: tuple[int, int] | None = None, need_weights: bool = False) -> list[Caption]:
    """Grow every row from <bos> by the token `choose` picks, until each row has said <eos> or max_len ends."""
    tokens = torch.full((rows,), opts.bos_id, dtype=torch.long, device=device)
    out = torch.full((rows, opts.max_len), opts.eos_id, dtype=torch.long, device=device)
    logprob = torch.zeros(rows, device=device)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    crosses = []
    for t in range(opts.max_len):
        logits, cross = steps.step(tokens, need_weights=need_weights)  # (rows, V), (L, rows, H, N)
        tokens, token_logp = choose(logits)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, opts.eos_id))  # ended rows keep saying <eos>
        logprob += torch.where(alive, token_logp, torch.zeros_like(token_logp))
        out[:, t] = tokens
        if need_weights:
            crosses.append(cross.float().cpu())
        alive &= tokens != opts.eos_id
        if not alive.any():
            break
    return _cut_at_eos(out, logprob, opts.eos_id, crosses, grid)


@torch.inference_mode()
def greedy(model: CaptionModel, images: torch.Tensor, opts: SearchOptions, *,
           need_weights: bool = False, static: bool = False, compiled: bool = False) -> list[Caption]:
    """Pick the most likely token at every step.

    static: fixed-size caches (see `fixed_caches_pay`); compiled: those, with the step under torch.compile.
    """
    encoded = model.encode(images)
    steps = _steps(model, encoded.memory, opts, static=static, compiled=compiled, need_weights=need_weights)
    banned = opts.banned()

    def most_likely(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best_logp, tokens = _log_probs(logits, banned).max(dim=-1)  # (rows,)
        return tokens, best_logp

    return _extend(steps, opts, most_likely, rows=images.shape[0], device=images.device, grid=encoded.grid,
                   need_weights=need_weights)


@torch.inference_mode()
def beam_search(model: CaptionModel, images: torch.Tensor, opts: SearchOptions, *, beam: int = 3,
                length_penalty: float = 0.0, no_repeat_ngram: int = 0, need_weights: bool = False,
                n_best: int = 1, static: bool = False, compiled: bool = False) -> list[Caption]:
    """Keep the `beam` best prefixes per image; all (images x beams) rows advance as one batch.

    Finished hypotheses are ranked by logprob / length**length_penalty (0 = plain log-probability,
    1 = per-token average). `no_repeat_ngram` > 0 forbids repeating any n-gram of that size.
    n_best > 1 (at most `beam`) also returns each image's next best finished hypotheses, ranked, as the
    best one's `runners_up`: the search only stops once no live beam can beat the beam-th best finished
    one, so the first `beam` of them are final. `static` and `compiled` as in `greedy`.
    """
    check_search(beam=beam, n_best=n_best, no_repeat_ngram=no_repeat_ngram)
    B, device = images.shape[0], images.device
    K = beam
    encoded = model.encode(images)
    # (B*K) rows, the beams of an image adjacent
    steps = _steps(model, encoded.memory, opts, per_image=K, static=static, compiled=compiled,
                   need_weights=need_weights)
    banned = opts.banned()
    tokens = torch.full((B * K,), opts.bos_id, dtype=torch.long, device=device)
    # Only the first beam of each image is live at the start, so the K beams do not all pick the same word.
    beam_logp = torch.full((B, K), float("-inf"), device=device)
    beam_logp[:, 0] = 0.0
    history = torch.zeros((B * K, 0), dtype=torch.long, device=device)  # generated tokens per row
    cross_history: list[torch.Tensor] = []  # per step (B*K, L, H, N), re-indexed with the beams
    finished: list[list[tuple[float, float, list[int], torch.Tensor | None]]] = [[] for _ in range(B)]

    for t in range(opts.max_len):
        logits, cross = steps.step(tokens, need_weights=need_weights)  # (B*K, V)
        logp = _log_probs(logits, banned)  # (B*K, V)
        V = logp.shape[-1]
        if no_repeat_ngram > 0:
            _ban_repeats(logp, history, no_repeat_ngram)
        total = beam_logp.reshape(B * K, 1) + logp  # (B*K, V)
        total = total.reshape(B, K * V)
        # 2K candidates per image: even if K of them end with <eos>, K live ones remain.
        top_logp, top_idx = total.topk(min(2 * K, K * V), dim=-1)  # (B, 2K)
        src_beam, word = top_idx // V, top_idx % V
        rows = torch.arange(B, device=device)[:, None] * K + src_beam  # (B, 2K) rows into (B*K)
        if need_weights:
            cross_now = cross.permute(1, 0, 2, 3).float().cpu()  # (B*K, L, H, N)

        new_rows, new_words, new_logp = _select_beams(
            top_logp, rows, word, finished, history, K=K, ends=t == opts.max_len - 1, eos_id=opts.eos_id,
            length_penalty=length_penalty, cross_steps=[*cross_history, cross_now] if need_weights else None)
        live_logp = [new_logp[b * K:(b + 1) * K] for b in range(B)]
        if _search_done(finished, live_logp, K, length_penalty, opts.max_len):
            break
        index = torch.tensor(new_rows, dtype=torch.long, device=device)  # (B*K,)
        steps.reorder(index)
        tokens = torch.tensor(new_words, dtype=torch.long, device=device)  # (B*K,)
        history = torch.cat([history[index], tokens[:, None]], dim=1)
        if need_weights:
            cross_history = [c[index.cpu()] for c in cross_history] + [cross_now[index.cpu()]]
        beam_logp = torch.tensor(new_logp, device=device).view(B, K)

    results = []
    for b in range(B):
        # sorted() is stable (reverse too): among equal scores the first to finish stays first
        ranked = sorted(finished[b], key=lambda f: f[0], reverse=True)[:n_best]
        best, *runners_up = [Caption(seq, lp, score, crosses, encoded.grid) for score, lp, seq, crosses in ranked]
        best.runners_up = runners_up
        results.append(best)
    return results


def _select_beams(top_logp: torch.Tensor, rows: torch.Tensor, word: torch.Tensor, finished: list[list],
                  history: torch.Tensor, *, K: int, ends: bool, eos_id: int, length_penalty: float,
                  cross_steps: list[torch.Tensor] | None) -> tuple[list[int], list[int], list[float]]:
    """Sort each image's 2K candidates (B, 2K): those that end join `finished`, the best K live ones go on.

    Returns the B*K live beams as (source row, word, logprob) lists, beams of an image adjacent; an image
    with fewer than K live candidates is padded with dead copies (logprob -inf). The bookkeeping is per
    candidate, so it runs on Python lists: indexing tensors element by element costs microseconds each,
    which at 32 images x 6 candidates rivals the model step. `cross_steps`: each step's attention (B*K, L, H, N).
    """
    new_rows: list[int] = []
    new_words: list[int] = []
    new_logp: list[float] = []
    history_rows = None
    for b, (lps, rws, wds) in enumerate(zip(top_logp.tolist(), rows.tolist(), word.tolist(), strict=True)):
        kept = 0
        for lp, row, w in zip(lps, rws, wds, strict=True):
            if lp == float("-inf"):
                break
            if w == eos_id or ends:
                if history_rows is None:
                    history_rows = history.tolist()
                seq = history_rows[row] + ([] if w == eos_id else [w])
                crosses = None if cross_steps is None else torch.stack([c[row] for c in cross_steps])  # (T, L, H, N)
                finished[b].append((lp / ((len(seq) + 1) ** length_penalty), lp, seq, crosses))
                continue
            new_rows.append(row)
            new_words.append(w)
            new_logp.append(lp)
            kept += 1
            if kept == K:
                break
        if kept < K:  # fewer live candidates than beams: pad with dead copies
            new_rows += [new_rows[-kept] if kept else b * K] * (K - kept)
            new_words += [eos_id] * (K - kept)
            new_logp += [float("-inf")] * (K - kept)
    return new_rows, new_words, new_logp


def _search_done(finished: list[list], live_logp: list[list[float]], K: int, length_penalty: float,
                 max_len: int) -> bool:
    """True when no live beam can still beat the K-th best finished hypothesis of any image."""
    for b, done in enumerate(finished):
        if len(done) < K:
            return False
        kth = sorted((f[0] for f in done), reverse=True)[K - 1]
        best_live = max(live_logp[b])
        if best_live == float("-inf"):
            continue
        # Log-probs only fall as a caption grows, so the best score a live beam can still reach is its
        # current (negative) logprob divided by the longest length it could have.
        bound = best_live / ((max_len + 1) ** length_penalty) if best_live < 0 else best_live
        if bound > kth:
            return False
    return True


def _ban_repeats(logp: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Set to -inf every word that would complete an n-gram already present in the row's history."""
    T = history.shape[1]
    if T < n - 1:
        return
    hist = history.tolist()
    for row, seq in enumerate(hist):
        prefix = tuple(seq[T - (n - 1):]) if n > 1 else ()
        for i in range(T - n + 1):
            if tuple(seq[i:i + n - 1]) == prefix:
                logp[row, seq[i + n - 1]] = float("-inf")


@torch.inference_mode()
def sample(model: CaptionModel, images: torch.Tensor, opts: SearchOptions, *, n: int = 1,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, static: bool = False,
           compiled: bool = False) -> list[list[Caption]]:
    """Draw `n` captions per image from the (temperature, top-k, nucleus top-p) filtered distribution.

    `static` and `compiled` as in `greedy`.
    """
    check_search(sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    B = images.shape[0]
    steps = _steps(model, model.encode(images).memory, opts, per_image=n, static=static, compiled=compiled)
    banned = opts.banned()

    def draw(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = _log_probs(logits / temperature, banned)  # (B*n, V)
        filtered = filter_logits(logp, top_k=top_k, top_p=top_p)
        tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)  # (B*n,)
        return tokens, logp.gather(1, tokens[:, None]).squeeze(1)

    flat = _extend(steps, opts, draw, rows=B * n, device=images.device)
    return [flat[i * n:(i + 1) * n] for i in range(B)]


def filter_logits(logp: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k words and the smallest set whose probability reaches top_p; the rest get -inf."""
    logp = logp.clone()
    if top_k > 0 and top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logp[logp < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        cum = sorted_logp.softmax(-1).cumsum(-1)
        drop = cum - sorted_logp.softmax(-1) >= top_p  # words after the nucleus is already full
        sorted_logp[drop] = float("-inf")
        logp = torch.full_like(logp, float("-inf")).scatter(1, order, sorted_logp)
    return logp


def _cut_at_eos(out: torch.Tensor, logprob: torch.Tensor, eos_id: int, crosses: list[torch.Tensor],
                grid: tuple[int, int] | None) -> list[Caption]:
    """Cut each row of `out` (rows, max_len) at its first <eos>, with its attention when it was recorded."""
    cross = torch.stack(crosses, dim=0) if crosses else None  # (T, L, rows, H, N)
    captions = []
    for b, row in enumerate(out.tolist()):
        length = row.index(eos_id) if eos_id in row else len(row)
        weights = None
        if cross is not None:
            # one map per generated word, plus the step that produced <eos> when there is one
            steps = min(length + 1, cross.shape[0])
            weights = cross[:steps, :, b]  # (T, L, H, N)
        captions.append(Caption(row[:length], float(logprob[b]), float(logprob[b]), weights, grid))
    return captions


# ----------------------------------------------------------------------------- settings -> captions


def search_options(vocab: Vocabulary, max_len: int) -> SearchOptions:
    """Search options with the vocabulary's named specials (<bos> starts, <eos> ends, <pad>/<unk> banned)."""
    return SearchOptions(bos_id=vocab.bos_id, eos_id=vocab.eos_id, max_len=max_len, pad_id=vocab.pad_id,
                         unk_id=vocab.unk_id)


def decode_batch(model: CaptionModel, vocab: Vocabulary, images: torch.Tensor,
                 settings: DecodeSettings | None = None, *, need_weights: bool = False) -> list[Caption]:
    """The one place that turns settings into a search: sampling, greedy, or beam search over images (B, 3, S, S)."""
    settings = settings or DecodeSettings()
    opts = search_options(vocab, settings.max_len)
    steps = dict(static=settings.cuda_graph and fixed_caches_pay(images.device), compiled=settings.compile)
    if settings.sample:
        g = torch.Generator(device=images.device).manual_seed(settings.seed)
        captions = [c[0] for c in sample(model, images, opts, temperature=settings.temperature, top_k=settings.top_k,
                                         top_p=settings.top_p, generator=g, **steps)]
    elif settings.beam == 1 and settings.no_repeat_ngram == 0:
        captions = greedy(model, images, opts, need_weights=need_weights, **steps)
    else:
        captions = beam_search(model, images, opts, beam=settings.beam, length_penalty=settings.length_penalty,
                               no_repeat_ngram=settings.no_repeat_ngram, need_weights=need_weights,
                               n_best=settings.n_best, **steps)
    for caption in captions:
        for c in (caption, *caption.runners_up):
            c.text = vocab.decode(c.tokens)
    return captions
