"""Auto-regressive decoding over `CaptionModel.step`: greedy, beam search and sampling, and `decode_batch`,
the one place that turns `DecodeSettings` into a search and token ids into `Caption`s.

Every search encodes the images once, precomputes each decoder layer's cross-attention keys/values once
(`model.start`), then feeds one token per step while the self-attention KV caches grow. Beam search
runs all beams of all images as one batch of (images x beams) rows and reorders the caches when beams
are pruned. `naive_greedy` re-runs the whole prefix every step: it is the reference the tests and the
benchmarks hold the cached path to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from captioner.data.vocab import Vocabulary
from captioner.errors import ConfigError
from captioner.models.captioner import CaptionModel


@dataclass
class Hypothesis:
    """One decoded caption: token ids (without <bos>/<eos>), its log-probability, optional attention."""

    tokens: list[int]
    logprob: float  # sum of the log-probabilities of the tokens and of the final <eos> (if reached)
    score: float  # the value the search ranked by (logprob, or length-normalised for beam search)
    cross: torch.Tensor | None = None  # (T, L, H, N): cross-attention of each generated token, if asked
    grid: tuple[int, int] | None = None  # (h, w) of the encoder grid, to fold N back into an image
    runners_up: list[Hypothesis] = field(default_factory=list)  # beam search's next best, when n_best > 1


@dataclass
class SearchOptions:
    """Which tokens start and end a caption, and how long a caption may grow."""

    bos_id: int
    eos_id: int
    max_len: int = 30  # generated tokens, <eos> included
    pad_id: int | None = None  # never generated when given (it carries no meaning)
    unk_id: int | None = None  # never generated when given ("<unk>" is not a caption word)

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")

    def banned(self) -> list[int]:
        """Token ids that a search must never emit (<bos> and, when given, <pad> and <unk>)."""
        return [t for t in (self.bos_id, self.pad_id, self.unk_id) if t is not None]


def _log_probs(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """Log-softmax in float32 with the banned ids at -inf."""
    logits = logits.float()
    logits[:, banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def _static_len(static: bool | None, images: torch.Tensor, opts: SearchOptions, need_weights: bool) -> int | None:
    """Positions of fixed-size caches for this search, or None for growing ones.

    static None = on a GPU, where the fixed-size step is replayed from a CUDA graph; on the CPU the
    growing caches are as fast. Attention weights are recorded only by the growing path.
    """
    use = images.device.type == "cuda" if static is None else static
    return opts.max_len if use and not need_weights else None


@torch.inference_mode()
def greedy(model: CaptionModel, images: torch.Tensor, opts: SearchOptions, *,
           need_weights: bool = False, static: bool | None = None) -> list[Hypothesis]:
    """Pick the most likely token at every step; rows that reached <eos> stop growing.

    static: fixed-size caches (a CUDA graph's step on a GPU; see CaptionModel.begin); None = on a GPU.
    """
    B = images.shape[0]
    encoded = model.encode(images)
    steps = model.begin(encoded.memory, static_len=_static_len(static, images, opts, need_weights))
    banned = opts.banned()
    tokens = torch.full((B,), opts.bos_id, dtype=torch.long, device=images.device)
    out = torch.full((B, opts.max_len), opts.eos_id, dtype=torch.long, device=images.device)
    logprob = torch.zeros(B, device=images.device)
    alive = torch.ones(B, dtype=torch.bool, device=images.device)
    crosses = []
    for t in range(opts.max_len):
        logits, cross = steps.step(tokens, need_weights=need_weights)  # (B, V), (L, B, H, N)
        logp = _log_probs(logits, banned)
        best_logp, tokens = logp.max(dim=-1)  # (B,)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, opts.eos_id))
        logprob += torch.where(alive, best_logp, torch.zeros_like(best_logp))
        out[:, t] = tokens
        if need_weights:
            crosses.append(cross.float().cpu())
        alive &= tokens != opts.eos_id
        if not alive.any():
            break
    return _hypotheses(out, logprob, opts.eos_id, crosses, encoded.grid)


@torch.inference_mode()
def naive_greedy(model: CaptionModel, images: torch.Tensor, opts: SearchOptions) -> list[Hypothesis]:
    """Greedy decoding without caches: the whole prefix is re-decoded every step (the reference path)."""
    B = images.shape[0]
    memory = model.encode(images).memory  # (B, N, D)
    banned = opts.banned()
    prefix = torch.full((B, 1), opts.bos_id, dtype=torch.long, device=images.device)
    logprob = torch.zeros(B, device=images.device)
    alive = torch.ones(B, dtype=torch.bool, device=images.device)
    for _ in range(opts.max_len):
        logits, _ = model.decode(memory, prefix)  # (B, T, V): all positions recomputed
        logp = _log_probs(logits[:, -1], banned)
        best_logp, tokens = logp.max(dim=-1)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, opts.eos_id))
        logprob += torch.where(alive, best_logp, torch.zeros_like(best_logp))
        prefix = torch.cat([prefix, tokens[:, None]], dim=1)
        alive &= tokens != opts.eos_id
        if not alive.any():
            break
    return _hypotheses(prefix[:, 1:], logprob, opts.eos_id, [])


@torch.inference_mode()
def beam_search(model: CaptionModel, images: torch.Tensor, opts: SearchOptions, *, beam: int = 3,
                length_penalty: float = 0.0, no_repeat_ngram: int = 0, need_weights: bool = False,
                n_best: int = 1, static: bool | None = None) -> list[Hypothesis]:
    """Keep the `beam` best prefixes per image; all (images x beams) rows advance as one batch.

    Finished hypotheses are ranked by logprob / length**length_penalty (0 = plain log-probability,
    1 = per-token average). `no_repeat_ngram` > 0 forbids repeating any n-gram of that size.
    n_best > 1 (at most `beam`) also returns each image's next best finished hypotheses, ranked, as the
    best one's `runners_up`: the search only stops once no live beam can beat the beam-th best finished
    one, so the first `beam` of them are final. `static` as in `greedy`.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if not 1 <= n_best <= beam:
        raise ValueError(f"n_best must be between 1 and beam ({beam}), got {n_best}")
    B, device = images.shape[0], images.device
    K = beam
    encoded = model.encode(images)
    # (B*K) rows, the beams of an image adjacent
    steps = model.begin(encoded.memory, per_image=K, static_len=_static_len(static, images, opts, need_weights))
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
        best, *runners_up = [Hypothesis(seq, lp, score, crosses, encoded.grid) for score, lp, seq, crosses in ranked]
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
           generator: torch.Generator | None = None, static: bool | None = None) -> list[list[Hypothesis]]:
    """Draw `n` captions per image from the (temperature, top-k, nucleus top-p) filtered distribution.

    `static` as in `greedy`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, device = images.shape[0], images.device
    memory = model.encode(images).memory  # (B, N, D)
    steps = model.begin(memory, per_image=n, static_len=_static_len(static, images, opts, False))  # (B*n) rows
    banned = opts.banned()
    tokens = torch.full((B * n,), opts.bos_id, dtype=torch.long, device=device)
    out = torch.full((B * n, opts.max_len), opts.eos_id, dtype=torch.long, device=device)
    logprob = torch.zeros(B * n, device=device)
    alive = torch.ones(B * n, dtype=torch.bool, device=device)
    for t in range(opts.max_len):
        logits, _ = steps.step(tokens)
        logp = _log_probs(logits / temperature, banned)  # (B*n, V)
        filtered = filter_logits(logp, top_k=top_k, top_p=top_p)
        tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, opts.eos_id))
        logprob += torch.where(alive, logp.gather(1, tokens[:, None]).squeeze(1), torch.zeros_like(logprob))
        out[:, t] = tokens
        alive &= tokens != opts.eos_id
        if not alive.any():
            break
    flat = _hypotheses(out, logprob, opts.eos_id, [])
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


def _hypotheses(out: torch.Tensor, logprob: torch.Tensor, eos_id: int, crosses: list[torch.Tensor],
                grid: tuple[int, int] | None = None) -> list[Hypothesis]:
    """Cut each row at its first <eos> and package it, ranked by its logprob (with its attention when recorded)."""
    rows = out.tolist()
    cross = torch.stack(crosses, dim=0) if crosses else None  # (T, L, B, H, N)
    results = []
    for b, row in enumerate(rows):
        length = row.index(eos_id) if eos_id in row else len(row)
        weights = None
        if cross is not None:
            # one map per generated word, plus the step that produced <eos> when there is one
            steps = min(length + 1, cross.shape[0])
            weights = cross[:steps, :, b]  # (T, L, H, N)
        results.append(Hypothesis(row[:length], float(logprob[b]), float(logprob[b]), weights, grid))
    return results


# ----------------------------------------------------------------------------- settings -> captions


@dataclass
class Caption:
    """A caption of one image: its words, its log-probability, and optionally where it looked."""

    text: str
    words: list[str]
    logprob: float
    score: float  # what the search ranked by (equals logprob unless a length penalty was used)
    cross: torch.Tensor | None = None  # (T, L, H, N) decoder cross-attention per word (+ <eos> step)
    grid: tuple[int, int] | None = None  # (h, w): N = h*w regions of the encoder
    runners_up: list[Caption] = field(default_factory=list)  # the next best of a beam search, with n_best > 1


@dataclass
class DecodeSettings:
    """How to search for captions; validated before any work starts."""

    beam: int = 1
    max_len: int = 30
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    n_best: int = 1  # captions kept per image (beam search only): the best, then its runners-up
    # On a GPU, replay each decoding step from a CUDA graph (fixed-size caches; the same captions). Off: the
    # step's kernels launched one by one, a way out should a driver refuse the recording.
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.beam <= 64:
            raise ConfigError(f"--beam must be between 1 and 64, got {self.beam}")
        if not 1 <= self.n_best <= self.beam or (self.n_best > 1 and self.sample):
            raise ConfigError(f"--n-best must be between 1 and --beam ({self.beam}) and needs beam search, "
                              f"got {self.n_best}")
        if not 1 <= self.max_len <= 500:
            raise ConfigError(f"--max-len must be between 1 and 500, got {self.max_len}")
        if self.no_repeat_ngram < 0:
            raise ConfigError(f"--no-repeat-ngram must be >= 0, got {self.no_repeat_ngram}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


def search_options(vocab: Vocabulary, max_len: int) -> SearchOptions:
    """Search options with the vocabulary's named specials (<bos> starts, <eos> ends, <pad>/<unk> banned)."""
    return SearchOptions(bos_id=vocab.bos_id, eos_id=vocab.eos_id, max_len=max_len, pad_id=vocab.pad_id,
                         unk_id=vocab.unk_id)


