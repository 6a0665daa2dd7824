"""PPSD with one controller process driving every stage: `placement=streams` (every stage on one GPU, each on
its own CUDA stream) or `placement=devices` (stage i on GPU i of this node). No process boundary, no host copy
of a hidden state: a stage hands its output to the next on the device, ordered by CUDA events.

The schedule is a clock of ticks. In one tick stage 0 runs the newest position (layers [0, E), the exit head,
the draft) while stage j runs the position stage j-1 ran in the tick before; the last stage's logits give the
model's token for the position after the one it ran, which is the verdict on the draft that entered there. The
host enqueues every stage's work for the tick before it waits on anything. With greedy drafts stage 0 feeds
itself its own draft on the device and the draft rides with the hidden state to the last stage: a tick with a
verdict ends in one read of one small tensor (the model's token and the draft it judges), a refill tick in none,
so the host reads once per emitted token. A rejection crops every stage's cache to the rejected position, and stage
0 restarts from the model's token while the later stages idle until the new positions reach them.

Greedy: accept iff draft == the model's argmax, so the output is AR's token for token (the same layer calls
on the same caches as AR). Sampling: the one-draft speculative rule (decode.common.verify), exact whatever
the head. On a CPU there are no streams: the same code runs the stages one after another, which tests the
schedule, not the overlap.

On CUDA each stage's one-position step is captured by hand (`heads.runtime.CapturedStep`) as a `torch.cuda.CUDAGraph`
on the stage's own stream (torch.compile's CUDA-graph trees assume the current stream), replayed once per tick.
"""

from __future__ import annotations

import contextlib
import time

import torch

from decode.clock import Clock
from decode.common import GREEDY, Generation, Sampling, choose, head_logits, make_generator, positions, verify
from decode.spec import RunSpec
from heads.hardware import median_seconds
from heads.runtime import CapturedStep

PLACEMENTS = ("streams", "devices")


