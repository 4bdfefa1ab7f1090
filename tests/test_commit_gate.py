"""The topic-id gate before every commit, proved on the whole commit history the fake saw (no broker).

The promise (mtc75/engine/checkpoint.py): a commit is sent only once a topic-id check that started after
its messages were fetched says the topic is the SAME; an answer of RECREATED, GONE or none (UNKNOWN)
sends nothing -- not the periodic snapshot waiting for that check, not the synchronous commit at
revoke or shutdown. Looking at the final committed offset cannot show this: a delete wipes the group's
offsets and a re-created topic is committed anew, so a wrong commit in between leaves no trace there.
These tests assert on ``FakeKafka.commits``, every ``commit()`` the engine made, in order.

Each scenario holds the topic-id checks (``FakeKafka.hold_describes``) so that the answer is given
while a snapshot is pending: the engine has handled P0's five messages, snapshotted them and asked;
the test then deletes / re-creates the topic (or makes the check fail) and answers. The engine is
driven only through its public seams: ``mtc75.testing`` with the fake's clients, ``stop()``, and
rebalances queued on the fake consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError

from tests.fake_kafka import FakeKafka
from tests.test_engine_unit import GROUP, P0, TOPIC, WAIT, Recorder, Run, cluster, start, until

__all__ = ["cluster", "start"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)

# What the test does to the topic between the snapshot and the answer, and what the log then says.
CHANGES = {
    "recreated": "was deleted and re-created",
    "gone": "not found",
    "unanswered": "id not confirmed",  # the check fails with a transient error: UNKNOWN
}


def history(cluster: FakeKafka) -> list[tuple[dict[tuple[str, int], int], bool]]:
    """Every commit() the engine made: (offsets, asynchronous), in order, failed ones included."""
    return [(dict(c.offsets), c.asynchronous) for c in cluster.commits]


def change_topic(cluster: FakeKafka, change: str) -> None:
    if change == "recreated":
        cluster.recreate_topic(TOPIC, 3)
    elif change == "gone":
        cluster.delete_topic(TOPIC)
    elif change == "unanswered":
        cluster.describe_error = KafkaError(KafkaError._TRANSPORT, "fake: connection reset")
    else:
        assert change == "same"


@pytest.fixture
def pending(cluster: FakeKafka, start: Callable[..., Run]) -> Iterator[Callable[[], Run]]:
    """A run whose periodic commit has snapshotted P0's five handled messages and waits for the check."""
    runs: list[Run] = []

    def begin() -> Run:
        run = start(Recorder())
        runs.append(run)
        until(lambda: run.stats().assigned == 3, "the first assignment")
        cluster.hold_describes()
        cluster.wait_held_describes(1, WAIT)  # a check in flight, its snapshot taken before any message
        cluster.fill(TOPIC, {0: 5})
        until(lambda: run.stats().processed == 5, "five messages handled")
        assert history(cluster) == []  # the check in flight started before they were fetched
        cluster.answer_describes()  # SAME, for a snapshot of nothing: nothing to send
        cluster.wait_held_describes(1, WAIT)  # the next check: its snapshot is P0 at 5
        assert history(cluster) == []
        return run

    yield begin
    cluster.answer_describes(hold=False)  # never leave the engine waiting on a held check


@pytest.mark.parametrize("change", [*CHANGES, "same"])
def test_the_periodic_snapshot_is_sent_only_on_a_same_answer(
    cluster: FakeKafka, pending: Callable[[], Run], change: str, caplog: pytest.LogCaptureFixture,
) -> None:
    run = pending()
    change_topic(cluster, change)
    assert cluster.answer_describes() == 1
    cluster.wait_held_describes(1, WAIT)  # the engine took the answer and started its next check
    cluster.answer_describes(hold=False)
    run.stop()
    if change == "same":
        assert history(cluster) == [({P0: 5}, True)]  # the snapshot, once, asynchronously; nothing after
        assert cluster.committed(GROUP, TOPIC, 0) == 5
    else:
        # Nothing of the old topic reaches the new one (or the void), neither now nor at shutdown.
        assert history(cluster) == []
        assert CHANGES[change] in caplog.text


@pytest.mark.parametrize("moment", ["revoke", "shutdown"])
@pytest.mark.parametrize("change", [*CHANGES, "same"])
def test_the_commit_at_revoke_or_shutdown_waits_for_a_same_answer(
    cluster: FakeKafka, pending: Callable[[], Run], change: str, moment: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The synchronous commit asks the topic id itself, while the periodic check is still in flight."""
    run = pending()
    change_topic(cluster, change)
    done: Any
    if moment == "revoke":
        done = cluster.consumer().rebalance(revoke=[P0])
    else:
        run.consumer.stop()
    cluster.wait_held_describes(2, WAIT)  # the pending periodic check and the revoke's / shutdown's own
    assert history(cluster) == []  # nothing sent before the answer
    assert cluster.answer_describes(hold=False) == 2  # answered in order: the periodic one first
    if moment == "revoke":
        assert done.wait(WAIT)
        until(lambda: run.stats().assigned == 2, "the revoke to end")
    run.stop()
    if change == "same":
        # The commit of the revoke or shutdown, once: synchronous at a revoke (the next owner reads it), sent
        # at shutdown (the bounded close delivers it); the periodic snapshot is not sent after it.
        assert history(cluster) == [({P0: 5}, moment == "shutdown")]
        assert cluster.committed(GROUP, TOPIC, 0) == 5
    else:
        assert history(cluster) == []
        assert CHANGES[change] in caplog.text
