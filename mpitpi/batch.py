"""Forward passes over several sequences at once; rank 0 decides each pass.

Every rank, per pass (``run_pass``): rank 0 broadcasts the pass (``Pass.encode``: the KV
slots to free, the cached prefixes to copy from one slot to another, then per segment its
slot, first position, rows and logits rows wanted, then every row's token), each rank frees
and copies those slots and runs ``Transformer.forward_batch``
(1 + 2 n_layers all-reduces for all rows together), and the wanted rows reach rank 0: each
rank's best (value, index) per row for greedy sequences, or every rank's vocabulary columns
when some sequence samples. An empty pass ends the run; followers go back to waiting.

Rank 0 (``Batch``) holds the sequences: it admits a Session into a free KV slot (the one
whose cached tokens share the longest prefix with the prompt: those positions are reused;
where another slot, busy or not, holds a longer one, its keys and values are copied over:
concurrent requests with one system prompt compute it once),
feeds prompts in passes of up to ``PREFILL_CHUNK`` rows (chunks of several prompts at once),
taking turns with passes of the decoding sequences' one row each (plus their drafted tokens,
checked in the same pass), picks the tokens and stops
sequences. KV memory is counted in positions (``KV_STEP`` rounded) against a budget; free
slots keep their cache for reuse until the space is needed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mpitpi import lookahead
from mpitpi.choices import PREFILL_ROWS
from mpitpi.comm import Comm
from mpitpi.draft import lookup
from mpitpi.session import Session
from mpitpi.model import Segment, Transformer, common_prefix, kv_positions

PREFILL_CHUNK = PREFILL_ROWS   # prompt rows per pass; cancellation is checked between chunks
HEAD = 128            # int64 words of a pass's first broadcast; a longer pass sends the rest
SEG_WORDS = 5         # words describing a segment in a pass
SHARE_MIN = 8         # prompt rows worth a pass's wait to copy them rather than compute them


@dataclass
class Pass:
    """One forward pass as every rank sees it."""
    segs: list[Segment]
    drops: list[int] = field(default_factory=list)   # KV slots to free first
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to, positions)
    full: bool = False            # the wanted rows' whole logits reach rank 0, not argmaxes

    @property
    def n_out(self) -> int:
        return sum(g.n_out for g in self.segs)

    def encode(self) -> np.ndarray:
        """[length, full, n_drops, n_copies, n_segs, drops..., (from, to, positions)...,
        (slot, start, rows, n_out, prompt)..., tokens...]"""
        head = [0, int(self.full), len(self.drops), len(self.copies), len(self.segs),
                *self.drops, *(w for c in self.copies for w in c)]
        for g in self.segs:
            head += [g.slot, g.start, g.tokens.shape[0], g.n_out, int(g.prompt)]
        words = np.concatenate([np.array(head, np.int64)] +
                               [g.tokens.numpy().astype(np.int64) for g in self.segs])
        words[0] = words.size
        return words

    @staticmethod
    def decode(words: np.ndarray) -> Pass:
        full, n_drops, n_copies, n_segs = (int(w) for w in words[1:5])
        drops = [int(w) for w in words[5:5 + n_drops]]
        at = 5 + n_drops + 3 * n_copies
        c = [int(w) for w in words[5 + n_drops:at]]
        copies = [(c[i], c[i + 1], c[i + 2]) for i in range(0, len(c), 3)]
        tok, segs = at + SEG_WORDS * n_segs, []
        for _ in range(n_segs):
            slot, start, rows, n_out, prompt = (int(w) for w in words[at:at + SEG_WORDS])
            segs.append(Segment(slot, start, torch.from_numpy(words[tok:tok + rows].copy()),
                                n_out, bool(prompt)))
            at, tok = at + SEG_WORDS, tok + rows
        return Pass(segs, drops, copies, bool(full))


def _fault_pass(rank: int) -> int | None:
    """MPITPI_FAULT_INJECT=RANK:STEP makes rank RANK raise at forward pass number STEP (0: the
    first prompt chunk): a way to check that one rank's failure ends the whole job."""
    spec = os.environ.get("MPITPI_FAULT_INJECT")
    if not spec:
        return None
    r, s = spec.split(":")
    return int(s) if int(r) == rank else None