class Stage:
    """Layers [start, end) of `base` on one device and stream, with fixed input/output buffers so that its
    one-position step can be replayed as a captured graph. Stage 0 also runs the embedding, the exit head and
    the draft's argmax; the last stage the final norm, the LM head and the model's argmax."""

    def __init__(self, base, start: int, end: int, *, head=None, last: bool = False, stream=None):
        self.base, self.start, self.end, self.head, self.last = base, start, end, head, last
        self.device = base.device
        self.stream = stream
        self.capturable = stream is not None  # CUDA graphs need a CUDA stream
        self.step = CapturedStep(self._step, name=f"stage [{start}, {end})", stream=stream)
        self.range = None
        d = dict(device=self.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, **d)
        self.token = torch.zeros(1, 1, dtype=torch.long, **d)              # stage 0's input token
        self.hidden_in = torch.zeros(1, 1, base.hidden_size, dtype=base.dtype, **d)
        self.hidden_out = torch.zeros(1, 1, base.hidden_size, dtype=base.dtype, **d)
        self.logits = torch.zeros(base.vocab_size, dtype=torch.float32, **d)  # draft (stage 0) or model logits
        self.choice = torch.zeros(1, dtype=torch.long, **d)                 # their argmax
        # the draft for the position after the one this stage holds, carried along with its hidden state (stage 0's
        # argmax), so that the last stage's verdict and the draft it judges are read together
        self.draft_in = torch.zeros(1, dtype=torch.long, **d)
        self.draft_out = torch.zeros(1, dtype=torch.long, **d)
        self.done = torch.cuda.Event() if stream is not None else None     # hidden_out written
        self.taken = torch.cuda.Event() if stream is not None else None    # hidden_in copied from the previous stage

    @property
    def first(self) -> bool:
        return self.head is not None

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def begin(self) -> None:
        """A new request: a fresh range over this base's (reused) static cache. A stage that captures its step
        runs the range on the runtime's copy for hand-captured steps (the base's own runtime, shared with AR and
        EESD, keeps its settings); on a CPU with `capturable` set (tests), the graphs' stand-in."""
        self.range = self.base.range(self.start, self.end)
        if self.capturable:
            self.range.runtime = self.range.runtime.for_capture()
        self.step.ranges, self.step.log = [self.range], self.range.runtime.log
        self.step.graphs = ("cuda" if self.stream is not None else "host") if self.capturable else None

    @property
    def capture_s(self) -> float:
        return self.step.capture_s

    @property
    def graph_error(self) -> str | None:
        """Why this stage's step runs uncaptured (None: it does not)."""
        return self.step.error

    @torch.inference_mode()
    def prefill(self, inputs: torch.Tensor) -> torch.Tensor:
        """The prompt through this stage (token ids for stage 0, else hidden states): eager, like every method's
        prefill, on the current stream (`LocalPipeline._sync` orders the stage streams after it). Returns the hidden
        states; the last position's logits and argmax land in the buffers."""
        hidden = self.base.embed(inputs) if self.first else inputs.to(self.device)
        pos = positions(0, hidden.shape[1], self.device)
        hidden = self.range.forward(hidden, pos)
        self._finish(hidden, pos)
        return hidden

    def _finish(self, hidden: torch.Tensor, pos: torch.Tensor) -> None:
        if self.first:
            self.logits.copy_(head_logits(self.base, self.head, self.range, hidden, pos).float())
        elif self.last:
            self.logits.copy_(self.base.logits(hidden[:, -1:])[0, -1].float())
        self.choice.copy_(torch.argmax(self.logits).view(1))
        self.draft_out.copy_(self.choice if self.first else self.draft_in)
        self.hidden_out.copy_(hidden[:, -1:])

    def _step(self) -> None:
        """One position from the fixed buffers to the fixed buffers: what a graph captures."""
        hidden = self.base.embed(self.token) if self.first else self.hidden_in
        hidden = self.range.forward(hidden, self.position)
        self._finish(hidden, self.position)

    def reserve(self, length: int) -> None:
        """Room for `length` positions before any step is replayed (a graph cannot grow a cache)."""
        self.range.reserve(length)

    @torch.inference_mode()
    def run(self, position: int, previous: "Stage | None" = None, token: int | None = None) -> None:
        """Enqueue this stage's step at `position` on its stream. Its input: the hidden state (and carried draft) of
        `previous`, the stage before, copied on the device; or, for stage 0, `token` (a host value, written without
        a sync) or, when None, its own latest draft (on the device: the host need not know it)."""
        with self.context():
            if previous is not None:
                self.take(previous)
            elif token is None:
                self.token.copy_(self.choice.view(1, 1))
            else:
                self.token.fill_(token)
            self.position.fill_(position)
            # a static cache's step is captured once per cache; a dynamic one grows: nothing a graph can replay
            self.step(self.range.cache if self.range.runtime.static and self.range.length else None)
            if self.done is not None:
                self.done.record(self.stream)

    def take(self, previous: "Stage") -> None:
        """The hand-off, on this stage's stream: wait until `previous` wrote its output, copy it (hidden state and
        carried draft) on the device, and mark it taken so that `previous` may overwrite it."""
        if self.stream is not None:
            self.stream.wait_event(previous.done)
        self.hidden_in.copy_(previous.hidden_out, non_blocking=True)
        self.draft_in.copy_(previous.draft_out, non_blocking=True)
        if self.taken is not None:
            self.taken.record(self.stream)

    def release(self, later: "Stage") -> None:
        """This stage's output buffer may be overwritten only after `later` took its copy."""
        if self.stream is not None and later.taken is not None:
            self.stream.wait_event(later.taken)