def decode_batch(model: CaptionModel, vocab: Vocabulary, images: torch.Tensor,
                 settings: DecodeSettings | None = None, *, need_weights: bool = False) -> list[Caption]:
    """The one place that turns settings into a search: sampling, greedy, or beam search over images (B, 3, S, S)."""
    settings = settings or DecodeSettings()
    opts = search_options(vocab, settings.max_len)
    static = None if settings.cuda_graph else False  # None: static (and graphed) on a GPU
    if settings.sample:
        g = torch.Generator(device=images.device).manual_seed(settings.seed)
        hyps = [h[0] for h in sample(model, images, opts, temperature=settings.temperature, top_k=settings.top_k,
                                     top_p=settings.top_p, generator=g, static=static)]
    elif settings.beam == 1 and settings.no_repeat_ngram == 0:
        hyps = greedy(model, images, opts, need_weights=need_weights, static=static)
    else:
        hyps = beam_search(model, images, opts, beam=settings.beam, length_penalty=settings.length_penalty,
                           no_repeat_ngram=settings.no_repeat_ngram, need_weights=need_weights,
                           n_best=settings.n_best, static=static)
    return [_caption(vocab, h) for h in hyps]


def _caption(vocab: Vocabulary, h: Hypothesis) -> Caption:
    """Token ids -> words; specials are never generated, so the words align with h.cross."""
    text = vocab.decode(h.tokens)
    return Caption(text, text.split(), h.logprob, h.score, h.cross, h.grid,
                   [_caption(vocab, r) for r in h.runners_up])
