"""Text generation and perplexity with a language-model bundle (graphs of compiler/lm_compile.py,
format_spec/NDC-v1.md §4.6).

    sess = nd.Session("gemma.ndc", policy=nd.Policy(bits="4"))
    r = sess.generate("The capital of France is", max_new_tokens=32)   # greedy
    print(r.text, r.token_ids, r.stats["decode_tokens_per_s"])
    for tok in sess.stream(prompt_ids=[2, 651, 6037], temperature=0.8, top_p=0.95, seed=1):
        print(tok.text, end="", flush=True)

Generation prefills the prompt in one pass (logits of its last position only), then runs one token
per step against the KV caches the session's plan keeps (Session.state). Statistics add up every
call: bytes read, per-layer counts as `nadoo run` reports them, time to first token, decode speed.
Text needs the bundle's tokenizer: its compact BPE tables (runtime/bpe.py) where the compiler stored them,
else the `tokenizers` package; token ids in and out need neither.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .chunked.lm_head import sampling
from .errors import BundleError, InputError

__all__ = ["GeneratedToken", "GenerationResult", "LanguageModel", "Sampler", "TokenStream", "generate", "perplexity",
           "stream"]

LM_INPUTS = ("input_ids", "position_ids", "logits_to_keep")


# ------------------------------------------------------------------ sampling
@dataclass
class Sampler:
    """Greedy when temperature is 0; else softmax(logits / temperature) restricted to the top_k most
    likely tokens (0 = all) and then to the smallest set whose probability reaches top_p."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        ids = np.arange(z.size)
        if 0 < self.top_k < z.size:
            ids = np.argpartition(-z, self.top_k - 1)[: self.top_k]
        p = np.exp(z[ids] - z[ids].max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            ids, p = ids[keep], p[keep] / p[keep].sum()
        return int(ids[self._rng.choice(ids.size, p=p)])


# ------------------------------------------------------------------ the model behind a session
class LanguageModel:
    """A session's bundle as a language model: its settings, tokenizer and one forward step."""

    def __init__(self, session):
        info = session.bundle.lm
        if info is None:
            raise InputError(f"{session.bundle.path} is not a language-model bundle "
                             "(compile a GGUF file or a Hugging Face model folder)")
        if tuple(session.plan.input_names) != LM_INPUTS or session.plan.output_names != ["logits"]:
            raise BundleError(f"corrupt bundle: a language model's graph takes {', '.join(LM_INPUTS)} and returns logits")
        self.session, self.info = session, info
        self._tokenizer = None

    def tokenizer(self, needed_for: str | None = None):
        """The bundle's tokenizer; None when it has none (an InputError naming `needed_for` if given)."""
        if self._tokenizer is None:
            bundle = self.session.bundle
            tables = self.info.tokenizer_tables(bundle)  # when stored, the tokenizer.json is not even read
            text = self.info.tokenizer_bytes(bundle) if tables is None else None
            if tables is None and text is None:
                if needed_for:
                    raise InputError(f"this bundle stores no tokenizer, so {needed_for} is not possible; pass token ids")
                return None
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer(text, bos_id=self.info.bos_id, add_bos=self.info.add_bos, tables=tables)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer("encoding text").encode(text)

    def encode_chat(self, messages) -> list[int]:
        """Token ids of `messages` rendered by the bundle's chat template, ready for the model's answer.
        The template writes the special tokens itself (BOS included), so none is added twice."""
        from .chat import render

        tok = self.tokenizer("a chat prompt")
        def name(i):
            return tok.token_text(i) if i is not None else ""

        text = render(self.info.chat_template, messages, bos_token=name(self.info.bos_id),
                      eos_token=name(self.info.eos_ids[0] if self.info.eos_ids else None))
        ids = tok.encode(text)
        if tok.add_bos and len(ids) > 1 and ids[1] == tok.bos_id:
            ids = ids[1:]
        return ids

    def check_ids(self, ids, what: str = "prompt") -> list[int]:
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise InputError(f"{what} must be a sequence of token ids") from None
        if not out:
            raise InputError(f"{what} is empty: nothing to continue")
        bad = [i for i in out if not 0 <= i < self.info.vocab]
        if bad:
            raise InputError(f"{what} token id {bad[0]} outside the vocabulary of {self.info.vocab}")
        return out

    def forward(self, ids, start: int, keep: int = 1) -> tuple[np.ndarray, dict]:
        """Logits [keep, vocab] of the last `keep` of `ids` (0 = all), which continue the cached
        sequence at position `start` (0 starts a new one), and the call's statistics."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        feeds = {"input_ids": ids, "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None],
                 "logits_to_keep": np.array([keep], np.int64)}
        (logits,), st = self.session.run_with_stats(None, feeds)
        return logits[0], st


class _Totals:
    """Statistics summed over the calls of one generation (or perplexity run); `chunks_total` stays
    the chunks the layers hold."""

    _SUMS = ("bytes_read", "disk_bytes_read", "payloads_read", "chunks_read", "macs", "dense_macs",
             "cache_hits", "cache_misses")
    _LAYER_SUMS = ("chunks_read", "bytes_read", "macs", "dense_macs")

    def __init__(self):
        self.sums = dict.fromkeys(self._SUMS, 0)
        self.layers: dict[str, dict] = {}
        self.calls = 0
        self.ffn_counts: dict | None = None
        self.ffn_window_bytes = 0  # the most the MLPs' neuron windows held after a call
        self.lm_head: dict | None = None  # the routed head's counts (runtime/chunked/lm_head.py), summed
        # MoE (runtime/chunked/moe.py), summed: bytes of the experts tokens were routed to, expert
        # bytes read from the file (cache misses, prefetch), and all experts' bytes at the tiers used
        self.moe = {"used": 0.0, "read": 0, "total": None}

    def add(self, st: dict) -> None:
        self.calls += 1
        for k in self._SUMS:
            self.sums[k] += st[k]
        self.sums["chunks_total"] = st["chunks_total"]
        for name, layer in st["layers"].items():
            acc = self.layers.setdefault(name, {**layer, **dict.fromkeys(self._LAYER_SUMS, 0)})
            for k in self._LAYER_SUMS:
                acc[k] += layer[k]
        if "ffn_counts" in st:  # FFN activation sparsity: neurons skipped, positions computed dense
            acc = self.ffn_counts = self.ffn_counts or dict.fromkeys(st["ffn_counts"], 0)
            for k, v in st["ffn_counts"].items():
                acc[k] += v
            self.ffn_window_bytes = max(self.ffn_window_bytes, st.get("ffn_window_bytes", 0))
        moe = st.get("moe")
        if moe is not None:
            self.moe["used"] += moe["expert_bytes_per_token"] * moe["tokens"]
            self.moe["read"] += moe["expert_bytes_read"]
            self.moe["total"] = moe["all_expert_bytes"]
        head = st.get("lm_head")
        if head is not None:
            if self.lm_head is None:
                self.lm_head = dict(head)
            else:
                for k in ("calls", "routed_calls", "chunks_read", "certified_calls", "macs", "dense_macs"):
                    self.lm_head[k] += head[k]
                self.lm_head["tail_mass_max"] = max(self.lm_head["tail_mass_max"], head["tail_mass_max"])

    def head_stats(self, temperature: float, prefill: dict | None) -> dict:
        """The LM head's figures per decoded token, its counts after `prefill` (None where the bundle's
        head is not routable or, for the certified rate, when nothing was certified: dense head or
        sampling)."""
        h = self.lm_head
        if h and prefill:
            h = {**h, **{k: h[k] - prefill[k] for k in ("calls", "routed_calls", "chunks_read", "certified_calls",
                                                        "macs", "dense_macs")}}
        per = (lambda k: h[k] / h["calls"]) if h and h["calls"] else (lambda k: None)
        return {"lm_head_chunks_read_per_token": per("chunks_read"),
                "lm_head_chunks_total": h["chunks_total"] if h else None,
                "lm_head_certified_rate": (h["certified_calls"] / h["routed_calls"]
                                           if h and h["routed_calls"] and temperature == 0 else None),
                "lm_head_tail_mass_max": h["tail_mass_max"] if h and h["routed_calls"] and temperature > 0 else None,
                "lm_head_macs_per_token": per("macs"), "lm_head_dense_macs_per_token": per("dense_macs")}

    def moe_stats(self, prefill: dict, steps: int) -> dict:
        """Expert bytes per decoded token (after the `prefill` snapshot of self.moe): those of the
        experts each token was routed to, and those read from the file; None without MoE layers."""
        m, per = self.moe, (lambda k: (self.moe[k] - prefill[k]) / steps if steps else None)
        on = m["total"] is not None
        return {"expert_bytes_per_token": per("used") if on else None,
                "expert_bytes_read_per_token": per("read") if on else None,
                "expert_bytes_total": m["total"]}

    def as_dict(self, session) -> dict:
        from .session import peak_rss_bytes

        s = self.sums
        return {**s, "cache_hit_rate": s["cache_hits"] / max(s["cache_hits"] + s["cache_misses"], 1),
                "calls": self.calls, "peak_rss_bytes": peak_rss_bytes(),
                "resident_weight_bytes": session.resident_weight_bytes, "engine": session.engine,
                "ort_nodes": session.ort_nodes,
                "cache_budget_bytes": session.cache.budget,
                "kv_cache_bytes": session.state.nbytes, "bundle_bytes": session.bundle.file_size,
                "policy": {"bits": session.policy.bits, "kind": session.policy.kind,
                           "bits_for": dict(session.policy.bits_for),
                           "attention": session.policy.attention.describe()}, "layers": self.layers,
                **self._ffn()}

    def _ffn(self) -> dict:
        from .chunked.gated_ffn import ffn_rates

        n = self.ffn_counts
        return {} if n is None else {"ffn_counts": n, **ffn_rates(n), "ffn_window_bytes": self.ffn_window_bytes}

    def ffn_per_token(self, prefill: dict | None, steps: int) -> dict:
        """The MLPs' bytes read per decoded token (after the `prefill` snapshot of ffn_counts): all of
        gate, up and down, and down's alone; None without gated MLPs or decode steps."""
        n = self.ffn_counts
        per = (lambda k: (n[k] - (prefill or {}).get(k, 0)) / steps) if n and steps else (lambda k: None)
        return {"ffn_bytes_read_per_token": per("bytes_read"), "ffn_down_bytes_read_per_token": per("down_bytes_read")}


