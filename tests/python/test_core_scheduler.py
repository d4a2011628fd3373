"""ringpool._core.Scheduler (detail::Scheduler for ringpool.Executor) driven without processes:
the records a worker would send are tuples built here, in task.hpp's field order."""
import pytest

from ringpool import _core

T = _core.task
S = _core.Scheduler


def ok(wid, tid, value=None, elapsed=1e-3):
    return (wid, tid, T.OK, value, elapsed)


def started(wid, tid):
    return (wid, tid, T.STARTED, None, 0.0)


def pool(workers=2, **kw):
    s = S(workers, **kw)
    for wid in range(1, workers + 1):
        s.add_worker(wid)
    return s


def records_of(assigned):
    """{wid: [(tid, group, index, count), ...]} from assign()'s answer."""
    out = {}
    for wid, recs in assigned:
        out.setdefault(wid, []).extend(recs)
    return out


def test_a_map_goes_out_in_runs_and_comes_back_in_one_batch():
    s = pool(2, min_depth=4, max_depth=4)
    s.submit(7, 10, True)
    sent = records_of(s.assign())
    # Least busy first: worker 1 takes four items as one RUN record, then worker 2 the next four.
    assert sent == {1: [(1, 7, 0, 4)], 2: [(5, 7, 4, 4)]}
    assert s.backlog == 2 and s.outstanding == 10
    recs = [ok(1, 1, "a"), ok(2, 5, "e"), ok(1, 2, "b")]
    stop, answered, failed, unread, was_started = s.answers(recs)
    assert stop == 3 and failed is None and unread is None and not was_started
    assert answered == [(7, 0, T.OK, "a"), (7, 4, T.OK, "e"), (7, 1, T.OK, "b")]
    assert s.outstanding == 7
    # Room for two more on worker 1 (depth 4): the rest of the map, as one record.
    assert records_of(s.assign()) == {1: [(9, 7, 8, 2)]}


def test_submits_never_share_a_record():
    s = pool(1, min_depth=8, max_depth=8)
    for g in (1, 2, 3):
        s.submit(g, 1, False)
    assert records_of(s.assign()) == {1: [(1, 1, 0, 1), (2, 2, 0, 1), (3, 3, 0, 1)]}


def test_submit_one_answers_a_lone_call_as_wid_and_tid_and_anything_else_as_assign_does():
    s = pool(1, min_depth=2, max_depth=2)
    assert s.submit_one(1) == (1, 1)  # alone, to the idle worker: no lists
    assert s.submit_one(2) == (1, 2)
    assert s.submit_one(3) == []  # the worker is full (depth 2): it waits in the backlog
    assert s.backlog == 1
    s.answers([ok(1, 1)])
    # Room for one: the waiting call goes first, so the new one waits and the answer is a list.
    assert s.submit_one(4) == [(1, [(3, 3, 0, 1)])]
    assert s.backlog == 1 and s.outstanding == 3


def test_a_death_in_the_middle_of_a_batch_fails_the_running_item_and_requeues_the_rest():
    s = pool(2, min_depth=3, max_depth=3)
    s.submit(1, 6, True)
    sent = records_of(s.assign())
    assert sent == {1: [(1, 1, 0, 3)], 2: [(4, 1, 3, 3)]}
    # One batch: worker 1 answered its first item, worker 2 its first; then worker 1's death.
    recs = [ok(1, 1), ok(2, 4), (1, None, T.DIED, None, 0.0), ok(2, 5)]
    stop, answered, failed, _, _ = s.answers(recs)
    assert stop == 2 and [a[:2] for a in answered] == [(1, 0), (1, 3)]
    s.exited(1)
    # It had taken its record (consumed 1) and answered one item of three: item 1 was running.
    running, timed_out, retiring, failed, requeued = s.died(1, 1)
    assert (running, timed_out, retiring, requeued) == (True, False, False, 1)
    assert failed == [(1, 1, S.DIED, "")]
    stop, answered, _, _, _ = s.answers(recs, stop + 1)
    assert stop == 4 and [a[:2] for a in answered] == [(1, 4)]
    assert s.shortfall() == 1
    s.add_worker(3)
    assert records_of(s.assign()) == {3: [(7, 1, 2, 1)]}  # item 2, never started, goes again


