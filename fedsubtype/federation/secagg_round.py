"""The coordinator's side of secure aggregation: one training round as SecAgg+'s four stages, driven from
the round loop with Flower's protocol pieces (keys, Shamir shares, masks, quantisation).

Flower's `SecAggPlusWorkflow` runs the same stages but only inside a legacy `Workflow` (a `LegacyContext`
with a fit-style Strategy and ClientManager), waits with `send_and_receive` and cannot record a failed
round. Here the stages are sent with the round loop's own exchange (round timeout, one reason per site
in rounds.json), and the sites answer with Flower's `secaggplus_mod` (fedsubtype/federation/secagg_mod.py),
so the messages are the stock protocol's. Three things differ from Flower's workflow: a site that drops out
before its key shares went out is simply left out; only masks with sites whose vectors were summed are
removed when a dropped site is unmasked (Flower removes them for every neighbour, which breaks when two
drop); and masks are expanded from the whole secret (`mask_generator`), not from 32 bits of it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Mapping, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedsubtype.federation.config import FederationConfig
from fedsubtype.federation.phase import exchange, node_names, run_phase
from fedsubtype.federation.reply_checks import COUNT_KEY, count_problem
from fedsubtype.federation.runstore import RoundRecord
from fedsubtype.federation.secure_aggregation import Protocol, mask_generator, protocol_for

FAILED = "secure aggregation"
"""Prefix of the failure line a round gets when the protocol cannot finish (rounds.json)."""


def config_bytes(record: ConfigRecord) -> int:
    """Payload bytes of a protocol record (Flower's `count_bytes` fails on an empty list)."""
    def size(value: object) -> int:
        if isinstance(value, (bytes, str)):
            return len(value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return 8
    return sum(len(k) + size(v) for k, v in record.items())


class RoundFailed(Exception):
    """The protocol cannot finish this round; the message says why (the global model is kept)."""


def neighbour_sets(nodes: list[int], num_shares: int) -> dict[int, set[int]]:
    """SecAgg+'s graph: each site and the num_shares - 1 sites around it in a random ring (itself included)."""
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)  # OS entropy: the run's seeded generators are left untouched
    half, n = num_shares // 2, len(order)
    if num_shares >= n:
        return {nid: set(order) for nid in order}
    return {nid: {order[(i + d) % n] for d in range(-half, half + 1)} for i, nid in enumerate(order)}


@dataclass
class SecureRound:
    """One secure round's state: who is still in at each stage, their keys, and what went wrong."""

    grid: Grid
    cfg: FederationConfig
    rnd: int
    proto: Protocol
    neighbours: dict[int, set[int]]
    names: dict[int, str]
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    forward: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0

    def name(self, node: int) -> str:
        """The site's name for rounds.json and the log (its node id while the site is not known yet)."""
        return self.names.get(node, f"node {node}")

    def stage(self, stage: str, records: Mapping[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        """Send one stage's protocol data to each node; the protocol data of the nodes that answered."""
        msgs = []
        for node, record in records.items():
            record[Key.STAGE] = stage
            msgs.append(Message(RecordDict({RECORD_KEY_CONFIGS: record}), dst_node_id=node,
                                message_type=MessageType.TRAIN, group_id=str(self.rnd)))
        self.bytes_down += sum(config_bytes(r) for r in records.values())
        timeout = self.cfg.round_timeout_s
        replies = exchange(self.grid, msgs, timeout) if msgs else []
        target = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs}
        got: dict[int, ConfigRecord] = {}
        heard: set[int] = set()
        for reply in replies:
            node = target.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            heard.add(node)
            if reply.has_error():
                self.failed.append(f"{self.name(node)}: {FAILED} {stage}: {reply.error.reason}")
            elif RECORD_KEY_CONFIGS not in reply.content.config_records:
                self.failed.append(f"{self.name(node)}: {FAILED} {stage}: the reply carries no protocol data")
            else:
                got[node] = reply.content[RECORD_KEY_CONFIGS]
                self.bytes_up += config_bytes(got[node])
        self.failed += [f"{self.name(n)}: no answer to {FAILED} {stage} within {timeout:g} s"
                        for n in target.values() if n not in heard]
        return got

    def require(self, alive: set[int], owners: set[int], stage: str) -> None:
        """Every site in `owners` must have `threshold` neighbours in `alive`, else the round cannot finish."""
        for node in sorted(owners):
            have = len(self.neighbours[node] & alive)
            if have < self.proto.threshold:
                raise RoundFailed(f"after {stage}, {self.name(node)} has {have} of the {self.proto.threshold} "
                                  "sites needed to unmask it (reconstruction_threshold)")

    def setup(self, nodes: list[int]) -> set[int]:
        """Stage 0: the protocol's values out, each site's two public keys back."""
        p = self.proto
        values = {Key.SAMPLE_NUMBER: len(nodes), Key.SHARE_NUMBER: p.num_shares, Key.THRESHOLD: p.threshold,
                  Key.CLIPPING_RANGE: float(p.clipping_range), Key.TARGET_RANGE: int(p.quantization_range),
                  Key.MOD_RANGE: int(p.modulus_range), Key.MAX_WEIGHT: float(p.max_weight)}
        got = self.stage(Stage.SETUP, {n: ConfigRecord(dict(values)) for n in nodes})
        for node, rec in got.items():
            pk1, pk2 = rec.get(Key.PUBLIC_KEY_1), rec.get(Key.PUBLIC_KEY_2)
            if isinstance(pk1, bytes) and isinstance(pk2, bytes):
                self.public_keys[node] = (pk1, pk2)
            else:
                self.failed.append(f"{self.name(node)}: {FAILED} setup: no public keys in the reply")
        alive = set(self.public_keys)
        self.require(alive, alive, "setup")
        return alive

    def share_keys(self, alive: set[int]) -> set[int]:
        """Stage 1: each site gets its neighbours' public keys and returns encrypted key shares for them."""
        records = {n: ConfigRecord({str(m): list(self.public_keys[m]) for m in sorted(self.neighbours[n] & alive)})
                   for n in alive}
        got = self.stage(Stage.SHARE_KEYS, records)
        shared = set(got)
        self.forward = {n: ([], []) for n in shared}
        for src in sorted(shared):
            dsts = cast(list[int], got[src].get(Key.DESTINATION_LIST, []))
            texts = cast(list[bytes], got[src].get(Key.CIPHERTEXT_LIST, []))
            for dst, text in zip(dsts, texts):
                if dst in self.forward and dst in self.neighbours[src]:
                    self.forward[dst][0].append(src)
                    self.forward[dst][1].append(text)
        self.require(shared, shared, "share keys")
        return shared

    def unmask(self, shared: set[int], summed: set[int], masked: list[np.ndarray]) -> list[np.ndarray]:
        """Stage 3: shares of the summed sites' private seeds and of the dropped sites' keys; the masks off."""
        dropped = shared - summed
        records = {n: ConfigRecord({Key.ACTIVE_NODE_ID_LIST: sorted(self.neighbours[n] & summed),
                                    Key.DEAD_NODE_ID_LIST: sorted(self.neighbours[n] & dropped)}) for n in summed}
        got = self.stage(Stage.UNMASK, records)
        collected: dict[int, list[bytes]] = {n: [] for n in shared}
        for rec in got.values():
            for owner, share in zip(cast(list[int], rec.get(Key.NODE_ID_LIST, [])),
                                    cast(list[bytes], rec.get(Key.SHARE_LIST, []))):
                if owner in collected:
                    collected[owner].append(share)
        shapes = [a.shape for a in masked]
        for owner in sorted(shared):
            if len(collected[owner]) < self.proto.threshold:
                raise RoundFailed(f"only {len(collected[owner])} of the {self.proto.threshold} shares needed to "
                                  f"unmask {self.name(owner)} arrived")
            secret = combine_shares(collected[owner])
            if owner in summed:
                masks = [(-1, mask_generator(secret, self.proto.modulus_range, shapes))]
            else:
                masks = [(1 if owner > other else -1, self.pair_mask(secret, other, shapes))
                         for other in sorted(self.neighbours[owner] & summed) if other != owner]
            for sign, mask in masks:
                masked = [v + sign * m for v, m in zip(masked, mask)]
        return parameters_mod(masked, self.proto.modulus_range)

    def pair_mask(self, secret_key: bytes, other: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """The pairwise mask a dropped site (secret key recovered) shares with `other`."""
        key = generate_shared_key(bytes_to_private_key(secret_key), bytes_to_public_key(self.public_keys[other][0]))
        return mask_generator(key, self.proto.modulus_range, shapes)

    def collect(self, msgs: list[Message], shared: set[int], bounds: Mapping[int, float],
                shapes: list[tuple[int, ...]]) -> tuple[RoundRecord, list[Message], list[np.ndarray] | None]:
        """Stage 2: each site trains and returns its masked, weighted update; (record, good replies, their sum)."""
        sent = []
        for msg in msgs:
            node = int(msg.metadata.dst_node_id)
            if node in shared:  # a RecordDict of its own: the strategy's messages share one
                srcs, texts = self.forward[node]
                protocol = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: texts,
                                         Key.SOURCE_LIST: srcs})
                content = RecordDict({**dict(msg.content.items()), RECORD_KEY_CONFIGS: protocol})
                self.bytes_down += config_bytes(protocol)
                sent.append(Message(content, dst_node_id=node, message_type=msg.metadata.message_type,
                                    group_id=msg.metadata.group_id))
        record, ok = run_phase(self.grid, self.cfg, sent, self.rnd, "train")
        kept, replies, total = [], [], None
        for result, msg in zip(record.answered, ok):
            vector, why = masked_vector(msg, [(1,), *shapes], self.proto.modulus_range)
            why = why or count_problem(result.metrics.get(COUNT_KEY, float("nan")), "train",
                                       self.cfg.reply_checks.max_examples, bounds.get(result.node_id))
            if why or vector is None:
                record.failed.append(f"{result.site}: {why}")
                continue
            self.bytes_up += config_bytes(msg.content[RECORD_KEY_CONFIGS])
            self.names[result.node_id] = result.site
            kept.append(result)
            replies.append(msg)
            total = vector if total is None else [a + b for a, b in zip(total, vector)]
        record.answered = kept
        return record, replies, total

    def mean_update(self, unmasked: list[np.ndarray], counts: list[float]) -> list[np.ndarray]:
        """The example-weighted mean of the summed sites' updates, from the unmasked sum (Flower's dequantiser)."""
        p = self.proto
        factor, vector = factor_extract(unmasked)
        expected = sum(p.weight_of(c) for c in counts)
        if int(factor) != expected or expected <= 0:
            raise RoundFailed(f"the masked example weights sum to {int(factor)}, not the {expected} that the "
                              "sites' reported example counts give")
        total = dequantize(vector, p.clipping_range, p.quantization_range)
        offset = -(len(counts) - 1) * p.clipping_range  # each site's quantiser shifts its values by +clipping_range
        return [(a + offset) * (p.quantization_range / expected) for a in total]


def masked_vector(msg: Message, shapes: list[tuple[int, ...]], modulus: int
                  ) -> tuple[list[np.ndarray] | None, str | None]:
    """A reply's masked vector (weight, then the update's arrays), or why it is not one; never raises."""
    if msg.content.array_records:
        return None, "the reply carries plain arrays next to the masked vector"
    try:
        data = msg.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        arrays = [bytes_to_ndarray(b) for b in cast(list[bytes], data)]
    except Exception as exc:  # noqa: BLE001 - a malformed reply is left out, never fatal
        return None, f"no readable masked vector ({type(exc).__name__})"
    if [tuple(a.shape) for a in arrays] != shapes:
        return None, "the masked vector does not have the layout sent"
    if any(not np.issubdtype(a.dtype, np.integer) or (a < 0).any() or (a >= modulus).any() for a in arrays):
        return None, "the masked vector is not integers below the protocol's modulus"
    return [a.astype(np.int64) for a in arrays], None


def round_max_weight(cfg: FederationConfig, nodes: list[int], bounds: Mapping[int, float]) -> float:
    """The largest example count the round's sites may send: the configured max_weight, else the known bounds of
    all of them (declared or first reported counts), else reply_checks.max_examples."""
    if cfg.secure_aggregation.max_weight:
        return float(cfg.secure_aggregation.max_weight)
    known = [bounds[n] for n in nodes if n in bounds]
    if known and len(known) == len(nodes):
        return max(known)
    log(INFO, "[fedsubtype] secure aggregation: some sites' example counts are not known yet; weights are bounded "
        "by reply_checks.max_examples %d this round (declared_examples gives a finer quantisation)",
        cfg.reply_checks.max_examples)
    return float(cfg.reply_checks.max_examples)


def secure_train(grid: Grid, cfg: FederationConfig, msgs: list[Message], rnd: int, bounds: Mapping[int, float],
                 shapes: list[tuple[int, ...]]) -> tuple[RoundRecord, list[Message], list[np.ndarray] | None]:
    """One training round under SecAgg+: (its record, the summed sites' replies, their mean update or None)."""
    t0 = time.perf_counter()
    nodes = sorted(int(m.metadata.dst_node_id) for m in msgs)
    record = RoundRecord(round=rnd, phase="train", asked=len(nodes), accepted=False)
    proto = protocol_for(cfg.secure_aggregation, len(nodes), round_max_weight(cfg, nodes, bounds))
    if isinstance(proto, str):
        record.failed.append(f"{FAILED}: {proto}")
        return record, [], None
    sr = SecureRound(grid, cfg, rnd, proto, neighbour_sets(nodes, proto.num_shares), node_names(cfg.run_dir))
    replies: list[Message] = []
    mean = None
    try:
        shared = sr.share_keys(sr.setup(nodes))
        record, replies, total = sr.collect(msgs, shared, bounds, shapes)
        summed = {r.node_id for r in record.answered}
        sr.require(summed, shared, "training")
        if total is None or len(summed) < cfg.min_sites:
            raise RoundFailed(f"only {len(summed)} of the required {cfg.min_sites} sites sent a masked update")
        unmasked = sr.unmask(shared, summed, parameters_mod(total, proto.modulus_range))
        mean = sr.mean_update(unmasked, [r.metrics[COUNT_KEY] for r in record.answered])
    except RoundFailed as exc:
        record.failed.append(f"{FAILED}: {exc}")
    except Exception as exc:  # noqa: BLE001 - malformed keys or shares from a site: fail the round, not the run
        log(WARNING, "round %d: secure aggregation failed", rnd, exc_info=True)
        record.failed.append(f"{FAILED}: unmasking failed ({type(exc).__name__}; details in the coordinator's log)")
    record.failed = sr.failed + record.failed
    record.asked, record.accepted = len(nodes), mean is not None
    record.seconds = time.perf_counter() - t0
    record.bytes_down += sr.bytes_down
    record.bytes_up += sr.bytes_up
    return record, (replies if mean is not None else []), mean