class LocalPipeline:
    """PPSD stages driven by this process, laid out as `spec` says (layout, placement). `bases[i]` holds stage i's
    layers (the same Base for every stage with placement=streams; one per GPU with placement=devices)."""

    def __init__(self, spec: RunSpec, bases, head):
        if spec.placement not in PLACEMENTS:
            raise ValueError(f"placement={spec.placement}: a local pipeline is one of {PLACEMENTS}")
        if len(bases) != spec.stages or spec.stages < 2:
            raise ValueError("a local pipeline needs one base per stage and at least two stages")
        self.spec, self.head = spec, head
        self.placement, self.layout = spec.placement, list(spec.layout)
        self.tick_costs: dict | None = None  # the latest measure_ticks
        cuda = bases[0].device.type == "cuda"
        self.stages = []
        for i, (base, (start, end)) in enumerate(zip(bases, spec.layout)):
            stream = torch.cuda.Stream(device=base.device) if cuda else None
            self.stages.append(Stage(base, start, end, head=head if i == 0 else None, last=i == spec.stages - 1,
                                     stream=stream))

    @property
    def capture_s(self) -> float:
        return sum(s.capture_s for s in self.stages)

    def _tick(self, work: dict[int, int], token: int | None) -> None:
        """Enqueue one tick: `work` maps stage -> position; stage 0's input is `token` (None: its own draft).
        Later stages first, so each takes its input before the stage before it overwrites it (on a CPU that order
        is the hand-off; on streams an event)."""
        for j in sorted(work, reverse=True):
            stage = self.stages[j]
            if j + 1 in work:
                stage.release(self.stages[j + 1])
            stage.run(work[j], self.stages[j - 1] if j > 0 else None, token)

    def _read(self) -> tuple[int, int, int]:
        """The one device-to-host read of a tick: the model's token (last stage), the draft it judges (carried to
        the last stage) and stage 0's newest draft."""
        first, last = self.stages[0], self.stages[-1]
        if first.stream is not None:
            current = torch.cuda.current_stream(first.device)
            for stage in self.stages:
                current.wait_event(stage.done)
        verdict = torch.cat([last.choice, last.draft_in]).to(first.device, non_blocking=True)
        model_token, judged, draft = torch.cat([verdict, first.choice]).tolist()
        return model_token, judged, draft

    def _sync(self) -> None:
        """Stage streams wait for what the current stream enqueued (a prefill, a crop of the caches)."""
        for stage in self.stages:
            if stage.stream is not None:
                stage.stream.wait_stream(torch.cuda.current_stream(stage.device))

    def _crop(self, length: int) -> None:
        for stage in self.stages:
            stage.range.crop(length)
        self._sync()

    def _prefill(self, prompt_ids: list[int], reserve: int) -> None:
        for stage in self.stages:
            stage.begin()
        hidden = torch.tensor([prompt_ids], device=self.stages[0].device)
        for stage in self.stages:
            hidden = stage.prefill(hidden)
            stage.reserve(reserve)
        self._sync()

    @torch.inference_mode()
    def decode(self, prompt_ids: list[int], max_new_tokens: int, *, sampling: Sampling = GREEDY, seed: int = 0,
               stop_ids=frozenset(), oracle=None):
        """Yield tokens as they are verified; return the Generation."""
        clock = Clock()
        first, last, s = self.stages[0], self.stages[-1], len(self.stages)
        draft_rng, verify_rng = make_generator(seed), make_generator(seed + 1)
        n_prompt = len(prompt_ids)
        last_useful = n_prompt + max_new_tokens - 2  # position p yields generated token p + 1 - n_prompt

        def draft(pos: int, computed: int) -> tuple[int, torch.Tensor | None]:
            """Stage 0's draft for position pos + 1, made from its logits at pos, and its distribution q."""
            if not sampling.greedy:
                return choose(first.logits, sampling, draft_rng)
            return (computed if oracle is None else oracle.draft(pos + 1 - n_prompt, computed)), None

        # Greedy with the head's own drafts: stage 0 feeds itself its draft on the device and the draft rides with
        # the hidden state to the last stage, so a tick without a verdict needs no read at all, and a verdict is
        # read together with the draft it judges. Sampled or oracle drafts are chosen on the host, every tick.
        device_drafts = sampling.greedy and oracle is None
        with clock.phase("prefill"):
            self._prefill(prompt_ids, n_prompt + max_new_tokens + s)
            model_token, _, computed = self._read()
        drafts = {n_prompt: draft(n_prompt - 1, computed)}  # host-chosen: position -> (token stage 0 runs there, q)
        verdict = (n_prompt - 1, model_token, drafts[n_prompt][0])  # (position, model's token after it, draft judged)
        next_pos, feed = n_prompt, drafts[n_prompt][0]  # stage 0's next position and input (None: its own draft)
        inbox: dict[int, int] = {}  # stage (> 0) -> the position it runs next tick
        tokens, accept_lengths, run, verified, accepted, ticks, flushes, reads = [], [], 0, 0, 0, 0, 0, 1
        while True:
            if verdict is not None:
                verdict_pos, model_token, judged = verdict
                drafted, q = (judged, None) if device_drafts else drafts.pop(verdict_pos + 1)
                if sampling.greedy:
                    token, ok = model_token, model_token == drafted
                else:
                    token, ok = verify(last.logits, drafted, q, sampling, verify_rng)
                tokens.append(token)
                verified, accepted, run = verified + 1, accepted + ok, run + 1
                yield token
                if token in stop_ids or len(tokens) >= max_new_tokens:
                    break
                if not ok:  # flush: every stage forgets the positions after verdict_pos
                    accept_lengths.append(run)
                    run, flushes = 0, flushes + 1
                    self._crop(verdict_pos + 1)
                    inbox, drafts, next_pos, feed = {}, {}, verdict_pos + 1, token
            work = dict(inbox)
            if next_pos <= last_useful and (feed is None or feed not in stop_ids):  # else nothing after it is emitted
                work[0] = next_pos
            if not work:
                raise RuntimeError("ppsd: no stage has work and no verdict is due (decoder bug)")
            self._tick(work, feed)
            ticks += 1
            verdict = None
            if s - 1 in work or not device_drafts:
                model_token, judged, computed = self._read()
                reads += 1
                if s - 1 in work:
                    verdict = (work[s - 1], model_token, judged)
            inbox = {j + 1: p for j, p in work.items() if j + 1 < s}
            if 0 in work:
                if device_drafts:
                    feed = None
                else:
                    drafts[next_pos + 1] = draft(next_pos, computed)
                    feed = drafts[next_pos + 1][0]
                next_pos += 1
        return Generation(tokens=tokens, method="ppsd", wall_time=clock.elapsed(), prompt_tokens=n_prompt,
                          drafts_verified=verified, drafts_accepted=accepted,
                          accept_lengths=accept_lengths + ([run] if run else []),
                          stats=self._stats(clock, ticks=ticks, flushes=flushes, reads=reads))

    def _stats(self, clock: Clock, **counts) -> dict:
        """A generation's pipeline figures: its counts, the prefill, the capture and how the stages ran."""
        return {"placement": self.placement, **counts, "prefill_s": clock.wall["prefill"], "capture_s": self.capture_s,
                "layers": [list(r) for r in self.layout],
                "uncaptured": [st.graph_error for st in self.stages if st.graph_error], "tick_costs": self.tick_costs}

    @torch.inference_mode()
    def measure_ticks(self, prompt_ids: list[int], repeats: int = 20) -> dict:
        """Seconds per tick in which stages 0..j run (j = 0 .. S-1), each at the prompt's next position and then
        rolled back: the refill ticks after a flush, and the full tick. `overlap` is how much faster the full
        tick is than its stages one after another (1: none; S: perfect)."""
        n = len(prompt_ids)
        self._prefill(prompt_ids, n + len(self.stages) + 1)

        def timed(work) -> float:  # a tick and the read a verdict tick ends with; the first two capture and warm up
            return median_seconds(lambda: (self._tick(work, int(prompt_ids[-1])), self._read()), repeats, warmup=2,
                                  after=lambda: self._crop(n))

        alone = [timed({j: n}) for j in range(len(self.stages))]
        prefix = [timed({i: n for i in range(j + 1)}) for j in range(len(self.stages))]
        self.tick_costs = {"alone_s": alone, "prefix_s": prefix, "overlap": sum(alone) / prefix[-1],
                           "handoff_s": self._handoff_s(repeats * 10)}
        return self.tick_costs

    def _handoff_s(self, repeats: int) -> float:
        """One stage-to-stage hand-off alone (`Stage.take`), per position: what the placement adds to every position beyond the stages' compute."""
        producer, consumer = self.stages[0], self.stages[1]
        self._sync()
        begin = time.perf_counter()
        for _ in range(repeats):
            with consumer.context():
                consumer.take(producer)
        if consumer.stream is not None:
            consumer.stream.synchronize()
        return (time.perf_counter() - begin) / repeats