def test_a_timeout_racing_its_result_the_result_wins_and_the_next_call_is_not_at_fault():
    # A 1 ns timeout: any deadline has passed by the time expire() looks (no sleeping).
    s = pool(1, task_timeout=1e-9, min_depth=2, max_depth=2)
    s.submit(1, 1, False)
    s.submit(2, 1, False)
    assert records_of(s.assign()) == {1: [(1, 1, 0, 1), (2, 2, 0, 1)]}
    *_, was_started = s.answers([started(1, 1)])
    assert was_started
    kill, deadline = s.expire()
    assert kill == [1] and deadline is None
    # Before the kill landed, call 1 answered and call 2 started; then the worker died.
    stop, answered, _, _, _ = s.answers([ok(1, 1, "first"), started(1, 2), (1, None, T.DIED, None, 0.0)])
    assert stop == 2 and answered == [(1, 0, T.OK, "first")]
    running, timed_out, _, failed, requeued = s.died(1, 2)
    assert running and timed_out
    assert failed == [] and requeued == 1  # call 2 goes to another worker
    s.add_worker(2)
    assert records_of(s.assign()) == {2: [(3, 2, 0, 1)]}


def test_a_task_past_its_deadline_fails_as_timed_out():
    s = pool(1, task_timeout=1e-9)
    s.submit(1, 1, False)
    s.assign()
    s.answers([started(1, 1)])
    assert s.expire()[0] == [1]
    assert s.expire()[0] == []  # killed once
    _, _, _, failed, _ = s.died(1, 1)
    assert failed == [(1, 0, S.TIMED_OUT, "")]
    assert s.outstanding == 0


def test_max_requeues_fails_a_call_in_front_of_that_many_deaths_plus_one():
    # A death that says (by the worker's `consumed`) the call in front was never taken requeues it;
    # with max_requeues=2 the third such death fails it (DIED, with why) and the call behind goes on.
    s = S(1, max_requeues=2, min_depth=2, max_depth=2)
    s.submit(1, 1, False)
    s.submit(2, 1, False)
    for wid in (1, 2, 3):
        s.add_worker(wid)
        sent = records_of(s.assign())
        assert [r[1] for r in sent[wid]] == [1, 2]
        running, timed_out, retiring, failed, requeued = s.died(wid, 0)
        assert not running and not timed_out
        if wid < 3:
            assert failed == [] and requeued == 2
        else:
            assert requeued == 1
            [(g, i, fate, why)] = failed
            assert (g, i, fate) == (1, 0, S.DIED)
            assert "the next task of 3 workers that died" in why and "max_requeues 2" in why
    s.add_worker(4)
    assert [r[1] for r in records_of(s.assign())[4]] == [2]
    assert s.outstanding == 1


def test_without_max_requeues_the_executor_requeues_a_call_its_worker_never_took():
    # ringpool.Executor's rule (max_requeues 0): its workers' counts are trusted, so a call they did
    # not take was not at fault, however often that happens.
    s = S(1)
    s.submit(1, 1, False)
    for wid in range(1, 11):
        s.add_worker(wid)
        s.assign()
        assert s.died(wid, 0)[3:] == ([], 1)
    assert s.backlog == 1 and s.outstanding == 1


def test_recycling_under_load_retires_workers_at_their_budget_and_asks_for_replacements():
    s = pool(2, max_tasks_per_child=3, min_depth=8, max_depth=8)
    s.submit(1, 20, True)
    next_wid, taken, results = 3, {1: 0, 2: 0}, 0
    for _ in range(100):
        if not s.outstanding:
            break
        for wid, recs in s.assign():
            assert all(count == 1 for _, _, _, count in recs)  # no runs: a worker's count stays exact
            for tid, _, _, _ in recs:
                taken[wid] += 1
                assert taken[wid] <= 3
                _, answered, _, _, _ = s.answers([ok(wid, tid)])
                results += len(answered)
            if taken[wid] == 3:  # it exits after its budget
                s.exited(wid)
                running, _, retiring, failed, _ = s.died(wid, 3)
                assert retiring and not running and failed == []
        while s.shortfall():
            s.add_worker(next_wid)
            taken[next_wid] = 0
            next_wid += 1
    assert results == 20 and s.outstanding == 0
    assert next_wid - 3 >= 5  # 20 calls, 3 per worker: at least 5 replacements