def _kv_mark(session) -> tuple[int, float]:
    """(KV bytes read, seconds in attention) so far: differences of two marks give a span's share."""
    return session.state.bytes_read, session.state.attention_s


def _kv_per_token(session, since: tuple[int, float], tokens: int) -> dict:
    b, s = _kv_mark(session)
    return {"kv_bytes_read_per_token": (b - since[0]) / tokens if tokens else None,
            "attention_s_per_token": (s - since[1]) / tokens if tokens else None}


# ------------------------------------------------------------------ generation
@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str | None  # the text this token completes ('' while a character is partial); None without tokenizer


@dataclass
class GenerationResult:
    text: str | None
    token_ids: list[int]  # generated tokens (an EOS that stopped generation included)
    prompt_ids: list[int]
    stop_reason: str  # "eos" | "length"
    stats: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The object `nadoo generate --json` prints."""
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": len(self.prompt_ids),
                "stop_reason": self.stop_reason, **self.stats}


class TokenStream:
    """Iterating runs the model: the prefill on the first step, then one decode step per token. Yields
    GeneratedToken; once exhausted, `result` is the GenerationResult (text = the yielded texts joined)."""

    def __init__(self, lm: LanguageModel, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                 stop_at_eos: bool = True):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        limit = lm.info.max_positions
        if len(prompt_ids) + max_new_tokens - 1 > limit:
            raise InputError(f"a prompt of {len(prompt_ids)} tokens and {max_new_tokens} new tokens exceed the "
                             f"model's {limit} positions")
        self.lm, self.prompt_ids, self.max_new, self.sampler = lm, prompt_ids, max_new_tokens, sampler
        self.eos = set(lm.info.eos_ids) if stop_at_eos else set()
        self.result: GenerationResult | None = None
        self._restarts = None
        self._steps = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> GeneratedToken:
        return next(self._steps)

    def _step(self, ids, start: int, totals: _Totals) -> np.ndarray:
        state = self.lm.session.state
        with state.lock:
            if start and state.restarts != self._restarts:
                raise InputError("another sequence used this session's KV cache since this generation started "
                                 "(a session generates one sequence at a time)")
            with sampling(self.sampler.temperature):  # a routed LM head covers what the sampler may pick
                logits, st = self.lm.forward(ids, start)
            self._restarts = state.restarts
        totals.add(st)
        return logits[-1]

    def _run(self):
        tok = self.lm.tokenizer()
        decoder = tok.stream() if tok is not None else None
        totals, ids, texts = _Totals(), [], []
        n = len(self.prompt_ids)
        t0 = time.perf_counter()
        logits = self._step(self.prompt_ids, 0, totals)
        prefill_bytes = totals.sums["bytes_read"]
        kv_mark = _kv_mark(self.lm.session)  # decode steps only: what each generated token costs
        prefill_macs = totals.sums["macs"], totals.sums["dense_macs"]
        prefill_head = dict(totals.lm_head) if totals.lm_head else None
        prefill_moe = dict(totals.moe)
        prefill_ffn = dict(totals.ffn_counts) if totals.ffn_counts else None
        t_first = None
        stop = "length"
        while True:
            t = self.sampler(logits)
            ids.append(t)
            if t_first is None:
                t_first = time.perf_counter()
            last = len(ids) == self.max_new or t in self.eos
            if t in self.eos:
                stop = "eos"
            text = None
            if decoder is not None:
                # A model's vocabulary may be padded beyond its tokenizer's: such an id has no text.
                text = decoder.push(t) if t < tok.vocab_size else ""
                text += decoder.flush() if last else ""
                texts.append(text)
            if last:
                t_end = time.perf_counter()
                steps = len(ids) - 1
                decode_bytes = totals.sums["bytes_read"] - prefill_bytes
                stats = {"ttft_s": t_first - t0, "prefill_tokens_per_s": n / max(t_first - t0, 1e-12),
                         "decode_s": t_end - t_first, "decode_tokens_per_s": steps / (t_end - t_first) if steps else None,
                         "prefill_bytes_read": prefill_bytes,
                         "bytes_read_per_token": decode_bytes / steps if steps else None,
                         **_kv_per_token(self.lm.session, kv_mark, steps),
                         **totals.as_dict(self.lm.session),
                         "macs_per_token": (totals.sums["macs"] - prefill_macs[0]) / steps if steps else None,
                         "dense_macs_per_token": (totals.sums["dense_macs"] - prefill_macs[1]) / steps if steps else None,
                         **totals.head_stats(self.sampler.temperature, prefill_head),
                         **totals.moe_stats(prefill_moe, steps),
                         **totals.ffn_per_token(prefill_ffn, steps)}
                self.result = GenerationResult("".join(texts) if decoder is not None else None, ids,
                                               list(self.prompt_ids), stop, stats)
                yield GeneratedToken(t, text)
                return
            yield GeneratedToken(t, text)
            logits = self._step([t], n + len(ids) - 1, totals)


def _prompt(lm: LanguageModel, prompt, prompt_ids, messages=None) -> list[int]:
    if sum(x is not None for x in (prompt, prompt_ids, messages)) != 1:
        raise InputError("give one of a text prompt, prompt_ids or chat messages")
    if messages is not None:
        return lm.check_ids(lm.encode_chat(messages), "the encoded chat prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be text, got {type(prompt).__name__} (token ids go in prompt_ids)")
        return lm.check_ids(lm.encode(prompt), "the encoded prompt")
    return lm.check_ids(prompt_ids)


def stream(session, prompt: str | None = None, *, prompt_ids=None, messages=None, max_new_tokens: int = 32,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           stop_at_eos: bool = True) -> TokenStream:
    """messages: a chat ([{"role": "user", "content": ...}, ...]) rendered by the bundle's chat template."""
    lm = LanguageModel(session)
    sampler = Sampler(temperature, top_k, top_p, seed)
    return TokenStream(lm, _prompt(lm, prompt, prompt_ids, messages), max_new_tokens, sampler, stop_at_eos)


