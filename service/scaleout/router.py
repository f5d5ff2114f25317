"""The model deployment's Serve request router: task-version affinity as a hint, load as the rule.

Serve's default router sends a request with a multiplexed id only to replicas already holding that id, so a hot task
pins one replica while the others idle; its power-of-two fallback ranks replicas by queue lengths that the replicas
report back, which lag behind a burst of requests still in flight (measured: 12 of 12 went to one replica). This
router counts the requests it has picked or sent and not yet seen complete, per replica, and picks:

  - the least loaded replica holding the request's `task@sha256` version, unless it has more than `imbalance` requests
    in flight beyond the least loaded replica overall;
  - otherwise the least loaded replica (which loads the version, a few ms, and from then on holds it too).

Which replicas hold a version is the union of what the replicas report (Serve pushes their loaded ids to the
routers, some hundreds of ms late) and where this router itself sent that version recently: without the second, a
request following its predecessor within that delay was routed as if no replica held the version.

Each router (one per ingress replica) sees only its own sends; with several ingresses each balances its share.
"""

import random
import time
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


RESERVATION_S = 2.0
SENT_VERSIONS_PER_REPLICA = 64  # bounded memory of "recently sent here"; a stale entry only costs a reload (ms)


class TaskAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalance: int = 2, **kwargs: object) -> None:
        self.imbalance = imbalance
        self.in_flight: Dict[ReplicaID, int] = {}
        # Picks not yet sent: Serve runs several routing tasks at once and sends after awaiting, so without these a
        # burst would see the same counts in every pick. A pick is matched by the next send to its replica, or
        # forgotten after RESERVATION_S (the routing task sent elsewhere or gave up).
        self.reserved: Dict[ReplicaID, Deque[float]] = {}
        self.sent_versions: Dict[ReplicaID, "OrderedDict[str, None]"] = {}

    def _load(self, replica_id: ReplicaID, now: float) -> int:
        picks = self.reserved.get(replica_id)
        while picks and now - picks[0] > RESERVATION_S:
            picks.popleft()
        return self.in_flight.get(replica_id, 0) + (len(picks) if picks else 0)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        picks = self.reserved.get(replica_id)
        if picks:
            picks.popleft()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self.in_flight[replica_id] = max(0, self.in_flight.get(replica_id, 0) - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id, None)
        self.reserved.pop(replica_id, None)
        self.sent_versions.pop(replica_id, None)

    def _holds(self, replica: RunningReplica, model_id: str) -> bool:
        return model_id in replica.multiplexed_model_ids or model_id in self.sent_versions.get(replica.replica_id, ())

    def _remember_sent(self, replica_id: ReplicaID, model_id: str) -> None:
        versions = self.sent_versions.setdefault(replica_id, OrderedDict())
        versions[model_id] = None
        versions.move_to_end(model_id)
        while len(versions) > SENT_VERSIONS_PER_REPLICA:
            versions.popitem(last=False)

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = time.monotonic()
        replicas = random.sample(candidate_replicas, len(candidate_replicas))  # random order breaks ties
        loads = {r.replica_id: self._load(r.replica_id, now) for r in replicas}
        by_load = sorted(replicas, key=lambda r: loads[r.replica_id])
        least = loads[by_load[0].replica_id]
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        chosen = by_load[0]
        if model_id:
            holders = [r for r in by_load if self._holds(r, model_id)]
            if holders and loads[holders[0].replica_id] - least <= self.imbalance:
                chosen = holders[0]
            self._remember_sent(chosen.replica_id, model_id)
        self.reserved.setdefault(chosen.replica_id, deque()).append(now)
        return [[chosen], [r for r in by_load if r is not chosen]]