def test_cancel_in_the_backlog_and_unsend():
    s = pool(1, min_depth=2, max_depth=2)
    s.submit(1, 1, False)
    s.submit(2, 3, True)
    s.submit(3, 1, False)
    assert records_of(s.assign()) == {1: [(1, 1, 0, 1), (2, 2, 0, 1)]}
    # Group 2's items 1, 2 and group 3 wait: cancelling group 2 drops only its waiting items.
    assert s.cancel([2, 99]) == [(2, 1), (2, 2)]
    assert s.outstanding == 3
    s.answers([ok(1, 1), ok(1, 2)])
    assert records_of(s.assign()) == {1: [(3, 3, 0, 1)]}
    # That last record was not sent after all (say its Future was cancelled): taken back.
    assert s.unsend(1, 3) == (3, 0)
    assert s.unsend(1, 3) is None
    assert s.outstanding == 0


def test_split_a_run_that_does_not_pickle():
    s = pool(1, min_depth=3, max_depth=3)
    s.submit(5, 3, True)
    assert records_of(s.assign()) == {1: [(1, 5, 0, 3)]}
    assert s.split(1, 1) == 3  # three records of one call, ids 1, 2, 3
    assert s.unsend(1, 2) == (5, 1)  # the bad one, failed by the owner
    _, answered, _, _, _ = s.answers([ok(1, 1), ok(1, 3)])
    assert [a[:2] for a in answered] == [(5, 0), (5, 2)]
    running, _, _, failed, _ = s.died(1, 2)  # took two records, answered two
    assert not running and failed == []


def test_a_result_that_does_not_unpickle_is_found_by_a_ping():
    s = pool(2, min_depth=2, max_depth=2)
    s.submit(1, 4, True)
    s.assign()
    assert sorted(s.result_gap("UnpicklingError: no module")) == [1, 2]
    # Worker 1 answers its second item and its pong: the first lost its result.
    pong = (1, None, T.PONG, None, 0.0)
    _, answered, failed, _, _ = s.answers([ok(1, 2), pong])
    assert answered == [(1, 1, T.OK, None)]
    assert failed == [(1, 0, S.LOST, "UnpicklingError: no module")]
    # Worker 2's pong after both its answers: nothing lost.
    _, answered, failed, _, _ = s.answers([ok(2, 3), ok(2, 4), (2, None, T.PONG, None, 0.0)])
    assert len(answered) == 2 and failed is None


def test_an_unreadable_run_goes_again_call_by_call_and_only_the_call_at_fault_fails():
    s = pool(1, min_depth=3, max_depth=3)
    s.submit(4, 3, True)
    s.assign()
    err = (ValueError("x"), "tb")
    # The worker could not unpickle the RUN record: none of its calls fails, all go again alone.
    _, answered, _, unread, _ = s.answers([(1, None, T.ERR, err, 0.0)])
    assert answered == [] and unread == [(1, 4)]
    assert s.outstanding == 3
    assert records_of(s.assign()) == {1: [(4, 4, 0, 1), (5, 4, 1, 1), (6, 4, 2, 1)]}
    # Then the one record it cannot read is the call at fault: its error is that call's answer.
    _, answered, _, unread, _ = s.answers([ok(1, 4), (1, None, T.ERR, err, 0.0), ok(1, 6)])
    assert answered == [(4, 0, T.OK, None), (4, 1, T.ERR, err), (4, 2, T.OK, None)] and unread == [(1, 4)]
    running, _, _, failed, _ = s.died(1, 4)  # 4 records taken (the run and three calls), 4 answered
    assert not running and failed == []


def test_initializer_failure_stops_the_batch_and_drain_hands_back_every_owed_call():
    s = pool(1)
    s.submit(1, 3, True)
    s.assign()
    stop, *_ = s.answers([ok(1, 1), (1, None, T.INIT_FAILED, None, 0.0), ok(1, 2)])
    assert stop == 1
    assert sorted(s.drain()) == [(1, 1), (1, 2)]
    assert s.outstanding == 0


def test_bad_input():
    with pytest.raises(ValueError):
        S(0)
    with pytest.raises(ValueError):
        S(1, task_timeout=0.0)
    with pytest.raises(ValueError):
        S(1, min_depth=4, max_depth=2)
    s = pool(1)
    with pytest.raises(ValueError, match="malformed result record"):
        s.answers([(1, 1, T.OK)])
    with pytest.raises(ValueError, match="malformed result record"):
        s.answers([("one", 1, T.OK, None, 0.0)])
    with pytest.raises(RuntimeError):
        s.add_worker(1)  # twice
