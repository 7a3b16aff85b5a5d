"""Batched generation with stop strings, seeded sampling and one record per sample.

A run is a *plan* of batches that is a pure function of the prompts, the tokenizer and the config
(:func:`plan_batches`), and each batch is generated independently of the others
(:meth:`Generator.generate_batch` seeds its own random state from ``(seed, batch_index)``). So a run
resumed after a crash regenerates exactly the batches it had not finished, with the same results.

Decoding is Hugging Face ``generate`` with left padding (the last prompt token is position -1 of
every row), stop strings through ``stop_strings=`` (a row stops once its text ends with one; the
others go on), and the model's EOS ids. Stop strings are then cut from the text: ``completion`` is
the new text up to the earliest stop string, ``raw_completion`` everything generated.

With the fast backend, :meth:`Generator.generate_queue` runs items by continuous batching instead of
a plan of batches: each item's sampling is keyed by (seed, task_id, sample_index) and each item may
carry its own steering, so an item's sample depends neither on its neighbours nor on the queue order;
finished samples are handed to a callback as the queue runs.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import StopStringCriteria

from pva_sae.config import GenerationConfig
from pva_sae.model.fastgen import (
    FastGenError,
    StaticDecoder,
    flex_available,
    free_memory_batch_size,
    supports,
)
from pva_sae.model.hooks import SteeringHook

if TYPE_CHECKING:
    from pva_sae.model.fastgen import Steering
    from pva_sae.model.registry import LoadedModel

log = logging.getLogger(__name__)

PlanItem = tuple[int, int, str]  # (task_id, sample_index, prompt)


@dataclass
class Sample:
    task_id: int
    sample_index: int
    prompt: str
    completion: str        # new text up to (not including) the earliest stop string
    raw_completion: str    # all new text, uncut (special tokens such as EOS left out)
    n_prompt_tokens: int   # without padding, with BOS
    n_new_tokens: int      # generated tokens up to and including the one that stopped the row
    gen_time_s: float      # the batch's wall time divided evenly among its samples
    finish_reason: str     # 'stop' (stop string), 'eos' or 'length' (max_new_tokens reached)
    temperature: float
    batch_index: int


# --------------------------------------------------------------------------- plan

def plan_batches(prompts: Sequence[tuple[int, str]], tokenizer: Any, batch_size: int, n_samples: int,
                 sort_by_length: bool = True, max_batch_tokens: int | None = None,
                 max_new_tokens: int = 0) -> list[list[PlanItem]]:
    """Split ``n_samples`` copies of every (task_id, prompt) into batches; batch i has batch_index i.

    With ``sort_by_length`` the items are ordered by prompt token length, longest first, ties by
    task_id then sample_index: rows of a batch need little padding, and the largest batch comes
    first, so running out of memory shows at once rather than hours in. The plan depends on its
    arguments only, so a resumed run rebuilds the same batches.

    ``max_batch_tokens`` caps rows x (longest prompt + max_new_tokens) per batch: a few very long
    prompts (MBPP has one of ~2,600 tokens) then get small batches of their own instead of making
    fifteen short rows carry thousands of padding positions through every decode step.
    """
    if batch_size < 1 or n_samples < 1:
        raise ValueError(f"batch_size and n_samples must be >= 1, got {batch_size} and {n_samples}")
    task_ids = [task_id for task_id, _ in prompts]
    if len(set(task_ids)) != len(task_ids):
        raise ValueError("plan_batches got the same task_id twice; each task must appear once")
    items = [(task_id, s, prompt) for task_id, prompt in prompts for s in range(n_samples)]
    lengths = {task_id: len(tokenizer(prompt)["input_ids"]) for task_id, prompt in prompts}
    if sort_by_length:
        items.sort(key=lambda item: (-lengths[item[0]], item[0], item[1]))
    batches: list[list[PlanItem]] = []
    current: list[PlanItem] = []
    longest = 0
    for item in items:
        width = max(longest, lengths[item[0]]) + max_new_tokens
        too_many_tokens = max_batch_tokens is not None and current and (len(current) + 1) * width > max_batch_tokens
        if len(current) == batch_size or too_many_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, lengths[item[0]])
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------- seeding

def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for one batch, from the run seed and the batch's position in the plan.

    Hashing (rather than seed + batch_index) keeps the streams of neighbouring seeds unrelated.
    """
    digest = hashlib.sha256(f"pva-sae:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_key(seed: int, task_id: int, sample_index: int) -> int:
    """A 64-bit sampling key for one sample, from the run seed and the sample's (task_id, sample_index).

    Continuous batching draws each sample's tokens from its key alone (``fastgen.keyed_pick``), so a
    sample does not depend on which slot, batch or neighbours it was generated with.
    """
    digest = hashlib.sha256(f"pva-sae:sample:{seed}:{task_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@contextmanager
def seeded_rng(seed: int, device: "torch.device") -> Iterator[None]:
    """Seed torch's global RNGs (CPU and ``device``) inside a fork, restoring them afterwards.

    ``generate`` takes no ``torch.Generator``; it samples with ``torch.multinomial`` on the global
    generator of the logits' device. Forking makes a batch's samples depend only on its seed, and
    leaves the caller's random state untouched. Same hardware and library versions give the same
    samples; different GPUs may not.
    """

    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- generator

class Generator:
    """Generates one planned batch at a time with the decoding settings of ``cfg``."""

    def __init__(self, loaded: "LoadedModel", cfg: GenerationConfig):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.cfg = cfg
        self.sampling = cfg.temperature > 0
        self.eos_ids = eos_token_ids(loaded.model, loaded.tokenizer)
        self.stop_strings = tuple(cfg.stop_strings)
        self.hf_config = self._hf_generation_config()
        self._stop_criterion = self._make_stop_criterion()
        self._prompt_cache: dict[str, list[int]] = {}
        self._prompt_texts: dict[tuple[int, ...], str] = {}
        self._stop_memo: dict[tuple[int, ...], bool] = {}    # stop-string window -> the criterion's answer
        self.backend = resolve_backend(cfg.backend, loaded)
        self.fast = None
        if self.backend == "fast":

            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
            self.fast = StaticDecoder(loaded.model, self.eos_ids, pad,
                                      compile=cfg.compile and loaded.device.type == "cuda",
                                      attention=resolve_attention(cfg.attention, loaded.device))

    def _hf_generation_config(self) -> Any:
        """Every setting that changes the output is explicit, so a checkpoint's generation_config.json
        (Llama's sets do_sample, temperature 0.6, top_p 0.9) cannot alter decoding."""

        return HFGenerationConfig(
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=self.sampling,
            temperature=self.cfg.temperature if self.sampling else 1.0,
            top_p=self.cfg.top_p if self.sampling else 1.0,
            top_k=0 if self.sampling else None,  # 0 disables the library's default top-k of 50
            typical_p=1.0,
            repetition_penalty=1.0,
            num_beams=1,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(self.stop_strings) or None,
        )

    def _make_stop_criterion(self) -> Any:
        """The same criterion ``generate`` builds for ``stop_strings``, used afterwards to find the
        step at which each row stopped (the library does not report it)."""
        if not self.stop_strings:
            return None
        return stop_criterion(self.tokenizer, self.stop_strings)

    def generate_batch(self, batch: Sequence[PlanItem], batch_index: int, steering: "Steering | None" = None
                       ) -> list[Sample]:
        """Generate every item of ``batch``; samples come back in batch order.

        ``steering`` adds ``alpha * direction`` at one layer while generating (hooks.SteeringHook with
        the 'hf' backend, inside the captured step with 'fast').
        """

        if not batch:
            raise ValueError(f"batch {batch_index} is empty; plan_batches never makes empty batches")
        prompts = [prompt for _, _, prompt in batch]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.loaded.device)
        started = time.perf_counter()
        seed = batch_seed(self.cfg.seed, batch_index)
        if self.fast is not None:
            out = self._generate_fast(enc, seed, steering)
        else:
            with torch.inference_mode(), seeded_rng(seed, self.loaded.device), _steering_hook(self.model, steering):
                out = self.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                          generation_config=self.hf_config, tokenizer=self.tokenizer)
        elapsed = time.perf_counter() - started
        out = out.cpu()                                       # (B, P + T)
        prompt_len = enc["input_ids"].shape[1]
        ends, reasons = self._row_ends(out, prompt_len)
        attention = enc["attention_mask"].cpu()               # (B, P), zeros on the left padding
        per_sample = elapsed / len(batch)
        return [
            self._sample(item, out[row], attention[row], prompt_len, int(ends[row]), reasons[row],
                         per_sample, batch_index)
            for row, item in enumerate(batch)
        ]

    def generate_queue(self, items: Sequence[PlanItem], queue_index: int = 0,
                       steering: "Steering | Sequence[Steering | None] | None" = None, slots: int | None = None,
                       on_samples: "Callable[[list[tuple[int, Sample]]], None] | None" = None) -> list[Sample]:
        """Generate every item with continuous batching (fast backend): ``slots`` rows decode at once and a
        row that ends (EOS, stop string, token limit) hands its slot to the next item, so no step is spent
        on finished rows. Samples come back in ``items`` order, with ``batch_index = queue_index``.

        Greedy samples equal :meth:`generate_batch`'s; sampled tokens are drawn from each sample's
        :func:`sample_key` (seed, task_id, sample_index), so they do not depend on the order of ``items``,
        on ``slots`` or on the device's batch size. ``slots`` defaults to ``generation.batch_size``, or
        for 0 to the largest batch the free GPU memory holds.

        ``steering``: one for every item, or one per item (None: unsteered; the steered items must share
        layer, site and positions), each item then generating what :meth:`generate_batch` gives it under
        its own steering. ``on_samples`` gets ``(item index, Sample)`` pairs of the rows that ended at each
        stop check while the queue runs; a sample's ``gen_time_s`` is the wall time since the previous check
        that ended rows, divided among the rows it ended.
        """

        if self.fast is None:
            raise FastGenError(f"continuous batching runs on the fast decoder; generation.backend resolved to "
                               f"{self.backend!r}: use generate_batch, or backend='fast' with a Gemma-2 model")
        if not items:
            return []
        prompt_ids = [self.prompt_ids(prompt) for _, _, prompt in items]
        if slots is None:
            slots = self.cfg.batch_size if self.cfg.batch_size > 0 else free_memory_batch_size(
                self.model, max(len(p) for p in prompt_ids) + self.cfg.max_new_tokens)
        keys = [sample_key(self.cfg.seed, task_id, sample_index) for task_id, sample_index, _ in items]
        samples: list[Sample | None] = [None] * len(items)
        last = [time.perf_counter()]

        def finished(rows: list[tuple[int, list[int], str]]) -> None:
            now = time.perf_counter()
            per_sample, last[0] = (now - last[0]) / len(rows), now
            done = []
            for index, new, reason in rows:
                samples[index] = self._sample_ids(items[index], list(prompt_ids[index]), list(new), reason,
                                                  per_sample, queue_index)
                done.append((index, samples[index]))
            if on_samples is not None:
                on_samples(done)

        self.fast.generate_queue(prompt_ids, self.cfg.max_new_tokens, slots, steering=steering,
                                 temperature=self.cfg.temperature, top_p=self.cfg.top_p, keys=keys,
                                 stop_check=self._queue_stop_checker(prompt_ids), on_finish=finished)
        return samples  # type: ignore[return-value]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, tokenized once per Generator: steering queues every task's prompt once per
        condition (about 120 times in a real-model study)."""
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            ids = self._prompt_cache[prompt] = list(self.tokenizer(prompt)["input_ids"])
        return ids

    def _queue_stop_checker(self, prompt_ids: Sequence[Sequence[int]]):
        """For continuous batching: the first step (since the row's last check) at which a row's text ends
        with a stop string: what the criterion ``generate`` applies after every step gives, asked only at the steps
        it can flag (:func:`stop_candidates`), each window's answer read from its tables (:func:`stop_matcher`)."""
        if self._stop_criterion is None:
            return None
        criterion = self._stop_criterion
        width = getattr(criterion, "maximum_token_len", None)
        can_fire = stop_candidates(criterion)
        matches = stop_matcher(criterion)
        # The criterion's answer for a window is a function of the window's ids alone: remembered, since the steered
        # rows of a study repeat their baseline's tokens (and so its windows) many times over.
        memo = self._stop_memo

        def check(requests):
            found: list[int | None] = [None] * len(requests)
            for r, (item, new, first) in enumerate(requests):
                prompt = prompt_ids[item]
                p, n = len(prompt), len(new)
                if first >= n:
                    continue
                steps = can_fire(new, first, prompt[-1] if p else None)    # the only steps the criterion can flag
                if not steps:
                    continue
                text = list(prompt) + list(new)
                for step in steps:                   # steps rise: the first hit is the row's answer
                    end = p + step + 1
                    if not width or end < width:     # shorter than a window: the prefix, as the library reads it
                        hit = matches(text[:end])
                    else:
                        window = tuple(text[end - width:end])
                        hit = memo.get(window)
                        if hit is None:
                            if len(memo) >= STOP_MEMO_MAX:
                                memo.clear()
                            hit = memo[window] = matches(window)
                    if hit:
                        found[r] = step
                        break
            return found

        return check

    def _generate_fast(self, enc, seed: int, steering) -> "torch.Tensor":
        generator = None
        if self.sampling:
            generator = torch.Generator(device=self.loaded.device)
            generator.manual_seed(seed)
        return self.fast.generate(enc["input_ids"], enc["attention_mask"], self.cfg.max_new_tokens, steering=steering,
                                  temperature=self.cfg.temperature, top_p=self.cfg.top_p, generator=generator,
                                  stop_check=self._stop_checker())

    def _stop_checker(self):
        """For the fast backend: marks rows whose text ends with a stop string at any step since the last
        check (the criterion ``generate`` applies after every step)."""
        if self._stop_criterion is None:
            return None
        checked = {"steps": 0}

        def check(out, prompt_len: int, done):
            steps, first = out.shape[1] - prompt_len, checked["steps"]
            checked["steps"] = steps
            live = (~done).nonzero().flatten()
            if len(live) and steps > first:
                hits = stop_hits(self._stop_criterion, out[live], prompt_len + first + 1, prompt_len + steps)
                done = done.clone()
                done[live] |= hits.any(dim=1)
            return done

        return check

    def _row_ends(self, out: "torch.Tensor", prompt_len: int) -> tuple["torch.Tensor", list[str]]:
        """Number of new tokens each row generated (pads after its end excluded), and what ended it.

        Replays the stopping rules of ``generate`` step by step: a row ends at the first EOS or at
        the first step its text ends with a stop string; rows that never end ran out of tokens.
        The criterion reads the end of the whole text, so a stop string that begins in the prompt
        also stops a row: it reports 'stop' though its completion holds no stop string to cut.
        """

        new = out[:, prompt_len:]                             # (B, T)
        n_rows, n_steps = new.shape
        done = torch.isin(new, torch.tensor(self.eos_ids))    # (B, T)
        reason_eos = done.clone()
        if self._stop_criterion is not None and n_steps:
            done |= stop_hits(self._stop_criterion, out, prompt_len + 1, prompt_len + n_steps)
        any_done = done.any(dim=1)
        first = done.float().argmax(dim=1)                   # (B,) first True, 0 when none
        ends = torch.where(any_done, first + 1, torch.full_like(first, n_steps))
        reasons = []
        for row in range(n_rows):
            if not any_done[row]:
                reasons.append("length")
            else:
                reasons.append("eos" if reason_eos[row, first[row]] else "stop")
        return ends, reasons

    def _sample(self, item: PlanItem, row: "torch.Tensor", attention: "torch.Tensor", prompt_len: int,
                n_new: int, reason: str, gen_time_s: float, batch_index: int) -> Sample:
        prompt_ids = row[:prompt_len][attention.bool()].tolist()
        new_ids = row[prompt_len:prompt_len + n_new].tolist()
        return self._sample_ids(item, prompt_ids, new_ids, reason, gen_time_s, batch_index)

    def _sample_ids(self, item: PlanItem, prompt_ids: list[int], new_ids: list[int], reason: str,
                    gen_time_s: float, batch_index: int) -> Sample:
        """The sample of a row whose prompt and new tokens (EOS included, if it ended on one) are ``prompt_ids``
        and ``new_ids``."""
        task_id, sample_index, prompt = item
        n_new = len(new_ids)
        if reason == "eos":
            new_ids = new_ids[:-1]  # the EOS token is not text
        key = tuple(prompt_ids)
        prompt_text = self._prompt_texts.get(key)
        if prompt_text is None:     # steering decodes every prompt once per condition: decode it once
            prompt_text = self._prompt_texts[key] = decode_ids(self.tokenizer, prompt_ids)
        raw = decode_continuation(self.tokenizer, prompt_ids, new_ids, prompt_text)
        completion, cut = cut_at_stop(raw, self.stop_strings)
        if cut:
            reason = "stop"
        return Sample(task_id=task_id, sample_index=sample_index, prompt=prompt, completion=completion,
                      raw_completion=raw, n_prompt_tokens=len(prompt_ids), n_new_tokens=n_new,
                      gen_time_s=gen_time_s, finish_reason=reason, temperature=self.cfg.temperature,
                      batch_index=batch_index)


STOP_MEMO_MAX = 1 << 18  # stop-string windows remembered per Generator (about 40 MB; then forgotten all at once)


_STOP_CRITERIA: dict[tuple[int, tuple[str, ...]], tuple[Any, Any]] = {}


def stop_criterion(tokenizer: Any, stop_strings: Sequence[str]) -> Any:
    """transformers' ``StopStringCriteria`` for ``stop_strings``, built once per tokenizer: building it reads the
    whole vocabulary (about 40 s for Gemma's 256,000 tokens, measured on the GPU machine), and every stage and
    sub-build makes a Generator on the same loaded tokenizer."""
    key = (id(tokenizer), tuple(stop_strings))
    hit = _STOP_CRITERIA.get(key)
    if hit is None or hit[0]() is not tokenizer:
        hit = (weakref.ref(tokenizer), StopStringCriteria(tokenizer, list(stop_strings)))
        _STOP_CRITERIA[key] = hit
        weakref.finalize(tokenizer, _STOP_CRITERIA.pop, key, None)     # dropped with its tokenizer
    return hit[1]


_STOP_TABLES: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def stop_tables(criterion: Any) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Per token id (the criterion's own tables, its last row standing for ids beyond the vocabulary), bit masks
    over the stop strings: END (the token can end a match of string s), ALONE (it holds all of s by itself) and
    MID (it can be the token just before one that ends s). The criterion matches s at the end of a text only when
    the last token t can end s and either holds all of it or the token u before it can continue the match, so it
    can return True only where ``END[t] & (ALONE[t] | MID[u]) != 0``: a necessary condition, read from the same
    tables, that lets every other step skip the criterion."""
    tables = _STOP_TABLES.get(criterion)
    if tables is None and not all(hasattr(criterion, a) for a in ("embedding_vec", "num_stop_strings",
                                                                   "max_valid_positions", "target_lens")):
        every = torch.ones(1, dtype=torch.long)        # another layout: every step is a candidate
        tables = _STOP_TABLES[criterion] = (every, every, every)
    if tables is None:
        emb = criterion.embedding_vec.cpu().long()
        n, positions = criterion.num_stop_strings, criterion.max_valid_positions
        valid = emb[:, :positions * n].unflatten(-1, (n, -1))      # the layout StopStringCriteria.__call__ reads
        ends = emb[:, positions * n:-1].unflatten(-1, (n, -1))
        target = criterion.target_lens.cpu().long()
        bits = 1 << torch.arange(n)

        def pack(mask):
            return (mask.long() * bits).sum(-1)

        tables = (pack((ends > 0).any(-1)), pack((ends >= target[None, :, None]).any(-1)), pack((valid > 0).any(-1)))
        _STOP_TABLES[criterion] = tables
    return tables


_STOP_MATCHERS: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def stop_matcher(criterion: Any) -> Callable[[Sequence[int]], bool]:
    """``matches(ids)``: what ``criterion(torch.tensor([ids]), None)[0]`` returns (whether the text ends with a stop
    string), from the criterion's own tables, walked in Python for one text instead of tensor ops over a batch.

    The criterion reads the last ``maximum_token_len`` tokens backwards: the last token matches the end of stop
    string s with one of its END lengths e > 0; each earlier token continues the match when the characters matched
    so far are one of its VALID positions in s, adding its length; s matches once the count reaches s's length.
    A criterion laid out otherwise is called as it is."""
    matcher = _STOP_MATCHERS.get(criterion)
    if matcher is not None:
        return matcher
    if not all(hasattr(criterion, a) for a in ("embedding_vec", "num_stop_strings", "max_valid_positions",
                                               "target_lens", "maximum_token_len")):
        def matcher(ids: Sequence[int]) -> bool:
            return bool(criterion(torch.tensor([list(ids)]), None)[0])
        _STOP_MATCHERS[criterion] = matcher
        return matcher
    emb = criterion.embedding_vec.cpu().long()
    n, positions = criterion.num_stop_strings, criterion.max_valid_positions
    valid = emb[:, :positions * n].unflatten(-1, (n, -1)).tolist()
    ends = emb[:, positions * n:-1].unflatten(-1, (n, -1)).tolist()
    lengths = emb[:, -1].tolist()
    targets = criterion.target_lens.cpu().long().tolist()
    top, width = len(lengths) - 1, int(criterion.maximum_token_len)
    # Per token: (string, its positive END lengths) pairs, and per string the set of its VALID positions.
    end_of = [[(k, [e for e in row[k] if e > 0]) for k in range(n) if any(e > 0 for e in row[k])] for row in ends]
    valid_of = [[frozenset(v for v in row[k] if v > 0) for k in range(n)] for row in valid]

    def matcher(ids: Sequence[int]) -> bool:
        ids = ids[-width:]
        if not len(ids):
            return False
        last = ids[-1] if ids[-1] < top else top
        for k, lens in end_of[last]:
            target = targets[k]
            for matched in lens:
                j = len(ids) - 2
                while matched < target and j >= 0:
                    t = ids[j] if ids[j] < top else top
                    if matched not in valid_of[t][k]:
                        break
                    matched += lengths[t]
                    j -= 1
                if matched >= target:
                    return True
        return False

    _STOP_MATCHERS[criterion] = matcher
    return matcher


def stop_candidates(criterion: Any) -> Callable[[Sequence[int], int, int | None], list[int]]:
    """``steps(new, first, before)``: the steps j >= first of the new tokens ``new`` at which the criterion can
    flag the text (see :func:`stop_tables`); ``before`` is the token before new[0] (None: none)."""
    end, alone, mid = (t.tolist() for t in stop_tables(criterion))
    top = len(end) - 1

    def steps(new: Sequence[int], first: int, before: int | None) -> list[int]:
        prev = new[first - 1] if first > 0 else before
        carry = 0 if prev is None else mid[prev if prev < top else top]    # MID bits of the token before step j
        out = []
        for j in range(first, len(new)):
            t = new[j]
            if t > top:
                t = top
            bits = end[t]
            if bits and bits & (alone[t] | carry):
                out.append(j)
            carry = mid[t]
        return out

    return steps


def stop_hits(criterion: Any, out: "torch.Tensor", first_end: int, last_end: int) -> "torch.Tensor":
    """(B, last_end - first_end + 1) bool: whether the text ``out[:, :end]`` ends with a stop string, for every
    end in first_end..last_end: what calling the criterion on each prefix gives. The criterion reads only the last
    ``maximum_token_len`` tokens of what it is given, so each end gets that window of ``out``, in one call over the
    ends where it can fire at all (:func:`stop_tables`); the few ends closer to the start than a window are called
    on their prefix, as the library would be."""
    width = int(criterion.maximum_token_len)
    end_bits, alone, mid = stop_tables(criterion)
    ids = out.cpu().clamp(max=len(end_bits) - 1)
    last = ids[:, first_end - 1:last_end]                                   # (B, E): the last token of each end
    before = (mid[ids[:, first_end - 2:last_end - 1]] if first_end >= 2 else
              torch.cat([torch.zeros((ids.shape[0], 1), dtype=torch.long), mid[ids[:, :last_end - 1]]], dim=1))
    can = (end_bits[last] & (alone[last] | before)) != 0
    hits = torch.zeros_like(can)
    rows, cols = can.nonzero(as_tuple=True)
    ends = cols + first_end
    short = ends < width
    for r, c, e in zip(rows[short].tolist(), cols[short].tolist(), ends[short].tolist()):
        hits[r, c] = bool(criterion(out[r:r + 1, :e], None)[0])
    if bool((~short).any()):
        r, c, e = rows[~short], cols[~short], ends[~short]
        windows = out.cpu()[r[:, None], e[:, None] - width + torch.arange(width)]
        hits[r, c] = criterion(windows, None).cpu().bool()
    return hits


def resolve_batch_size(generator: "Generator", prompts: Sequence[str]) -> int:
    """generation.batch_size, or for 0 the largest batch the free GPU memory holds (fast backend), else 16."""
    if generator.cfg.batch_size > 0:
        return generator.cfg.batch_size
    if generator.fast is None:
        return 16

    longest = max(len(generator.tokenizer(p)["input_ids"]) for p in prompts)
    return free_memory_batch_size(generator.model, longest + generator.cfg.max_new_tokens)


def resolve_attention(spec: str, device) -> str:
    """The fast decoder's attention for ``generation.attention``; 'flex' where FlexAttention cannot run compiled
    (off CUDA, or without Triton) is refused."""
    if spec == "flex" and not flex_available(device):
        raise FastGenError(f"generation.attention='flex' needs CUDA with Triton; the model is on {device}. Use "
                           "generation.attention=eager (or auto)")
    return spec


def resolve_backend(spec: str, loaded: "LoadedModel") -> str:
    """'auto' -> 'fast' for Gemma-2 on CUDA, else 'hf'; an explicit 'fast' on another model is an error."""

    if spec == "auto":
        return "fast" if loaded.device.type == "cuda" and supports(loaded.model) else "hf"
    if spec == "fast" and not supports(loaded.model):
        raise FastGenError(f"generation.backend='fast' implements Gemma-2 only; {loaded.path_or_id} is "
                           f"{loaded.model.config.model_type!r}: use 'hf' or 'auto'")
    return spec


@contextmanager
def _steering_hook(model, steering) -> Iterator[None]:
    if steering is None:
        yield
        return

    with SteeringHook(model, steering.layer, steering.direction, steering.alpha, site=steering.site,
                      positions=steering.positions):
        yield


# --------------------------------------------------------------------------- text helpers

def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids of the model's generation config plus the tokenizer's (instruction-tuned Gemma-2
    ends turns with <end_of_turn>, which only the generation config lists)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token; "
                         "set model.generation_config.eos_token_id")
    return tuple(ids)


def decode_continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int],
                        prompt_text: str | None = None) -> str:
    """Text of ``new_ids`` as it reads after the prompt (``prompt_text``: the decoded prompt, if known).

    Decoding the new tokens alone can lose a leading space with some tokenizers (SentencePiece
    strips it at the start of a text), so decode prompt + new and remove the decoded prompt.
    """
    if prompt_text is None:
        prompt_text = decode_ids(tokenizer, prompt_ids)
    full_text = decode_ids(tokenizer, prompt_ids + new_ids)
    if full_text.startswith(prompt_text):
        return full_text[len(prompt_text):]
    return decode_ids(tokenizer, new_ids)


# The transformers classes whose decode of a fast tokenizer is its Rust backend's decode, then (when
# clean_up_tokenization_spaces is set) a clean-up: 4.x (PreTrainedTokenizerFast) and 5.x (TokenizersBackend).
_BACKEND_DECODE_MODULES = ("transformers.tokenization_utils_fast", "transformers.tokenization_utils_tokenizers")
_BASE_DECODE_MODULES = ("transformers.tokenization_utils_base",) + _BACKEND_DECODE_MODULES
_DIRECT_DECODE: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, through the Rust backend's own decode where that is
    what the call does (a fast tokenizer without clean-up whose class does not change decoding): the library's
    call spends most of its time converting the id list (measured: 7 of 11 s over a study's 55,000 samples)."""
    try:
        direct = _DIRECT_DECODE.get(tokenizer)
    except TypeError:           # not weak-referenceable
        direct = None
    if direct is None:
        direct = _direct_decoder(tokenizer) or False
        try:
            _DIRECT_DECODE[tokenizer] = direct
        except TypeError:
            pass
    if direct:
        return direct(ids, skip_special_tokens=True)
    return tokenizer.decode(ids, skip_special_tokens=True)


def _direct_decoder(tokenizer: Any):
    """The backend's decode when ``tokenizer.decode(ids, skip_special_tokens=True)`` is exactly it, else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not callable(getattr(backend, "decode", None)) or \
            getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None

    def owner(name: str) -> str:
        cls = next((c for c in type(tokenizer).__mro__ if name in c.__dict__), None)
        return getattr(cls, "__module__", "")

    if owner("_decode") not in _BACKEND_DECODE_MODULES or owner("decode") not in _BASE_DECODE_MODULES:
        return None
    return backend.decode


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its earliest stop string, and whether one was found."""
    positions = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    if not positions:
        return text, False
    return text[:min(positions)], True


CPU_BATCH_TOKENS = 8192  # on CPU, decode cost grows with rows x context; on GPU it is nearly flat


def batch_token_budget(setting: int, device) -> int | None:
    """generation.max_batch_tokens resolved: 0 = automatic, -1 = no cap."""
    if setting == -1:
        return None
    if setting == 0:
        return CPU_BATCH_TOKENS if getattr(device, "type", str(device)) == "cpu" else None
    return setting
