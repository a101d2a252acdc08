"""Cancel a generation that runs on another replica, through Redis.

Each replica has an id and listens on its own channel `<prefix>cancel:<replica>`.
While a generation is live, the key `<prefix>live:<owner hash>:<request_id>` names
the replica running it. A cancel that finds nothing locally (`GenerationService.cancel`)
reads that key and publishes the cancel to that replica's channel; that replica answers
on the asker's channel whether it found the generation running, so a generation that
ended meanwhile is a miss (404), not a false 200. PUBLISH tells how many subscribers got
the cancel: a replica that died is a miss at once, and its stale key is removed. The
owner is part of the key: one identity never finds another's generation on any
replica.

`announce()`/`withdraw()` are synchronous for the generation path: they queue the key
writes for a writer task, so a generation never waits on Redis. A cancel sent to
another replica within the few milliseconds before the key is written is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any, cast, get_args

import trio
from redis.exceptions import RedisError

from .core.events import CancelCause
from .redis_channels import RedisChannels, next_batch

if TYPE_CHECKING:
    from .generation import GenerationService

log = logging.getLogger(__name__)

#: A safety net for keys a crashed replica left behind; generations are far shorter.
LIVE_KEY_TTL_SECONDS = 24 * 3600
#: How long a forwarded cancel waits for the other replica's answer.
REPLY_TIMEOUT_SECONDS = 2.0
CAUSES = get_args(CancelCause)

# Delete the key only if it still names this replica (a later generation with the same
# owner and id may run elsewhere by now).
_DELETE_IF_OURS = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisRemoteCancel:
    """A `generation.RemoteCancel` over the app's `RedisChannels`."""

    def __init__(self, redis: RedisChannels, *, prefix: str, replica_id: str | None = None):
        self.replica_id = replica_id or uuid.uuid4().hex
        self._redis = redis
        self._prefix = prefix
        # Key writes (set/del) and answers to other replicas, sent in order by `run()`.
        self._out_in, self._out_out = trio.open_memory_channel[tuple[str, str, str]](math.inf)
        self._waiting: dict[str, list[Any]] = {}  # nonce -> [answered Event, found]
        self._delete_if_ours = redis.client.register_script(_DELETE_IF_OURS)

    def _key(self, owner: str, request_id: str) -> str:
        owner_hash = hashlib.sha256(owner.encode()).hexdigest()[:32]
        return f"{self._prefix}live:{owner_hash}:{request_id}"

    def _channel(self, replica_id: str) -> str:
        return f"{self._prefix}cancel:{replica_id}"

    def announce(self, owner: str, request_id: str) -> None:
        self._out_in.send_nowait(("set", self._key(owner, request_id), ""))

    def withdraw(self, owner: str, request_id: str) -> None:
        self._out_in.send_nowait(("del", self._key(owner, request_id), ""))

    async def forward(self, owner: str, request_id: str, cause: CancelCause) -> bool:
        key = self._key(owner, request_id)
        nonce = uuid.uuid4().hex
        answer: list[Any] = [trio.Event(), False]
        self._waiting[nonce] = answer
        message = json.dumps({"owner": owner, "request_id": request_id, "cause": cause,
                              "reply_to": self.replica_id, "nonce": nonce})
        try:
            raw = cast("bytes | None", await self._redis.call(self._redis.client.get, key))
            if raw is None or raw.decode() == self.replica_id:
                return False
            replica = raw.decode()
            if not await self._redis.publish(self._channel(replica), message.encode()):
                await self._redis.call(self._delete_if_ours, [key], [replica])
                return False
            with trio.move_on_after(REPLY_TIMEOUT_SECONDS):
                await answer[0].wait()
            return bool(answer[1])
        except RedisError as exc:
            log.warning("cross-replica cancel of %s failed: %s", request_id, exc)
            return False
        finally:
            del self._waiting[nonce]

    async def run(
        self,
        service: GenerationService,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write the live keys, take the cancels sent to this replica and answer them,
        until cancelled (in the app's services nursery)."""

        def on_message(raw: bytes) -> None:
            try:
                data = json.loads(raw)
                if "answer" in data:
                    waiting = self._waiting.get(str(data["answer"]))
                    if waiting is not None:
                        waiting[1] = bool(data["found"])
                        waiting[0].set()
                    return
                owner, request_id, cause = data["owner"], data["request_id"], data["cause"]
                reply_to, nonce = str(data["reply_to"]), str(data["nonce"])
                if not (isinstance(owner, str) and isinstance(request_id, str)):
                    raise TypeError("owner and request_id must be strings")
                if cause not in CAUSES:
                    raise ValueError(f"unknown cause {cause!r}")
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("malformed cross-replica cancel ignored: %s", exc)
                return
            found = service.cancel_local(owner, request_id, cause)
            answer = json.dumps({"answer": nonce, "found": found})
            self._out_in.send_nowait(("publish", self._channel(reply_to), answer))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send)
            await nursery.start(self._redis.listen, self._channel(self.replica_id), on_message)
            task_status.started()

    async def _send(self) -> None:
        """Apply queued writes in order, batched in one pipeline per round trip."""
        while True:
            batch = await next_batch(self._out_out)
            try:
                await self._redis.call(self._apply, batch)
            except RedisError as exc:
                log.warning("cross-replica cancel state not written: %s", exc)

    def _apply(self, batch: list[tuple[str, str, str]]) -> None:
        """In a worker thread: one round trip for the whole batch."""
        pipe = self._redis.client.pipeline(transaction=False)
        for op, target, payload in batch:
            if op == "set":
                pipe.set(target, self.replica_id, ex=LIVE_KEY_TTL_SECONDS)
            elif op == "del":
                self._delete_if_ours(keys=[target], args=[self.replica_id], client=pipe)
            else:
                pipe.publish(target, payload)
        pipe.execute()
