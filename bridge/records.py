"""The bridge's state record: miners, samples, hops, merge bookkeeping, and in-memory indexes.

`State` is plain data that transitions (bridge.state, bridge.rounds, ...) change in place.
What they change is tracked for them (bridge.tracking): miners, samples and hops note every
assignment in `state.dirty`, and the database diffs the global fields at each commit; the SQLite
layer writes one transaction per commit. Indexes (pools, queues, deadline heap) are derived and
rebuilt by `State.reindex()` after loading.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from bridge.tracking import RecordMap, Tracked, record
from protocol.lifecycle import HOP_OPEN, HopKind, HopStatus, Phase, SampleStatus
from protocol.messages import RunConfig

__all__ = ["TransitionError", "Tunables", "ObjRef", "FwdRecord", "Miner", "Sample", "Hop",
           "StageState", "State", "HOP_OPEN"]


_RECORD_MAPS = ("miners", "samples", "hops")


class TransitionError(Exception):
    """A transition refused, with an error code (protocol.errors maps it to an HTTP status)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ObjRef:
    """An object a hop reads: its sealed key, sha256 and size (stored as `[key, sha256, size]`)."""

    key: str
    sha256: Optional[str]
    size: int

    def as_list(self) -> list[Any]:
        """The stored form."""
        return [self.key, self.sha256, self.size]

    @classmethod
    def of(cls, row: Optional[list[Any]]) -> Optional["ObjRef"]:
        """From the stored form (None stays None)."""
        return None if row is None else cls(*row)


@dataclass(frozen=True)
class FwdRecord:
    """Who did a sample's forward at a stage and still holds its graph (stored as a list).

    `epoch` is the holder's registration epoch then; -1 once the graph is used up or lost."""

    hotkey: str
    epoch: int
    hop_id: str

    def as_list(self) -> list[Any]:
        """The stored form."""
        return [self.hotkey, self.epoch, self.hop_id]

    @property
    def holds_graph(self) -> bool:
        """False once the graph was released (used by its backward, or lost)."""
        return self.epoch >= 0

    def released(self) -> "FwdRecord":
        """The same record with its graph released."""
        return FwdRecord(self.hotkey, -1, self.hop_id)


@dataclass(frozen=True)
class Tunables:
    """Bridge-side knobs that are not part of the run (health, back-off, EMA)."""

    health_timeout: float = 120.0   # seconds without contact before a miner counts as gone
    backoff_seconds: float = 10.0   # no new routed work this long after a lease expiry
    ema: float = 0.2                # weight of the newest throughput and hop-time sample
    route_by_speed: bool = True     # False: route by throughput share alone (bridge/speed.py off)
    slow_factor: float = 2.0        # a replica this many times later to finish than its best peer gets no new work
    probe_seconds: float = 30.0     # ... unless it has done nothing this long (a probe: its estimate may recover),
    probe_hops: float = 50.0        # or this many of its fastest peer's hops (short hops: probe sooner), at least 1 s
    recover_weight: float = 0.5     # weight of a hop-time sample faster than the estimate (a slow one gets `ema`)
    peer_silence: float = 10.0      # a peer unheard this long (and past 3 of its hop times) no longer holds work back
    min_health: float = 0.05
    code_bytes: Optional[int] = None  # exact wire size of one code from the run's model (None:
                                      # only max_object_bytes caps a lease; pure tests)
    sync: Any = None  # bridge.syncspec.SyncSpec of a sharded run: exact piece/update sizes (None: unchecked)


@record
class Miner(Tracked):
    """One registered miner (a replica of one stage)."""

    KIND = "miner"

    hotkey: str
    stage: int
    registered_at: float
    last_seen: float
    epoch: int = 0                  # bumps on re-registration: forward graphs held before are gone
    active: bool = True
    health: float = 1.0
    throughput: float = 1.0         # EMA of hops/s
    hop_seconds: float = 0.0        # EWMA of verified seconds per hop (bridge clock); 0: not measured yet
    backoff_until: float = 0.0
    round: int = 0
    inner_step: int = 0
    quota_used: int = 0             # forwards taken in this inner step
    step_samples: int = 0           # backwards finished in this inner step
    open_graphs: int = 0            # forwards done here whose bwd has not been done here
    round_steps: int = 0            # inner steps reported in the current round
    last_done_at: float = 0.0
    hops_done: int = 0
    expiries: int = 0
    failures: int = 0
    reroutes: int = 0
    bytes_moved: int = 0
    disagreements: int = 0
    round_samples: int = 0          # backwards verified in this round since the last (re-)registration
    quarantined_until: int = -1     # no work and no merge before this round (a failed audit)
    bad_outputs: int = 0            # outputs the bridge proved wrong (sha, shape, NaN): charged
    false_claims: int = 0           # bad-input claims the bridge disproved: charged
    device_class: str = "cpu"       # declared at registration: audits replay like for like
    compute_dtype: str = "float32"
    device_name: str = ""           # declared GPU model ('' for none)
    sits_out_round: int = -1        # rejoined mid-round with its inner steps lost: no work this round

    @property
    def ident(self) -> str:
        """Primary key: the hotkey."""
        return self.hotkey

    @classmethod
    def from_row(cls, d: dict[str, Any]) -> "Miner":
        """From a stored row."""
        return cls(**d)


