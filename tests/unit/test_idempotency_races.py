"""Two submissions with the same Idempotency-Key at the same moment store one record: the
unique index on (owner, idempotency_key) refuses the second insert, whose request answers with
the first one's record."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import sqlalchemy as sa
from alembic import command

from diffuser_api.config import Settings
from diffuser_api.jobs.database import migrate, migration_config, open_database
from diffuser_api.jobs.records import JobRecord, JobStatus, new_job_id
from diffuser_api.jobs.schema import jobs
from diffuser_api.jobs.store import JobStore
from tests.fakes import fake_app
from tests.servers import ThreadedServer
from tests.unit.test_batches import FAST, GEN_URL, gen_line, jsonl

DAY = 24 * 3600.0
SIMULTANEOUS = 8


def job(owner: str = "a", key: str | None = "retry-1", created_at: float | None = None) -> JobRecord:
    return JobRecord(id=new_job_id(), owner=owner, endpoint="generations", model="m", request={"prompt": "x"},
                     status=JobStatus.QUEUED, created_at=time.time() if created_at is None else created_at,
                     idempotency_key=key)


def store_at(tmp_path) -> JobStore:
    engine = open_database(Settings(_env_file=None, cache_dir=tmp_path))
    migrate(engine)
    return JobStore(engine)


def test_simultaneous_inserts_with_one_key_store_one_job(tmp_path):
    store = store_at(tmp_path)
    records = [job() for _ in range(SIMULTANEOUS)]
    stored: list[str] = []
    start = threading.Barrier(SIMULTANEOUS)

    def insert(record: JobRecord) -> None:
        start.wait()
        stored.append(store.insert(record, [("image", b"\x00")], idempotent_since=time.time() - DAY).id)

    threads = [threading.Thread(target=insert, args=(record,)) for record in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stored) == SIMULTANEOUS and len(set(stored)) == 1
    assert stored[0] in {record.id for record in records}
    assert [row.id for row in store.list("a", status=None, after=None, limit=100)] == [stored[0]]
    # Other owners and jobs without a key are not affected.
    assert store.insert(other := job(owner="b"), [], idempotent_since=0.0).id == other.id
    assert store.insert(plain := job(key=None), [], idempotent_since=0.0).id == plain.id
    store.close()


def test_a_key_older_than_the_window_can_be_used_again(tmp_path):
    store = store_at(tmp_path)
    old = job(created_at=time.time() - 2 * DAY)
    assert store.insert(old, [], idempotent_since=0.0).id == old.id
    fresh = job()
    assert store.insert(fresh, [], idempotent_since=time.time() - DAY).id == fresh.id
    assert store.get(old.id).idempotency_key is None and store.get(fresh.id).idempotency_key == "retry-1"
    store.close()


def test_the_migration_keeps_repeated_keys_on_the_oldest_record_only(tmp_path):
    engine = open_database(Settings(_env_file=None, cache_dir=tmp_path))
    config = migration_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
    now = time.time()
    with engine.begin() as connection:
        for index, created in enumerate((now - 10, now - 5, now)):
            connection.execute(sa.text(
                "INSERT INTO jobs (id, owner, idempotency_key, request_id, endpoint, model, request, status, "
                "created_at, attempts, cancel_requested) VALUES (:id, 'a', 'k', '', 'generations', 'm', '{}', "
                "'queued', :created, 0, 0)"), {"id": f"job-{index}", "created": created})
    migrate(engine)
    with engine.connect() as connection:
        keys = dict(connection.execute(sa.select(jobs.c.id, jobs.c.idempotency_key)).all())
    assert keys == {"job-0": "k", "job-1": None, "job-2": None}
    engine.dispose()


async def _simultaneously(send) -> list[httpx.Response]:  # type: ignore[no-untyped-def]
    return await asyncio.gather(*(send() for _ in range(SIMULTANEOUS)))


def test_simultaneous_requests_with_one_key_give_one_job_one_file_and_one_batch(tmp_path):
    with ThreadedServer(fake_app(tmp_path, **FAST)) as server:
        base = f"{server.base_url}/v1"

        async def race() -> tuple[list[httpx.Response], ...]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                job_headers = {"Prefer": "respond-async", "Idempotency-Key": "job-1"}
                jobs_sent = await _simultaneously(lambda: client.post(
                    "/images/generations", json={"prompt": "x", "size": "32x32"}, headers=job_headers))
                files_sent = await _simultaneously(lambda: client.post(
                    "/files", data={"purpose": "batch"}, headers={"Idempotency-Key": "file-1"},
                    files={"file": ("in.jsonl", jsonl([gen_line(0)]), "application/octet-stream")}))
                file_id = files_sent[0].json()["id"]
                batches_sent = await _simultaneously(lambda: client.post(
                    "/batches", headers={"Idempotency-Key": "batch-1"},
                    json={"input_file_id": file_id, "endpoint": GEN_URL, "completion_window": "24h"}))
                return jobs_sent, files_sent, batches_sent

        jobs_sent, files_sent, batches_sent = asyncio.run(race())
        assert {response.status_code for response in jobs_sent} == {202}
        assert {response.status_code for response in files_sent + batches_sent} == {200}
        for sent in (jobs_sent, files_sent, batches_sent):
            assert len({response.json()["id"] for response in sent}) == 1, [response.json() for response in sent]
        with httpx.Client(base_url=base) as client:
            batch_id = batches_sent[0].json()["id"]
            deadline = time.monotonic() + 30
            while client.get(f"/batches/{batch_id}").json()["status"] != "completed":  # its output file listed
                assert time.monotonic() < deadline, "the batch did not complete"
                time.sleep(0.05)
            assert [item["id"] for item in client.get("/images/jobs").json()["data"]] == [jobs_sent[0].json()["id"]]
            uploads = client.get("/files", params={"purpose": "batch"}).json()["data"]
            assert [item["id"] for item in uploads] == [files_sent[0].json()["id"]]
            every_file = {item["id"] for item in client.get("/files").json()["data"]}
            assert [item["id"] for item in client.get("/batches").json()["data"]] == [batches_sent[0].json()["id"]]
            assert client.post("/images/generations", json={"prompt": "still", "size": "32x32"}).status_code == 200
    # The losing uploads' bytes were dropped: the store holds the listed files (the upload and
    # the batch's output) and nothing else.
    stored = {path.name for path in (tmp_path / "images" / "files").rglob("*") if path.is_file()}
    assert stored == every_file, stored