def generate(session, prompt: str | None = None, **kw) -> GenerationResult:
    s = stream(session, prompt, **kw)
    for _ in s:
        pass
    return s.result


# ------------------------------------------------------------------ perplexity
def perplexity(session, text: str | None = None, *, ids=None, context: int = 512, score: str = "half") -> dict:
    """Perplexity as llama.cpp's perplexity tool computes it: the token stream (BOS first when the model
    adds one) cut into consecutive windows of `context` tokens, each window's first token replaced by
    BOS; score="half" scores the second half of each window (every token there has at least
    context/2 tokens of history), "all" every token after the first."""
    lm = LanguageModel(session)
    if score not in ("half", "all"):
        raise InputError(f"score must be 'half' or 'all', got {score!r}")
    if not isinstance(context, int) or not 2 <= context <= lm.info.max_positions:
        raise InputError(f"context must be 2 .. {lm.info.max_positions} tokens (the model's positions), got {context!r}")
    if (text is None) == (ids is None):
        raise InputError("give either text or ids")
    ids = lm.check_ids(lm.encode(text) if text is not None else ids, "the text" if text is not None else "ids")
    n_windows = len(ids) // context
    if n_windows == 0:
        raise InputError(f"{len(ids)} tokens are fewer than one window of {context}")
    first = context // 2 if score == "half" else 0
    totals, nll = _Totals(), []
    t0 = time.perf_counter()
    kv_mark = _kv_mark(session)
    for w in range(n_windows):
        win = ids[w * context:(w + 1) * context]
        if lm.info.add_bos:
            win = [lm.info.bos_id] + win[1:]
        with session.state.lock:
            logits, st = lm.forward(win, 0, keep=context - first)
        totals.add(st)
        nll.append(_nll(logits[:-1], np.asarray(win[first + 1:])))  # position p predicts token p + 1
    nll = np.concatenate(nll)
    return {"perplexity": float(math.exp(nll.mean())), "tokens_scored": int(nll.size), "windows": n_windows,
            "context": context, "score": score, "nll_mean": float(nll.mean()), "seconds": time.perf_counter() - t0,
            **_kv_per_token(session, kv_mark, n_windows * context), **totals.as_dict(session)}


def _nll(logits: np.ndarray, targets: np.ndarray, rows: int = 64) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64, a block of rows at a time (a 512-token window
    of a 262k vocabulary is 0.5 GB of logits; its float64 copies need not all exist at once)."""
    out = np.empty(len(targets))
    for r in range(0, len(targets), rows):
        x = logits[r:r + rows].astype(np.float64)
        m = x.max(axis=-1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
        out[r:r + rows] = lse - x[np.arange(len(x)), targets[r:r + rows]]
    return out
