"""``/-/metrics``: after a scripted mix of hits, misses, stale serves and upstream errors, the
counters say exactly that."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Dists, ProxyFactory
from tests.fakes.pypi import FakePyPI


async def scrape(
    http: aiohttp.ClientSession, url: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(f"{url}/-/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_counters_match_a_scripted_run(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, upstream_metadata_ttl="300ms", upstream_retries=0)
    page = f"{proxy.url}/default/pypi/public/simple/alpha/"
    wheel = dists.alpha.name
    file = f"{proxy.url}/default/pypi/public/files/alpha/{wheel}"
    size = len(await asyncio.to_thread(dists.alpha.read_bytes))

    async def status_of(url: str) -> tuple[int, str]:
        async with http.get(url) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Cache", "")

    assert await status_of(page) == (200, "MISS")
    assert await status_of(page) == (200, "HIT")
    assert await status_of(file) == (200, "MISS")
    assert await status_of(file) == (200, "HIT")
    assert await status_of(file) == (200, "HIT")
    await pypi.stop_listening()
    await asyncio.sleep(0.4)
    assert await status_of(page) == (200, "STALE")
    assert (await status_of(f"{proxy.url}/default/pypi/public/simple/beta/"))[0] == 502
    await pypi.resume_listening()

    m = await scrape(http, proxy.url)

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("artifact_proxy_cache_results_total", format="pypi", result="MISS") == 2
    assert value("artifact_proxy_cache_results_total", format="pypi", result="HIT") == 3
    assert value("artifact_proxy_cache_results_total", format="pypi", result="STALE") == 1
    assert value("artifact_proxy_requests_total", format="pypi", repository="public", status="200") == 6
    assert value("artifact_proxy_requests_total", format="pypi", repository="public", status="502") == 1
    assert value("artifact_proxy_bytes_sent_total", source="cache") >= 2 * size
    assert value("artifact_proxy_bytes_sent_total", source="upstream") >= size
    assert value("artifact_proxy_upstream_requests_total", upstream="fake", outcome="2xx") == 2  # page, file
    assert (
        value("artifact_proxy_upstream_requests_total", upstream="fake", outcome="error") == 2
    )  # stale, beta
    assert value("artifact_proxy_upstream_latency_seconds_count", upstream="fake") == 2
    assert value("artifact_proxy_circuit_open", upstream="fake") == 0
    assert value("artifact_proxy_flights", kind="started") == 1
    assert value("artifact_proxy_blobs") >= 1 and value("artifact_proxy_blob_bytes") >= size
    assert value("artifact_proxy_index_bytes") > 0
