"""service.ServiceJudge: when does the broker not serve a queue we consume? (pure logic)"""

from __future__ import annotations

from workqd.service import CHURN_POLLS, UNSERVED_AFTER, Sample, ServiceJudge

BUSY = frozenset({(101, 7, True), (102, 3, False)})


def sample(ready=0, broker=3, consuming=3, idle=1, progress=BUSY) -> Sample:
    return Sample(ready=ready, broker_consumers=broker, consuming=consuming, idle=idle,
                  progress=progress)


def feed(judge: ServiceJudge, *samples) -> list[str]:
    return [judge.observe(s) for s in samples]


def test_too_few_consumers_needs_polls_in_a_row():
    j = ServiceJudge(starvation_applies=True)
    assert feed(j, sample(broker=0)) == [""]
    assert not j.unserved
    assert feed(j, sample(broker=0)) == ["lost"]
    assert j.unserved and "counts 0 consumer(s) but 3 consume here" in j.sign
    assert feed(j, sample(broker=0)) == [""]       # said once
    assert feed(j, sample(broker=6)) == ["back"]
    assert not j.unserved and j.sign == ""


def test_one_late_sample_is_forgiven():
    j = ServiceJudge(starvation_applies=True)
    assert feed(j, sample(broker=0), sample(broker=3), sample(broker=0)) == ["", "", ""]
    assert not j.unserved


def test_starved_stale_leader_counts_consumers_but_delivers_nothing():
    # A quorum leader without a quorum answers from its last state: 6 consumers (ours and
    # another host's), tasks ready, and our idle workers get nothing, poll after poll.
    j = ServiceJudge(starvation_applies=True)
    frozen = sample(ready=900, broker=6, idle=2)
    changes = feed(j, *[frozen] * (UNSERVED_AFTER + 1))
    assert changes[-1] == "lost" and changes[:-1] == [""] * UNSERVED_AFTER
    assert "900 task(s) wait and 2 worker(s) here are idle" in j.sign
    moved = sample(ready=899, broker=6, idle=2, progress=frozenset({(101, 8, True)}))
    assert feed(j, moved) == ["back"]


def test_not_starved_while_tasks_are_delivered():
    j = ServiceJudge(starvation_applies=True)
    for n in range(10):
        j.observe(sample(ready=500 - n, broker=6, idle=1,
                         progress=frozenset({(101, n, True), (102, 2 * n, False)})))
    assert not j.unserved


def test_not_starved_when_every_worker_is_busy_or_nothing_waits():
    j = ServiceJudge(starvation_applies=True)
    feed(j, *[sample(ready=50, idle=0)] * 5)   # long tasks: busy workers take nothing new
    assert not j.unserved
    feed(j, *[sample(ready=0, idle=3)] * 5)    # an empty queue: idle is normal
    assert not j.unserved


def test_single_active_consumer_or_foreign_queue_is_never_judged_starved():
    j = ServiceJudge(starvation_applies=False)
    feed(j, *[sample(ready=50, broker=6, idle=3)] * 5)
    assert not j.unserved
    feed(j, *[sample(broker=1)] * UNSERVED_AFTER)  # too few consumers still counts
    assert j.unserved


def test_nothing_is_judged_without_a_sample_or_while_nothing_consumes_here():
    j = ServiceJudge(starvation_applies=True)
    feed(j, None, None, sample(broker=0, consuming=0, idle=0), sample(broker=0, consuming=0))
    assert not j.unserved
    # A sample missing between two frozen ones is no evidence of starvation either.
    frozen = sample(ready=10, broker=6, idle=2)
    feed(j, frozen, None, frozen)
    assert not j.unserved


# --- churn: workers that keep consuming again while nothing is delivered ---------------

def subs(*times) -> frozenset:
    """Each worker's count of consumes: worker 101 has times[0], 102 times[1], ..."""
    return frozenset((101 + i, t) for i, t in enumerate(times))


def churned(*per_poll, ready=0, broker=3, progress=BUSY) -> list[Sample]:
    return [Sample(ready=ready, broker_consumers=broker, consuming=3, idle=1,
                   progress=progress, subscriptions=s) for s in per_poll]


def test_a_worker_that_keeps_consuming_again_with_nothing_delivered_is_unserved():
    # A quorum leader without a quorum: consume-ok, 541 fifteen seconds later, consume
    # again. The broker's count looks whole and nothing waits, so only the churn shows.
    j = ServiceJudge(starvation_applies=True)
    polls = [subs(1, 1), subs(1, 1), subs(1, 2), subs(1, 2), subs(1, 2), subs(1, 3),
             subs(1, 3), subs(1, 3), subs(1, 4), subs(1, 4)]
    changes = feed(j, *churned(*polls))
    assert changes == [""] * 9 + ["lost"]
    assert "a worker here consumed again 3 times in the last 9 polls" in j.sign
    # Once it stops, the window forgets it and the queue is served again.
    changes = feed(j, *churned(*[subs(1, 4)] * CHURN_POLLS))
    assert "back" in changes and not j.unserved


def test_a_failover_or_two_is_not_churn():
    j = ServiceJudge(starvation_applies=True)
    feed(j, *churned(*[subs(1, 1, 1)] * 3, *[subs(2, 2, 2)] * 3, *[subs(3, 3, 3)] * 20))
    assert not j.unserved


def test_churn_while_tasks_are_delivered_is_not_unserved():
    j = ServiceJudge(starvation_applies=True)
    for n in range(2 * CHURN_POLLS):
        j.observe(Sample(ready=0, broker_consumers=3, consuming=3, idle=1,
                         progress=frozenset({(101, n, True)}), subscriptions=subs(n)))
    assert not j.unserved


def test_a_replaced_worker_counts_from_its_own_first_sample():
    # A new pid with a high count is not a worker that consumed again here.
    j = ServiceJudge(starvation_applies=True)
    feed(j, *churned(*[subs(1)] * 4, *[frozenset({(202, 9)})] * 8))
    assert not j.unserved


def test_a_pause_clears_the_churn_window():
    # Pausing and resuming consumes again; a poll with nothing consuming forgets the
    # consumes before it.
    j = ServiceJudge(starvation_applies=True)
    paused = Sample(ready=0, broker_consumers=0, consuming=0, idle=0, progress=BUSY,
                    subscriptions=subs(2))
    feed(j, *churned(subs(1), subs(2)), paused, *churned(subs(3), subs(4), subs(4), subs(4)))
    assert not j.unserved


def test_a_resume_is_not_churn():
    # Each resume consumes again because the master said so: the window starts afresh.
    j = ServiceJudge(starvation_applies=True)
    for n in range(1, 8):
        feed(j, *churned(subs(n)))
        j.forget_churn()
    assert not j.unserved