@record
class Sample(Tracked):
    """One sample of a round; ends `completed` or `abandoned` with a reason."""

    KIND = "sample"
    OWNED = ("fwd_by",)

    sample_id: int
    round: int
    status: SampleStatus = SampleStatus.ACTIVE
    reason: str = ""
    fwd_done_stage: int = -1        # highest stage whose forward is done
    # stage -> who did the forward at that stage (changes to it mark the sample changed)
    fwd_by: dict[int, FwdRecord] = field(default_factory=dict)

    @property
    def ident(self) -> int:
        """Primary key: the sample id."""
        return self.sample_id

    def row(self) -> dict[str, Any]:
        """The stored form (forward records as lists)."""
        d = super().row()
        d["fwd_by"] = {k: v.as_list() for k, v in self.fwd_by.items()}
        return d

    @classmethod
    def from_row(cls, d: dict[str, Any]) -> "Sample":
        """From a stored row (JSON turned the stage keys into strings)."""
        fwd_by = {int(k): FwdRecord(*v) for k, v in d.pop("fwd_by").items()}
        return cls(**{**d, "status": SampleStatus(d["status"])}, fwd_by=fwd_by)


@record
class Hop(Tracked):
    """One attempt at one unit of work."""

    KIND = "hop"

    hop_id: str
    sample_id: int
    round: int
    stage: int
    kind: HopKind
    attempt: int = 1
    recompute: bool = False
    status: HopStatus = HopStatus.POOL
    assigned_to: Optional[str] = None
    leased_to: Optional[str] = None
    leased_at: float = 0.0
    deadline: float = 0.0
    inner_step: int = 0
    epoch: int = 0                  # the leasing miner's registration epoch (a restart starts anew)
    fwd_hop_id: Optional[str] = None
    act_in: Optional[ObjRef] = None
    grad_in: Optional[ObjRef] = None
    out_key: Optional[str] = None
    out_size: int = 0
    out_sha: Optional[str] = None
    loss: Optional[float] = None
    done_at: float = 0.0
    device_class: str = "cpu"       # the leasing miner's declared numerics, for the audit
    compute_dtype: str = "float32"
    device_name: str = ""
    note: str = ""
    avoid: tuple[str, ...] = ()     # replicas charged on this work: not again

    @property
    def ident(self) -> str:
        """Primary key: the hop id."""
        return self.hop_id

    def row(self) -> dict[str, Any]:
        """The stored form (object refs as lists)."""
        d = super().row()
        if self.act_in is not None:
            d["act_in"] = self.act_in.as_list()
        if self.grad_in is not None:
            d["grad_in"] = self.grad_in.as_list()
        return d

    @classmethod
    def from_row(cls, d: dict[str, Any]) -> "Hop":
        """From a stored row."""
        return cls(**{**d, "kind": HopKind(d["kind"]), "status": HopStatus(d["status"]),
                      "act_in": ObjRef.of(d["act_in"]), "grad_in": ObjRef.of(d["grad_in"]),
                      "avoid": tuple(d["avoid"])})


@dataclass
class StageState:
    """A stage's published weights: round they start, key and sha (None: built from init_seed)."""

    round: int = 0
    key: Optional[str] = None
    sha256: Optional[str] = None
    size: int = 0
    alt_keys: list[str] = field(default_factory=list)  # other voters' copies of the same bytes


