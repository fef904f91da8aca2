"""The jobs store's reads and writes that the dispatcher makes per group of jobs: the inputs of
every job claimed together in one read, and the outcomes of a pipeline call in one transaction."""

from __future__ import annotations

import time

import sqlalchemy as sa

from diffuser_api.jobs.records import BATCH_LINE_CLASS, JobRecord, JobStatus, new_job_id
from diffuser_api.jobs.schema import job_inputs
from diffuser_api.jobs.store import JobStore, Outcome
from tests.unit.test_idempotency_races import store_at


def queued(endpoint: str, age_s: float = 0.0) -> JobRecord:
    """``age_s``: submitted that long ago (claims take the oldest first)."""
    return JobRecord(id=new_job_id(), owner="a", endpoint=endpoint, model="m", request={"prompt": "x"},
                     status=JobStatus.QUEUED, created_at=time.time() - age_s)


def stored_inputs(store: JobStore) -> int:
    with store._engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(job_inputs)).scalar_one()


def test_the_inputs_of_jobs_claimed_together_come_in_one_read_each_with_its_own(tmp_path):
    store = store_at(tmp_path)
    edit, generation, two = queued("edits"), queued("generations"), queued("edits")
    store.insert(edit, [("image", b"edit-image")], idempotent_since=0.0)
    store.insert(generation, [], idempotent_since=0.0)
    store.insert(two, [("image", b"first"), ("mask", b"second")], idempotent_since=0.0)
    claimed = store.claim("m", 10, "r1", time.time(), 30)
    assert {record.id for record in claimed} == {edit.id, generation.id, two.id}
    assert store.inputs_of([record.id for record in claimed]) == {
        edit.id: [("image", b"edit-image")], two.id: [("image", b"first"), ("mask", b"second")]}


def test_finishing_a_group_records_each_outcome_and_drops_the_inputs_of_those_it_held(tmp_path):
    store = store_at(tmp_path)
    mine, failed, elsewhere = queued("edits", 3.0), queued("edits", 2.0), queued("edits", 1.0)
    for record in (mine, failed, elsewhere):
        store.insert(record, [("image", record.id.encode())], idempotent_since=0.0)
    store.claim("m", 2, "r1", time.time(), 30)  # the oldest two
    store.claim("m", 1, "r2", time.time(), 30)
    now = time.time()
    records = store.finish([Outcome(mine.id, JobStatus.COMPLETED, result={"images": []}),
                            Outcome(failed.id, JobStatus.FAILED, error={"message": "no"}),
                            Outcome(elsewhere.id, JobStatus.COMPLETED, result={"images": []})], "r1", now, ttl_s=60)
    assert records[2] is None, "r2 holds that job: r1's outcome is not recorded"
    assert [(record.id, record.status, record.expires_at) for record in records[:2] if record] == [
        (mine.id, JobStatus.COMPLETED, now + 60), (failed.id, JobStatus.FAILED, now + 60)]
    assert records[1] is not None and records[1].error == {"message": "no"}
    assert [store.get(mine.id), store.get(failed.id)] == records[:2], "what is returned is what was stored"
    assert store.get(elsewhere.id).status is JobStatus.IN_PROGRESS
    assert store.inputs_of([mine.id, failed.id, elsewhere.id]) == {elsewhere.id: [("image", elsewhere.id.encode())]}
    assert stored_inputs(store) == 1


def test_a_batch_s_pending_lines_are_found_through_their_own_index(tmp_path):
    store = store_at(tmp_path)
    with store._engine.connect() as connection:
        indexes = {index["name"]: index["column_names"] for index in sa.inspect(connection).get_indexes("jobs")}
    assert indexes["jobs_batch_status"] == ["batch_id", "status"]


def test_a_claim_reads_the_queue_in_index_order_without_sorting_it(tmp_path):
    """Async jobs first, then batch lines in order; the claim index has the claim's own order,
    so a claim reads its first rows rather than sorting every queued job (0005)."""
    store = store_at(tmp_path)
    now = time.time()
    lines = [JobRecord(id=new_job_id(), owner="a", endpoint="generations", model="m", request={"prompt": "x"},
                       status=JobStatus.QUEUED, created_at=now - 10, batch_id="batch_1", line=line,
                       job_class=BATCH_LINE_CLASS) for line in (3, 1, 2)]
    job = queued("generations")
    for record in (*lines, job):
        store.insert(record, [], idempotent_since=0.0)
    statements: list[tuple[str, object]] = []

    def record_selects(connection, cursor, statement, parameters, context, executemany):
        if "ORDER BY" in statement.upper() and "LIMIT" in statement.upper():
            statements.append((statement, parameters))

    sa.event.listen(store._engine, "before_cursor_execute", record_selects)
    claimed = store.claim("m", 3, "r1", time.time(), 30)
    sa.event.remove(store._engine, "before_cursor_execute", record_selects)
    assert {record.id for record in claimed} == {job.id, lines[1].id, lines[2].id}
    (statement, parameters), = statements
    with store._engine.connect() as connection:
        plan = " / ".join(row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}",
                                                                        parameters))
    assert "USING INDEX jobs_claim" in plan and "TEMP B-TREE" not in plan, plan