class Runner:
    """Every rank's side of the passes: the broadcast, the forward pass, the gather.
    ``on_pass(index, ms, all-reduce ms, bytes sent)`` is called after each pass."""

    def __init__(self, comm: Comm, model: Transformer, on_pass=None):
        self.comm, self.model, self.on_pass = comm, model, on_pass
        self.buf = np.zeros(HEAD, np.int64)
        self.passes = 0          # passes run so far, every run together
        self.ms = 0.0            # the last pass's wall time
        self.fault = _fault_pass(comm.rank)
        self.lookahead = lookahead.control()   # which tiles ask for lines ahead, tuned

    def exchange(self, p: Pass | None) -> Pass | None:
        """Rank 0 sends ``p`` (None: the end), the others receive it (None at the end)."""
        if self.comm.size == 1:   # nobody to tell: no encoding (cold code after each token)
            return p
        words = None
        if self.comm.rank == 0:
            words = np.zeros(1, np.int64) if p is None else p.encode()
            self.buf[:min(HEAD, words.size)] = words[:HEAD]
        self.comm.bcast_(self.buf)
        n = int(self.buf[0])
        if n > HEAD:
            rest = words[HEAD:] if words is not None else np.empty(n - HEAD, np.int64)
            self.comm.bcast_(np.ascontiguousarray(rest))
            words = np.concatenate([self.buf, rest])
        if self.comm.rank == 0:
            return p
        return Pass.decode(words if n > HEAD else self.buf[:n]) if n else None

    def run(self, p: Pass | None) -> tuple[Pass | None, torch.Tensor | None, list[int] | None]:
        """Collective: the pass (rank 0's ``p``; None ends), and on rank 0 the wanted rows'
        (n_out, vocab) logits when ``p.full``, else their greedy tokens."""
        t0, c0, b0 = time.perf_counter(), self.comm.allreduce_s, self.comm.allreduce_bytes
        p = self.exchange(p)
        if p is None:
            return None, None, None
        if self.passes == self.fault:
            raise RuntimeError(f"injected fault at step {self.passes} (MPITPI_FAULT_INJECT)")
        for slot in p.drops:
            self.model.drop(slot)
        for src, dst, n in p.copies:
            self.model.copy_prefix(src, dst, n)
        logits = best = None
        rows = sum(g.tokens.shape[0] for g in p.segs)
        self.lookahead.before(self.model, rows)
        t1, c1 = time.perf_counter(), self.comm.allreduce_s
        if p.segs and p.n_out and not p.full:   # a world of one: maybe the whole pass in C
            best = self.model.greedy_batch(p.segs)
        if p.segs and best is None:
            local = self.model.forward_batch(p.segs)             # (n_out, n_vocab_r)
            if p.n_out and p.full:
                logits = self.comm.gather_rows(local, self.model.vocab_counts)
            elif p.n_out:
                best = self.comm.argmax_rows(local, self.model.vocab_offset)
        t2 = time.perf_counter()
        # this rank's own time: waiting in all-reduce for the others is not its kernels'
        self.lookahead.after(self.model, rows, t2 - t1 - (self.comm.allreduce_s - c1))
        self.ms = ms = (t2 - t0) * 1e3
        if self.on_pass is not None:
            self.on_pass(self.passes, ms, (self.comm.allreduce_s - c0) * 1e3,
                         self.comm.allreduce_bytes - b0)
        self.passes += 1
        return p, logits, best

    def follow(self) -> list[float]:
        """Ranks other than 0: run passes until rank 0 ends the run; the wall time of each
        of its passes, in ms."""
        ms = []
        while self.run(None)[0] is not None:
            ms.append(self.ms)
        return ms


@dataclass
class Seq:
    """A sequence in the batch (rank 0)."""
    session: Session
    slot: int
    fed: int                 # positions of the slot's cache that hold this sequence
    pending: list[int]       # tokens to feed next: the prompt's rest, or the last token
    reserved: int            # cache positions counted for it
    t_start: float
    t_last: float = 0.0
    started: bool = False    # its first token is out
    done: bool = False