@dataclass
class State:
    """Everything the bridge knows; one instance per run."""

    run: RunConfig
    tun: Tunables = field(default_factory=Tunables)
    # (kind, id) -> record changed since the last commit (filled by the records themselves;
    # ("round", r) -> archive row written explicitly); the database diffs the global fields
    dirty: dict = field(default_factory=dict)
    phase: Phase = Phase.WAITING
    round: int = 0
    seq: int = 0                    # hop id counter
    merge_started: float = 0.0
    fwd_pending: list[int] = field(default_factory=list)
    stage_states: list[StageState] = field(default_factory=list)
    round_states: list[dict[str, Any]] = field(default_factory=list)  # snapshot at round start
    minted: int = 0                 # samples of the current round minted so far
    r_completed: int = 0            # samples of the current round completed / abandoned
    r_abandoned: int = 0
    completed_total: int = 0
    abandoned_total: int = 0
    abandon_reasons: dict[str, int] = field(default_factory=dict)
    stage_counters: list[dict[str, int]] = field(default_factory=list)
    # merge bookkeeping for the current round: stage -> hotkey -> record
    workers: dict[int, list[str]] = field(default_factory=dict)
    pseudograds: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    frozen: dict[int, list[str]] = field(default_factory=dict)
    votes: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    published: dict[int, bool] = field(default_factory=dict)
    vote_deadline: dict[int, float] = field(default_factory=dict)  # stage -> settle split votes
    disputes: dict[int, float] = field(default_factory=dict)  # stage -> arbitration deadline
    report_grace: dict[int, float] = field(default_factory=dict)  # stage -> freeze without laggards
    sync: dict[str, Any] = field(default_factory=dict)  # sharded sync (bridge/shard_round.py), JSON
    flagged: list[str] = field(default_factory=list)
    unpaid: list[str] = field(default_factory=list)  # worked this round while quarantined (probation)
    empty_rounds: int = 0           # closed rounds that completed no sample: they do not count
    last_empty: dict[str, Any] = field(default_factory=dict)  # the latest one: round, abandoned, reasons
    miners: dict[str, Miner] = field(default_factory=dict)
    samples: dict[int, Sample] = field(default_factory=dict)
    hops: dict[str, Hop] = field(default_factory=dict)
    recent_losses: list[float] = field(default_factory=list)
    # derived indexes (not persisted)
    fwd_pool: list[OrderedDict] = field(default_factory=list)
    bwd_pool: list[OrderedDict] = field(default_factory=list)
    queue: dict[str, OrderedDict] = field(default_factory=dict)   # hotkey -> assigned hops
    leased: dict[str, set] = field(default_factory=dict)          # hotkey -> leased hop ids
    heap: list[tuple[float, str]] = field(default_factory=list)
    events: list[tuple[str, Any]] = field(default_factory=list)   # side effects for the I/O shell
    # long-polls to wake after this transition: ("stage", s) or ("miner", hotkey) -> True
    wake: dict = field(default_factory=dict)
    wake_all: bool = False

    def __post_init__(self) -> None:
        s = self.run.n_stages
        if not self.fwd_pending:
            self.fwd_pending = [0] * s
        if not self.stage_states:
            self.stage_states = [StageState() for _ in range(s)]
        if not self.stage_counters:
            self.stage_counters = [{"expiries": 0, "reroutes": 0, "hops_done": 0, "bytes": 0}
                                   for _ in range(s)]
        if not self.fwd_pool:
            self.fwd_pool = [OrderedDict() for _ in range(s)]
            self.bwd_pool = [OrderedDict() for _ in range(s)]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RECORD_MAPS and not isinstance(value, RecordMap):
            value = RecordMap(self, value.items())  # records put in are tracked from then on
        object.__setattr__(self, name, value)

    # ---- explicit rows and ids -------------------------------------------------------------
    def archive_round(self, round_: int, data: dict[str, Any]) -> None:
        """Write round `round_`'s archive row (what validators need once the round is gone)."""
        self.dirty[("round", round_)] = data

    def next_hop_id(self) -> str:
        """A fresh, never reused hop id."""
        self.seq += 1
        return f"h{self.round}x{self.seq}"

    # ---- index maintenance -----------------------------------------------------------------
    def place(self, hop: Hop) -> None:
        """Put an open hop into the index that matches its status."""
        if hop.status == HopStatus.POOL:
            pool = self.bwd_pool if hop.kind == HopKind.BWD else self.fwd_pool
            pool[hop.stage][hop.hop_id] = None
            self.wake[("stage", hop.stage)] = True
        elif hop.status == HopStatus.ASSIGNED:
            self.queue.setdefault(hop.assigned_to, OrderedDict())[hop.hop_id] = None
            self.wake[("miner", hop.assigned_to)] = True
        elif hop.status == HopStatus.LEASED:
            self.leased.setdefault(hop.leased_to, set()).add(hop.hop_id)
        if hop.status in (HopStatus.ASSIGNED, HopStatus.LEASED):
            heapq.heappush(self.heap, (hop.deadline, hop.hop_id))

    def unplace(self, hop: Hop) -> None:
        """Remove an open hop from its index (the heap entry goes stale and is skipped)."""
        if hop.status == HopStatus.POOL:
            pool = self.bwd_pool if hop.kind == HopKind.BWD else self.fwd_pool
            pool[hop.stage].pop(hop.hop_id, None)
        elif hop.status == HopStatus.ASSIGNED and hop.assigned_to in self.queue:
            self.queue[hop.assigned_to].pop(hop.hop_id, None)
        elif hop.status == HopStatus.LEASED and hop.leased_to in self.leased:
            self.leased[hop.leased_to].discard(hop.hop_id)

    def reindex(self) -> None:
        """Rebuild every derived index from the records (after loading)."""
        s = self.run.n_stages
        self.fwd_pool = [OrderedDict() for _ in range(s)]
        self.bwd_pool = [OrderedDict() for _ in range(s)]
        self.queue, self.leased, self.heap = {}, {}, []
        for hop in sorted(self.hops.values(), key=lambda h: int(h.hop_id.split("x")[1])):
            if hop.status in HOP_OPEN:
                self.place(hop)

    def stage_miners(self, stage: int) -> list[Miner]:
        """Active miners of a stage, in hotkey order."""
        return sorted((m for m in self.miners.values() if m.active and m.stage == stage),
                      key=lambda m: m.hotkey)

    def healthy(self, m: Miner, now: float) -> bool:
        """Active, not quarantined, and heard from within the health timeout."""
        return (m.active and now - m.last_seen <= self.tun.health_timeout
                and not self.quarantined(m, now))

    def failed_audit(self, m: Miner) -> bool:
        """A validator failed this miner recently (its quarantine has not run out)."""
        return self.round < m.quarantined_until

    def quarantined(self, m: Miner, now: Optional[float] = None) -> bool:
        """It failed an audit and its stage has another live replica in good standing: it gets no
        work and no say in merges. Quarantine never empties a stage: while no such peer is live
        (heard from within the health timeout at `now`; active, when `now` is None) the failed
        replicas keep the stage training, unpaid (`on_probation`)."""
        if not self.failed_audit(m):
            return False
        return any(p is not m and p.active and not self.failed_audit(p)
                   and (now is None or now - p.last_seen <= self.tun.health_timeout)
                   for p in self.stage_miners(m.stage))

    def on_probation(self, m: Miner, now: Optional[float] = None) -> bool:
        """Failed an audit but kept at work: no live replica of its stage is in good standing."""
        return self.failed_audit(m) and not self.quarantined(m, now)

    def meta_dict(self) -> dict[str, Any]:
        """The global fields, as persisted in the meta row."""
        keep = ("phase", "round", "seq", "minted", "merge_started", "fwd_pending",
                "completed_total", "r_completed", "r_abandoned",
                "abandoned_total", "abandon_reasons", "stage_counters", "workers", "frozen",
                "published", "flagged", "round_states", "unpaid", "empty_rounds", "last_empty")
        d = {k: getattr(self, k) for k in keep}
        d["phase"] = self.phase.value  # a plain str: the same JSON, and a cheap fingerprint
        d["stage_states"] = [dict(vars(x)) for x in self.stage_states]
        d["recent_losses"] = self.recent_losses[-256:]
        d["pseudograds"] = self.pseudograds
        d["votes"] = self.votes
        d["vote_deadline"] = self.vote_deadline
        d["disputes"] = self.disputes
        d["report_grace"] = self.report_grace
        d["sync"] = self.sync
        return d

    def load_meta(self, d: dict[str, Any]) -> None:
        """Restore the global fields from a meta row (JSON turns int keys into strings)."""
        self.phase = Phase(d["phase"])
        for k in ("round", "seq", "merge_started", "fwd_pending", "completed_total",
                  "r_completed", "r_abandoned",
                  "abandoned_total", "abandon_reasons", "stage_counters", "flagged", "round_states",
                  "recent_losses"):
            setattr(self, k, d[k])
        self.workers = {int(k): v for k, v in d["workers"].items()}
        self.frozen = {int(k): v for k, v in d["frozen"].items()}
        self.published = {int(k): v for k, v in d["published"].items()}
        self.pseudograds = {int(k): v for k, v in d["pseudograds"].items()}
        self.votes = {int(k): v for k, v in d["votes"].items()}
        self.vote_deadline = {int(k): v for k, v in d.get("vote_deadline", {}).items()}
        self.disputes = {int(k): v for k, v in d.get("disputes", {}).items()}
        self.report_grace = {int(k): v for k, v in d.get("report_grace", {}).items()}
        self.sync = d.get("sync", {})
        self.unpaid = d.get("unpaid", [])  # older DBs: none of these yet
        self.empty_rounds = d.get("empty_rounds", 0)
        self.last_empty = d.get("last_empty", {})
        self.minted = d.get("minted", self.run.samples_per_round)  # older DBs minted all at once
        self.stage_states = [StageState(**x) for x in d["stage_states"]]
