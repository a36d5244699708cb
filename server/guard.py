"""A guard in front of any Flower strategy: bad updates never reach aggregation.

`GuardedStrategy` wraps a strategy and filters the train replies of every round before the
wrapped strategy's ``aggregate_train`` sees them. A reply is rejected when it does not carry
exactly the global model's arrays (same names, same shapes), when a value is not finite, when its
``num-examples`` weight is not a positive finite number, or when its update norm
``||w_node - w_global||`` is above an absolute cap or more than ``norm_factor`` times the round's
median, or when it is a replay: bit-for-bit the update some node sent in an earlier round, or
another node's update of the same round. Every rejection is logged with the node id and the
institution.

In a deployment (`server.institutions.REGISTRY_ENV` set, or ``identities`` given) who sent a
reply is decided by the key its node enrolled with: Flower's node id is looked up in the
registry, and a reply from a node no institution enrolled, or naming another institution than
its key's, is rejected. There, too, a reply's ``num-examples`` weight is cut to ``weight_factor``
times the median of the other replies' claims, so that one node claiming 10^12 examples weighs
at most that much instead of owning the aggregate. A simulation (no registry) takes the name a
reply gives and its weight as claimed: every node there is the operator's own process.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from pydantic import BaseModel, ConfigDict, Field

from server.institutions import identities_from_env
from shared_models.protocol import NUM_EXAMPLES, reply_institution

logger = logging.getLogger(__name__)

WEIGHT_KEY = NUM_EXAMPLES  # a reply's aggregation weight


class GuardConfig(BaseModel):
    """Thresholds of the update guard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # An update whose norm exceeds this multiple of the round's median norm is an outlier. With
    # fewer than three replies the median cannot single one out; the absolute cap still applies.
    norm_factor: Annotated[float, Field(gt=1)] = 10.0
    max_update_norm: Annotated[float, Field(gt=0)] = 1000.0  # absolute cap on ||w - w_global||
    # With enrolled identities, a reply weighs at most this multiple of the median of the other
    # replies' num-examples: a university three times the size of a typical one keeps its
    # weight, a node claiming 10^12 gets a typical node's weight times three. (The privacy work
    # will drop exact counts from replies; then equal weights replace this bound.)
    weight_factor: Annotated[float, Field(ge=1)] = 3.0


@dataclass(frozen=True)
class Rejection:
    """One reply the guard kept out of aggregation."""

    node_id: int
    institution: str
    reason: str


def institution_of(msg: Message) -> str:
    """The institution name a reply carries (`shared_models.protocol.reply_institution`)."""
    if msg.has_error():
        return ""
    return reply_institution(msg.content.config_records)