class Batch:
    """Rank 0's scheduler. ``max_batch`` KV slots; ``kv_budget`` cache positions in all
    (None: no limit); ``draft`` tokens guessed per decoding sequence and pass (0: off), by
    ``drafter(slot, history, k)`` (draft.ModelDrafter) or else by prompt lookup;
    ``reuse`` False runs every prompt whole (benchmarks of the prefill).
    Collective only in ``step`` and ``close`` (the followers run ``Runner.follow``)."""

    def __init__(self, comm: Comm, model: Transformer, max_batch: int = 1,
                 kv_budget: int | None = None, draft: int = 0, on_pass=None,
                 reuse: bool = True, drafter=None):
        self.model, self.max_batch, self.budget, self.draft = model, max_batch, kv_budget, draft
        self.reuse, self.drafter = reuse, drafter
        self.runner = Runner(comm, model, on_pass)
        self.seqs: list[Seq] = []
        self.drops: list[int] = []
        self.copies: list[tuple[int, int, int]] = []
        self.last_use = {s: 0.0 for s in range(max_batch)}
        self.prompt_turn = False      # the last pass was a prompt chunk

    @property
    def active(self) -> bool:
        return bool(self.seqs)

    @property
    def free_slots(self) -> list[int]:
        busy = {q.slot for q in self.seqs}
        return [s for s in range(self.max_batch) if s not in busy]

    def _held(self, slot: int) -> int:
        """Cache positions slot ``slot`` holds or has reserved."""
        seq = next((q for q in self.seqs if q.slot == slot), None)
        return max(self.model.capacity(slot), seq.reserved if seq else 0)

    def fits_ever(self, positions: int) -> bool:
        """Whether a sequence of ``positions`` could ever be admitted within the budget."""
        return self.budget is None or kv_positions(positions) <= self.budget

    def admit(self, session: Session) -> bool:
        """Start ``session`` in a free slot if one is free and the budget allows it (freeing
        cached prefixes of idle slots if needed); False to try again later."""
        free = self.free_slots
        if not free:
            return False
        prompt = session.prompt_ids
        # positions of the prompt already cached in each free slot
        reuse = {s: self.model.reusable(s, prompt) if self.reuse else 0 for s in free}
        slot = max(free, key=lambda s: (reuse[s], -self.model.capacity(s) if reuse[s] == 0
                                        else 0, -self.last_use[s]))
        need = kv_positions(len(prompt) + session.max_tokens)
        if self.budget is not None:
            held = sum(self._held(s) for s in range(self.max_batch) if s != slot)
            sources = {c[0] for c in self.copies}   # copied from before this pass: kept
            idle = sorted((s for s in free if s != slot and self.model.capacity(s)
                           and s not in sources), key=lambda s: self.last_use[s])
            while held + max(need, self.model.capacity(slot)) > self.budget and idle:
                s = idle.pop(0)        # forget the least recently used idle prefix
                held -= self.model.capacity(s)
                self.model.drop(s)
                self.drops.append(s)
                if self.drafter is not None:
                    self.drafter.drop(s)
            if held + max(need, self.model.capacity(slot)) > self.budget:
                return False
        n = reuse[slot]
        session.result.cached_tokens = n
        q = Seq(session, slot, n, prompt[n:], need, time.perf_counter())
        if self.reuse:   # a longer prefix in another slot (busy or idle) is copied
            self._copy_prefix(q)
        self.seqs.append(q)
        return True

    def step(self) -> list[Session]:
        """Collective: one forward pass over every active sequence; returns the sessions
        that ended in it (their results finished)."""
        segs, owners, ended = [], [], []
        for q in self.seqs:
            if not q.started and q.session.cancelled():   # checked between prompt chunks
                q.session.result.finish_reason = "cancelled"
                q.done = True
                ended.append(q)
        decoding = [q for q in self.seqs if q.started and not q.done]
        prompts = [q for q in self.seqs if not q.started and not q.done]
        # a pass is prompt rows or decoding rows, never both (prompt rows take their own
        # product path, Weight.__call__); they take turns while prompts are being read. A
        # prompt pass takes chunks of several prompts, up to PREFILL_CHUNK rows in all (each
        # row's numbers do not depend on the rows beside it)
        if prompts and (not decoding or not self.prompt_turn):
            room = PREFILL_CHUNK
            for i, q in enumerate(prompts):
                if self.reuse:
                    self._copy_prefix(q)
                    # an earlier prompt is about to compute SHARE_MIN or more of the positions
                    # this one needs next (a shared system prompt): wait, then copy them
                    ids = q.session.prompt_ids
                    if any(common_prefix(ids, p.session.prompt_ids) - q.fed >= SHARE_MIN
                           for p in prompts[:i]):
                        continue
                chunk = q.pending[:room]
                last = len(chunk) == len(q.pending)
                segs.append(Segment(q.slot, q.fed, torch.tensor(chunk, dtype=torch.int64),
                                    1 if last else 0))
                owners.append(q)
                room -= len(chunk)
                if room == 0:
                    break
            self.prompt_turn = True
        else:
            for q in decoding:
                segs.append(self._decode_segment(q))
                owners.append(q)
            self.prompt_turn = False
        if segs or self.drops or self.copies:
            full = any(q.session.needs_logits for q in owners)
            p, logits, best = self.runner.run(Pass(segs, self.drops, self.copies, full))
            self.drops, self.copies = [], []
            now, row = time.perf_counter(), 0
            for g, q in zip(segs, owners):
                q.session.result.forward_passes += 1
                self._take(q, g, logits, best, row, now)
                row += g.n_out
                if q.done:
                    ended.append(q)
        for q in ended:
            self.seqs.remove(q)
            self.last_use[q.slot] = time.perf_counter()
            q.session.finish()
        return [q.session for q in ended]

    def _copy_prefix(self, q: Seq) -> None:
        """If another slot holds more of ``q``'s prompt than ``q`` has fed, that prefix is
        copied into ``q``'s slot (Pass.copies) and ``q`` goes on after it. Not while ``q``'s
        slot is itself the source of a copy in this pass: that copy reads it first, and rank
        0's record of the tokens each slot holds must follow the order the copies run in."""
        if q.slot in {c[0] for c in self.copies}:
            return
        ids = q.session.prompt_ids
        others = [s for s in range(self.max_batch) if s != q.slot and s not in self.drops]
        n, donor = max(((self.model.reusable(s, ids), s) for s in others),
                       key=lambda t: t[0], default=(0, None))
        if n > q.fed:
            self.copies.append((donor, q.slot, n))
            self.model.cached[q.slot] = self.model.cached[donor][:n]   # as the copy leaves it
            q.fed, q.pending = n, ids[n:]
            q.session.result.cached_tokens = n

    def _decode_segment(self, q: Seq) -> Segment:
        """The last token of a decoding sequence, and its drafted continuation."""
        s = q.session
        room = s.max_tokens - len(s.result.token_ids) - 1   # tokens it may still make after
        k = min(self.draft, room)
        if k < 1:
            guess = []
        elif self.drafter is not None:
            guess = self.drafter(q.slot, s.history, k)
        else:
            guess = lookup(s.history, k)
        tokens = torch.tensor(q.pending + guess, dtype=torch.int64)
        return Segment(q.slot, q.fed, tokens, tokens.shape[0], prompt=False)

    def _take(self, q: Seq, g: Segment, logits, best, row: int, now: float) -> None:
        """Pick ``q``'s tokens from its rows of a pass; move it on, or end it."""
        s, res = q.session, q.session.result
        if g.n_out == 0:                        # a prompt chunk that is not the last
            q.fed, q.pending = g.end, q.pending[g.tokens.shape[0]:]
            return
        guesses = g.tokens.tolist()[1:] if q.started else []
        made = 0
        for j in range(g.n_out):
            draft = guesses[j] if j < len(guesses) else None
            tok, stop = s.pick(logits[row + j] if logits is not None else None,
                               best[row + j] if best is not None else None, draft)
            made += 1
            kept = draft is not None and tok == draft
            res.accepted += kept
            if stop:
                q.done = True
                break
            if not kept:
                break
        res.drafted += len(guesses)
        q.fed, q.pending = g.end - g.n_out + made, [tok]
        if not q.started:
            q.started = True
            res.ttft_ms = (now - q.t_start) * 1e3
            made -= 1                           # the first token is TTFT's, not a step's
        if made:
            res.step_ms.extend([(now - q.t_last) * 1e3 / made] * made)
        q.t_last = now

    def close(self) -> None:
        """Collective: end the run (the followers' ``Runner.follow`` returns)."""
        self.runner.run(None)

    def run_all(self, sessions: list[Session], done=None) -> None:
        """Collective (rank 0's side; the others ``Runner.follow``): every session through
        the batch, admitted in order as slots free, ``done(session)`` as each ends; then
        ``close``."""
        waiting = list(sessions)
        while waiting or self.active:
            while waiting and self.admit(waiting[0]):
                waiting.pop(0)
            if not self.active:   # an empty batch that admits nothing would spin forever
                raise RuntimeError("a session does not fit an empty batch's KV budget")
            for s in self.step():
                if done is not None:
                    done(s)
        self.close()
