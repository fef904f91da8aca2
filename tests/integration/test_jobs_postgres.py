"""Several replicas on one PostgreSQL: claims never overlap, a dead replica's jobs run again
after its lease, and two real servers share the jobs, running each once."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from diffuser_api.config import Settings
from diffuser_api.jobs.database import database_url, migrate, open_database
from diffuser_api.jobs.records import JobRecord, JobStatus, new_job_id
from diffuser_api.jobs.store import JobStore
from tests import postgres
from tests.conftest import LiveServer, free_port
from tests.integration.test_jobs_server import finished_lines, job_of, summary, wait_all
from tests.unit.test_jobs_migration import migrate_at_once, migrated_tables

pytestmark = [pytest.mark.slow, pytest.mark.skipif(postgres.available() is not None,
                                                   reason=str(postgres.available()))]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres.postgres_server(free_port()) as url:
        yield url


def test_replicas_starting_together_on_one_new_database_all_start(postgres_url):
    admin = sa.create_engine(database_url(Settings(_env_file=None, jobs_url=postgres_url)),
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text("CREATE DATABASE fresh_replicas"))
    admin.dispose()
    fresh = postgres_url.rsplit("/", 1)[0] + "/fresh_replicas"
    for finished in migrate_at_once(fresh, replicas=4):
        assert finished.returncode == 0, finished.stdout
    assert {"jobs", "alembic_version"} <= migrated_tables(database_url(Settings(_env_file=None, jobs_url=fresh)))


def queued(model: str = "m") -> JobRecord:
    return JobRecord(id=new_job_id(), owner="", endpoint="generations", model=model, request={"prompt": "x"},
                     status=JobStatus.QUEUED, created_at=time.time())


def test_concurrent_claims_never_take_the_same_job_and_lapsed_leases_come_back(postgres_url):
    engine = open_database(Settings(_env_file=None, jobs_url=postgres_url))
    migrate(engine)
    store = JobStore(engine)
    ids = set()
    for _ in range(60):
        record = queued("claims")
        store.insert(record, [("image", b"\x00\x01")], idempotent_since=0.0)
        ids.add(record.id)
    taken: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    sizes: list[int] = []

    def claim(replica: str) -> None:
        while claimed := store.claim("claims", 3, replica, time.time(), 30):
            sizes.append(len(claimed))
            taken[replica] += [record.id for record in claimed]

    threads = [threading.Thread(target=claim, args=(replica,)) for replica in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for claimed in taken.values() for job_id in claimed]
    assert len(everything) == len(set(everything)) == 60 and set(everything) == ids
    assert max(sizes) <= 3  # one UPDATE ... WHERE id IN (SELECT ... LIMIT 3 FOR UPDATE SKIP LOCKED)
    # Replica "a" dies: once its leases lapse its jobs are queued again, and only those.
    store.renew(taken["b"] + taken["c"], "b", time.time() + 600)
    store.renew(taken["c"], "c", time.time() + 600)
    requeued, failed = store.reclaim_lapsed(time.time() + 60, max_attempts=3, ttl_s=60)
    assert set(requeued) == set(taken["a"]) and failed == []
    assert {record.id for record in store.claim("claims", 100, "d", time.time(), 30)} == set(taken["a"])
    engine.dispose()


def test_simultaneous_submissions_with_one_idempotency_key_store_one_job(postgres_url):
    engine = open_database(Settings(_env_file=None, jobs_url=postgres_url))
    migrate(engine)
    store = JobStore(engine)
    records = [dataclasses.replace(queued("idempotent"), owner="racer", idempotency_key="k") for _ in range(8)]
    stored: list[str] = []
    start = threading.Barrier(len(records))

    def insert(record: JobRecord) -> None:
        start.wait()
        stored.append(store.insert(record, [], idempotent_since=time.time() - 3600).id)

    threads = [threading.Thread(target=insert, args=(record,)) for record in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stored) == len(records) and len(set(stored)) == 1
    assert [job.id for job in store.list("racer", status=None, after=None, limit=100)] == stored[:1]
    engine.dispose()


def test_two_servers_on_one_database_run_each_job_once(tmp_path, postgres_url):
    env = {"DIFFUSER_JOBS_URL": postgres_url, "DIFFUSER_JOB_POLL_S": "0.2", "DIFFUSER_MAX_BATCH_SIZE": "1",
           "DIFFUSER_STORAGE_DIR": str(tmp_path / "images")}
    servers = [LiveServer(tmp_path, **env), LiveServer(tmp_path, **env)]
    try:
        for server in servers:
            server.wait_ready()
        ids = []
        for index in range(6):
            response = httpx.post(f"{servers[index % 2].base_url}/v1/images/generations", timeout=60,
                                  headers={"Prefer": "respond-async"},
                                  json={"prompt": f"shared {index}", "size": "64x64", "num_inference_steps": 4})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        jobs = wait_all(servers[0], ids)
        assert all(job["status"] == "completed" for job in jobs.values()), summary(jobs)
        # Any replica answers for any job, images included.
        assert job_of(servers[1], ids[0])["result"]["data"][0]["b64_json"]
    finally:
        for server in servers:
            server.stop()
    for job_id in ids:
        assert finished_lines([server.log for server in servers], job_id) == 1
    ran_on = {server.port: sum(finished_lines([server.log], job_id) for job_id in ids) for server in servers}
    assert sum(ran_on.values()) == 6