def _reject_reason(msg: Message, reference: dict[str, np.ndarray]) -> tuple[str, float]:
    """Why ``msg`` must be rejected (``""`` if not) and its update norm."""
    arrays = list(msg.content.array_records.values())
    metrics = list(msg.content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1:
        return f"expected one ArrayRecord and one MetricRecord, got {len(arrays)}/{len(metrics)}", 0
    record: ArrayRecord = arrays[0]
    missing = sorted(set(reference) - set(record))
    unexpected = sorted(set(record) - set(reference))
    if missing or unexpected:
        return f"wrong keys: missing {missing}, unexpected {unexpected}", 0
    weight = metrics[0].get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return f"{WEIGHT_KEY} must be a positive number, got {weight!r}", 0
    squared = 0.0
    for name, expected in reference.items():
        value = record[name].numpy()
        if value.shape != expected.shape:
            return f"wrong shape for {name!r}: {value.shape}, expected {expected.shape}", 0
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            return f"non-finite or non-float values in {name!r}", 0
        squared += float(np.sum((value.astype(np.float64) - expected) ** 2))
    return "", math.sqrt(squared)


class GuardedStrategy(Strategy):
    """Wraps a Flower strategy; its ``aggregate_train`` only sees replies that pass the guard.

    Attributes:
        inner: the wrapped strategy (its state, e.g. FedAdam's moments, lives there).
        rejections: the replies rejected in the last aggregated round.
        seen: digest of every update that passed, with its round (kept in the checkpoints,
            so a replay is caught across a server restart too).
    """

    def __init__(
        self,
        inner: Strategy,
        config: GuardConfig | None = None,
        identities: Callable[[], Mapping[int, str]] | None = None,
    ) -> None:
        """Wrap ``inner``.

        Args:
            inner: The strategy that aggregates what passes.
            config: Thresholds; the defaults when None.
            identities: Returns the enrolled institution of each node id, read again every
                round; None takes it from the registry `server.institutions.REGISTRY_ENV`
                names, and when that is unset (a simulation) the name a reply gives is used.
        """
        self.inner = inner
        self.config = config or GuardConfig()
        self.rejections: list[Rejection] = []
        self.seen: dict[str, int] = {}
        self._reference: dict[str, np.ndarray] | None = None
        self._identities = identities if identities is not None else identities_from_env()
        self._names: Mapping[int, str] | None = None
        self._refresh_identities()

    def _refresh_identities(self) -> None:
        if self._identities is None:
            return
        try:
            self._names = dict(self._identities())
        except Exception as error:  # a registry being fixed must not stop a running federation
            logger.warning("cannot read the enrolled institutions (%s); keeping the last", error)
            if self._names is None:
                self._names = {}

    def institution(self, msg: Message) -> str:
        """Who sent ``msg``: the enrolled institution of its node, or (simulation) its claim."""
        if self._names is None:
            return institution_of(msg)
        return self._names.get(int(msg.metadata.src_node_id), "")

    def _identity_reason(self, msg: Message) -> str:
        """Why ``msg`` does not come from who it says (``""`` when it does or none is known)."""
        if self._names is None:
            return ""
        node_id = int(msg.metadata.src_node_id)
        enrolled = self._names.get(node_id)
        if enrolled is None:
            return f"node {node_id} is not the node of any enrolled institution"
        claimed = institution_of(msg)
        if claimed and claimed != enrolled:
            return f"the reply claims to come from {claimed!r}, but its key is {enrolled!r}'s"
        return ""

    def _bound_weights(self, server_round: int, replies: list[Message]) -> None:
        """Cut each claimed weight to ``weight_factor`` x the median of the others' claims."""
        if self._names is None:
            return
        weighed = []
        for msg in replies:
            records = list(msg.content.metric_records.values())
            weight = records[0].get(WEIGHT_KEY) if len(records) == 1 else None
            if isinstance(weight, int | float) and math.isfinite(weight):
                weighed.append((msg, records[0], float(weight)))
        claims = [claim for _, _, claim in weighed]
        for i, (msg, record, claim) in enumerate(weighed):
            others = claims[:i] + claims[i + 1 :]
            if not others:
                return  # a lone reply is the whole aggregate whatever its weight
            cap = self.config.weight_factor * float(np.median(others))
            if claim <= cap:
                continue
            claimed = record[WEIGHT_KEY]
            record[WEIGHT_KEY] = int(cap) if isinstance(claimed, int) else cap
            logger.warning(
                "round %d: node %d (%s) claimed %s examples; weighted as %s (%g x the median "
                "of the others' claims)",
                server_round,
                int(msg.metadata.src_node_id),
                self.institution(msg) or "unknown",
                claimed,
                record[WEIGHT_KEY],
                self.config.weight_factor,
            )

    def summary(self) -> None:
        logger.info(
            "update guard: norm factor %.3g x median, cap %.3g",
            self.config.norm_factor,
            self.config.max_update_norm,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The arrays sent this round are the reference for keys, shapes and update norms.
        self._reference = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
        self._refresh_identities()  # an institution enrolled or revoked since the last round
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.filter_replies(server_round, replies)
        return self.inner.aggregate_train(server_round, kept)

    def filter_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that may be aggregated; error replies pass through for the strategy to log.

        Raises:
            RuntimeError: called before ``configure_train`` of this round.
        """
        if self._reference is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        self.rejections = []
        candidates: list[tuple[Message, float]] = []
        passed: list[Message] = []
        replies = list(replies)
        metric_keys = _majority_metric_keys(replies)
        this_round: dict[str, int] = {}
        for msg in replies:
            if msg.has_error():
                passed.append(msg)
                continue
            reason, norm = _reject_reason(msg, self._reference)
            if not reason:
                reason = self._identity_reason(msg)
            if not reason and _metric_keys(msg) != metric_keys:
                reason = _metric_keys_reason(msg, metric_keys)
            if not reason and norm > self.config.max_update_norm:
                reason = f"update norm {norm:.4g} exceeds the cap {self.config.max_update_norm:.4g}"
            if not reason:
                digest = update_digest(msg)
                if digest in self.seen and self.seen[digest] < server_round:
                    reason = f"replayed update: identical to one sent in round {self.seen[digest]}"
                elif digest in this_round:
                    reason = f"replayed update: identical to node {this_round[digest]}'s this round"
                this_round.setdefault(digest, int(msg.metadata.src_node_id))
            if reason:
                self._reject(server_round, msg, reason)
            else:
                candidates.append((msg, norm))
        if candidates:
            median = float(np.median([norm for _, norm in candidates]))
            limit = self.config.norm_factor * median
            for msg, norm in candidates:
                if median > 0 and norm > limit:
                    self._reject(
                        server_round,
                        msg,
                        f"update norm {norm:.4g} exceeds {self.config.norm_factor:g} x the "
                        f"round's median {median:.4g}",
                    )
                else:
                    passed.append(msg)
                    self.seen[update_digest(msg)] = server_round
        self._bound_weights(server_round, [m for m in passed if not m.has_error()])
        if self.rejections and all(msg.has_error() for msg in passed):
            logger.warning(
                "round %d: no update passed the guard; the model is unchanged", server_round
            )
        return passed

    def _reject(self, server_round: int, msg: Message, reason: str, what: str = "update") -> None:
        node_id = int(msg.metadata.src_node_id)
        institution = self.institution(msg)
        self.rejections.append(Rejection(node_id, institution, f"{what}: {reason}"))
        logger.warning(
            "round %d: rejected the %s of node %d%s: %s",
            server_round,
            what,
            node_id,
            f" ({institution})" if institution else "",
            reason,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        # Evaluation replies carry metrics only; one with other keys or no weight would make
        # Flower's consistency check abort the whole round's aggregation.
        replies = list(replies)
        metric_keys = _majority_metric_keys(replies)
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
            elif reason := self._identity_reason(msg):
                self._reject(server_round, msg, reason, "evaluation")
            elif _metric_keys(msg) == metric_keys:
                kept.append(msg)
            else:
                self._reject(server_round, msg, _metric_keys_reason(msg, metric_keys), "evaluation")
        self._bound_weights(server_round, [m for m in kept if not m.has_error()])
        return self.inner.aggregate_evaluate(server_round, kept)


def update_digest(msg: Message) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a reply's arrays."""
    digest = hashlib.sha256()
    for record in msg.content.array_records.values():
        for name in sorted(record):
            value = np.ascontiguousarray(record[name].numpy())
            digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def _metric_keys(msg: Message) -> frozenset[str] | None:
    """The keys of the reply's only MetricRecord (None if it has not exactly one)."""
    records = list(msg.content.metric_records.values())
    return frozenset(records[0]) if len(records) == 1 else None


def _majority_metric_keys(replies: list[Message]) -> frozenset[str] | None:
    """The metric keys most replies agree on (ties go to the earliest); must include the weight."""
    counts: dict[frozenset[str], int] = {}
    for msg in replies:
        keys = None if msg.has_error() else _metric_keys(msg)
        if keys is not None and WEIGHT_KEY in keys:
            counts[keys] = counts.get(keys, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def _metric_keys_reason(msg: Message, expected: frozenset[str] | None) -> str:
    keys = _metric_keys(msg)
    if keys is None or expected is None:
        return f"expected one MetricRecord with {WEIGHT_KEY!r}"
    return (
        f"metric keys differ from the round's: missing {sorted(expected - keys)}, "
        f"unexpected {sorted(keys - expected)}"
    )
