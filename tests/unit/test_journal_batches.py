"""The request journal writes a batch's updates of one request as one entry, on a real Redis."""

import asyncio

import redis.asyncio as redis

from splitwise.cluster.journal import CLOSED_TTL_S, KEY_PREFIX, OPEN_KEY, RequestJournal


async def test_updates_made_while_a_write_is_out_are_merged_per_request_in_order(redis_url):
    client = redis.from_url(redis_url)
    try:
        journal = RequestJournal(client, "scheduler-0", ttl_s=60)
        # All made in one turn of the event loop: one batch.
        journal.opened("short", 5, 1)
        journal.assigned("short", "short", "split", "pw", "tw")
        journal.closed("short", "ok", 1)
        journal.opened("long", 5, 100)
        journal.closed("again", "ok", 3)  # an id closed, then used again: its new request is open
        journal.opened("again", 7, 9)
        await journal._writer
        short = await journal.entry("short")
        assert (short["state"], short["outcome"], short["prompt_worker"], short["tokens_emitted"]) == (
            "done", "ok", "pw", "1")
        assert 0 < await client.ttl(KEY_PREFIX + "short") <= CLOSED_TTL_S
        assert set(await client.zrange(OPEN_KEY, 0, -1)) == {b"long", b"again"}
        again = await journal.entry("again")
        assert (again["state"], again["prompt_tokens"]) == ("routing", "7")
        assert await client.ttl(KEY_PREFIX + "again") <= 61
        journal.closed("long", "ok", 100)
        await journal._writer
        assert set(await client.zrange(OPEN_KEY, 0, -1)) == {b"again"}
        assert (await journal.entry("long"))["tokens_emitted"] == "100"
    finally:
        await client.aclose()


async def test_a_short_requests_updates_within_the_flush_window_are_one_write_of_one_round_trip(redis_url):
    client = redis.from_url(redis_url)
    pipelines = []
    real_pipeline = client.pipeline
    client.pipeline = lambda **kwargs: pipelines.append(kwargs) or real_pipeline(**kwargs)
    try:
        journal = RequestJournal(client, "scheduler-0", ttl_s=60, flush_s=0.2)
        journal.opened("brief", 5, 1)
        await asyncio.sleep(0.02)  # other turns of the event loop: the request runs meanwhile
        journal.assigned("brief", "brief", "split", "pw", "tw")
        await asyncio.sleep(0.02)
        journal.closed("brief", "length", 1)
        await journal._writer
        assert len(pipelines) == 1
        assert (await journal.entry("brief"))["state"] == "done"
        assert b"brief" not in await client.zrange(OPEN_KEY, 0, -1)
    finally:
        await client.aclose()
