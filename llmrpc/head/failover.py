"""A farm's plan made again: over the servers that still answer when one fails (once for every
generation that saw the failure), and with servers failed over that answer again, between
generations (asked every ``rejoin_every`` seconds by :class:`llmrpc.head.rejoin.Rejoiner`)."""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from llmrpc.auth import ClientSecurity
from llmrpc.head.client import HungError, StageClient, StageError
from llmrpc.head.planner import PlanError
from llmrpc.head.rejoin import REJOIN_WAIT, Rejoiner
from llmrpc.head.resolve import resolve
from llmrpc.types import split_address

if TYPE_CHECKING:
    from llmrpc.farm import Farm
    from llmrpc.head.pipeline import Pipeline

logger = logging.getLogger(__name__)


class Failover:
    def __init__(self, farm: Farm, rejoin_every: float | None) -> None:
        self.farm = farm
        self._recovering = threading.Lock()
        self._gone: set[str] = set()  # servers failed over that did not answer
        self.replays = 0  # plans made again after servers failed
        self.rejoins = 0  # plans made again with servers that came back
        self._rejoiner = Rejoiner(self._lost, self._answers, self._rejoin, rejoin_every) if rejoin_every else None

    def recover(self, failed: Pipeline | None, cause: Exception) -> None:
        """Plan again over the servers that still answer and load their ranges (once for every
        generation that saw the same failure)."""
        farm = self.farm
        with self._recovering:
            if farm.pipeline is not None and farm.pipeline is not failed:  # another generation has done it
                return
            farm.disconnect()
            farm.addresses = resolve(farm.servers)[0] or farm.addresses
            # one found hung a moment ago is not asked again (it would have hung_after to answer)
            hung = {cause.address} if isinstance(cause, HungError) else set()
            asked = [a for a in farm.addresses if a not in hung]
            alive = answering(asked, farm.connect_timeout, farm.hung_after, farm.security)
            if not alive:
                raise RuntimeError(f"{cause}; no server of {', '.join(farm.addresses)} answers any more") from cause
            try:
                farm.connect(alive, fewer=True)
            except (StageError, PlanError) as e:
                raise RuntimeError(f"{cause}; the servers left cannot take the model: {e}") from e
            self.replays += 1
            self._gone = set(farm.addresses) - set(alive)
            logger.warning("re-planned over %d of %d servers", len(alive), len(farm.addresses))

    def stop(self) -> None:
        if self._rejoiner is not None:
            self._rejoiner.stop()

    def _lost(self) -> list[str]:
        return sorted(self._gone)

    def _answers(self, address: str) -> bool:
        farm = self.farm
        return bool(answering([address], farm.connect_timeout, farm.hung_after, farm.security, quiet=True))

    def _rejoin(self, back: list[str]) -> bool:
        """Plan the servers ``back`` in again with those of the plan, between generations; False
        when the generations open did not all end within REJOIN_WAIT (tried again later)."""
        farm = self.farm
        with farm.gate.alone(REJOIN_WAIT) as alone, self._recovering:
            if not alone:
                logger.warning(
                    "planning %s back in waits: %d generations still open after %g s", ", ".join(back),
                    farm.gate.open, REJOIN_WAIT,
                )  # fmt: skip
                return False
            if farm.closed or farm.pipeline is None:
                return True
            before = [a.address for p in farm.plans for a in p]
            wanted = set(before) | set(back)
            self._gone -= set(back)  # planned in now, or (if they cannot be) not tried again
            farm.disconnect()
            try:
                farm.connect([a for a in farm.addresses if a in wanted])
            except (StageError, PlanError, RuntimeError) as e:
                logger.warning("planning %s back in failed: %s", ", ".join(back), e)
                farm.disconnect()
                farm.connect(before)
                return True
            self.rejoins += 1
            planned = sum(len(p) for p in farm.plans)
            logger.warning("planned %s back in: %d of %d servers", ", ".join(back), planned, len(farm.addresses))
            return True


def answering(
    addresses: list[str], connect_timeout: float, hung_after: float, security: ClientSecurity, quiet: bool = False
) -> list[str]:
    """The servers that answer, all asked at once: a dead one's port refuses at once, where
    gRPC would go on retrying until its timeout; a hung one (stopped: its port still takes
    connections) has ``hung_after`` to answer a Hello. ``quiet``: why one does not, logged at
    debug level only (asked every few seconds)."""

    def answers(address: str) -> bool:
        if not listening(address, connect_timeout):
            return False
        client = StageClient(address, connect_timeout=hung_after, security=security)
        try:
            client.hello()
            return True
        except StageError as e:
            logger.log(logging.DEBUG if quiet else logging.WARNING, "%s", e)
            return False
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
        ok = list(pool.map(answers, addresses))
    return [a for a, answered in zip(addresses, ok, strict=True) if answered]


def listening(address: str, timeout: float) -> bool:
    """Whether something accepts connections at ``address`` (a dead server's port refuses at once,
    where gRPC would go on retrying until its timeout)."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
