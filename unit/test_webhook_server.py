"""The sidecar webhook's server side: `CachedLookup` (what it keeps, for how long, one request
for concurrent reviews), the HTTPS server under a burst, and its one log line per admission."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from loguru import logger

from csi.settings import Settings, SettingsError, load_settings
from csi.webhook import (
    CachedLookup,
    CertificateNames,
    ServingTls,
    TlsMaterial,
    generate_material,
    serve_webhook,
)
from unit.test_webhook import SETTINGS, fixture

pytestmark = pytest.mark.anyio

NAMES = CertificateNames.from_settings(SETTINGS)
BOUND_PV = "pvc-0b7e5c1a-4d2f-4b8e-9f61-3c2a1d0e9f11"


class ApiLookup:
    """The recorded objects as an API would answer: a fresh copy per call, each call counted;
    `gate` (when set) holds every answer until it is set; `error` fails every call."""

    def __init__(self) -> None:
        objects = fixture("objects.json")
        self.objects = {
            **{
                f"pvc {o['metadata']['namespace']}/{o['metadata']['name']}": o
                for o in objects["persistentvolumeclaims"]
            },
            **{f"pv {o['metadata']['name']}": o for o in objects["persistentvolumes"]},
            **{f"storageclass {o['metadata']['name']}": o for o in objects["storageclasses"]},
        }
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def _answer(self, what: str) -> dict[str, Any] | None:
        self.calls.append(what)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return copy.deepcopy(self.objects.get(what))

    async def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._answer(f"pvc {namespace}/{name}")

    async def get_pv(self, name: str) -> dict[str, Any] | None:
        return await self._answer(f"pv {name}")

    async def get_storage_class(self, name: str) -> dict[str, Any] | None:
        return await self._answer(f"storageclass {name}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- CachedLookup --------------------------------------------------------------------------------


async def test_kept_answers_are_reused_until_they_expire() -> None:
    api, clock = ApiLookup(), Clock()
    cached = CachedLookup(api, 5.0, clock=clock)
    pvc = await cached.get_pvc("shop", "orders")
    assert pvc is not None and pvc["spec"]["volumeName"] == BOUND_PV
    assert await cached.get_pv(BOUND_PV) is not None
    assert await cached.get_storage_class("fusecsi-sidecar") is not None
    clock.now += 4.9
    assert await cached.get_pvc("shop", "orders") == pvc
    await cached.get_pv(BOUND_PV)
    await cached.get_storage_class("fusecsi-sidecar")
    assert len(api.calls) == 3
    clock.now += 0.2  # 5.1 s after they were asked
    await cached.get_pvc("shop", "orders")
    await cached.get_pv(BOUND_PV)
    assert api.calls[3:] == ["pvc shop/orders", f"pv {BOUND_PV}"]
    assert cached.requests == 5


async def test_unbound_claims_and_missing_objects_are_always_asked_again() -> None:
    api = ApiLookup()
    cached = CachedLookup(api, 60.0, clock=Clock())
    for _ in range(2):
        pending = await cached.get_pvc("media", "uploads")
        assert pending is not None and not pending["spec"].get("volumeName")
        assert await cached.get_pvc("shop", "missing") is None
        assert await cached.get_pv("missing") is None
        assert await cached.get_storage_class("missing") is None
    assert api.calls == 2 * [
        "pvc media/uploads",
        "pvc shop/missing",
        "pv missing",
        "storageclass missing",
    ]


async def test_concurrent_reviews_share_one_request() -> None:
    api = ApiLookup()
    api.gate = asyncio.Event()
    cached = CachedLookup(api, 5.0)
    waiters = [asyncio.ensure_future(cached.get_pv(BOUND_PV)) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert api.calls == [f"pv {BOUND_PV}"]
    api.gate.set()
    answers = await asyncio.gather(*waiters)
    assert all(answer is answers[0] for answer in answers)
    assert answers[0] is not None and answers[0]["metadata"]["name"] == BOUND_PV
    assert api.calls == [f"pv {BOUND_PV}"]


async def test_a_failed_request_reaches_every_waiter_and_is_not_kept() -> None:
    api = ApiLookup()
    api.gate, api.error = asyncio.Event(), RuntimeError("apiserver unreachable")
    cached = CachedLookup(api, 5.0)
    waiters = [asyncio.ensure_future(cached.get_pv(BOUND_PV)) for _ in range(3)]
    await asyncio.sleep(0.01)
    api.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    api.error = None
    assert await cached.get_pv(BOUND_PV) is not None
    assert len(api.calls) == 2


async def test_a_review_that_gives_up_leaves_the_request_to_the_others() -> None:
    api = ApiLookup()
    api.gate = asyncio.Event()
    cached = CachedLookup(api, 5.0)
    impatient = asyncio.ensure_future(cached.get_pv(BOUND_PV))
    patient = asyncio.ensure_future(cached.get_pv(BOUND_PV))
    await asyncio.sleep(0.01)
    impatient.cancel()
    await asyncio.sleep(0.01)
    api.gate.set()
    answer = await patient
    assert impatient.cancelled()
    assert answer is not None
    assert await cached.get_pv(BOUND_PV) is answer  # kept
    assert api.calls == [f"pv {BOUND_PV}"]


async def test_expired_answers_are_dropped() -> None:
    api, clock = ApiLookup(), Clock()
    cached = CachedLookup(api, 5.0, clock=clock)
    await cached.get_pv(BOUND_PV)
    clock.now += 10
    await cached.get_storage_class("fusecsi-sidecar")
    assert list(cached.kept) == [("storageclass", "fusecsi-sidecar")]


def test_the_cache_is_a_setting(tmp_path: Path) -> None:
    assert Settings().webhook_lookup_cache == 5.0
    config = tmp_path / "config.toml"
    config.write_text("webhook_lookup_cache = 10\n")
    assert load_settings(config_file=config, environ={}).webhook_lookup_cache == 10.0
    environ = {"FUSECSI_WEBHOOK_LOOKUP_CACHE": "0"}
    assert load_settings(environ=environ).webhook_lookup_cache == 0.0
    flags = {"webhook_lookup_cache": "2.5"}
    assert load_settings(environ=environ, flags=flags).webhook_lookup_cache == 2.5
    with pytest.raises(SettingsError, match="webhook_lookup_cache"):
        load_settings(environ={"FUSECSI_WEBHOOK_LOOKUP_CACHE": "-1"})


# --- the server ----------------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []
    sink = logger.add(lambda message: lines.append(dict(message.record)), level="DEBUG")
    yield lines
    logger.remove(sink)


@contextlib.asynccontextmanager
async def serve(
    settings: Settings, lookup: ApiLookup, tmp_path: Path
) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    material: TlsMaterial = generate_material(NAMES, now=datetime.datetime.now(datetime.UTC))
    tls = ServingTls(tmp_path / "tls")
    tls.load(material)
    async with anyio.create_task_group() as tasks:
        host, port = await tasks.start(serve_webhook, settings, lookup, tls.context)
        yield f"https://{host}:{port}", ssl.create_default_context(cadata=material.ca_pem.decode())
        tasks.cancel_scope.cancel()


async def post_reviews(
    url: str, context: ssl.SSLContext, reviews: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:

        async def one(review: dict[str, Any]) -> dict[str, Any]:
            async with session.post(
                f"{url}/mutate", json=review, ssl=context, server_hostname=NAMES.dns_names[2]
            ) as answer:
                assert answer.status == 200
                assert answer.content_type == "application/json"
                body: dict[str, Any] = await answer.json()
                return body

        with anyio.fail_after(20):
            return list(await asyncio.gather(*(one(review) for review in reviews)))


def with_uid(review: dict[str, Any], n: int) -> dict[str, Any]:
    review = copy.deepcopy(review)
    review["request"]["uid"] = f"uid-{n}"
    return review


async def test_a_burst_of_reviews_asks_the_api_once_per_object(
    tmp_path: Path, log_lines: list[dict[str, Any]]
) -> None:
    api = ApiLookup()
    reviews = [with_uid(fixture("pod-bound-pvc.json"), n) for n in range(30)]
    async with serve(SETTINGS, api, tmp_path) as (url, context):
        answers = await post_reviews(url, context, reviews)
    assert [answer["response"]["uid"] for answer in answers] == [f"uid-{n}" for n in range(30)]
    assert {answer["response"]["patchType"] for answer in answers} == {"JSONPatch"}
    assert len({answer["response"]["patch"] for answer in answers}) == 1
    assert sorted(api.calls) == sorted(
        [
            "pvc shop/orders",
            "pvc shop/orders-cache",
            f"pv {BOUND_PV}",
            "pv pvc-1c8f6d2b-5e3a-4c9f-8a72-4d3b2e1f0a22",
        ]
    )
    admissions = [line for line in log_lines if line["message"].startswith("admission ")]
    assert len(admissions) == 30  # one line per admission
    assert {line["level"].name for line in admissions} == {"INFO"}
    assert {line["extra"]["outcome"] for line in admissions} == {"injected"}
    assert all(line["extra"]["pod"] == admissions[0]["extra"]["pod"] for line in admissions)


async def test_without_the_cache_every_review_asks(tmp_path: Path) -> None:
    api = ApiLookup()
    reviews = [with_uid(fixture("pod-bound-pvc.json"), n) for n in range(3)]
    async with serve(replace(SETTINGS, webhook_lookup_cache=0), api, tmp_path) as (url, context):
        await post_reviews(url, context, reviews)
    assert len(api.calls) == 3 * 4


async def test_warnings_and_denials_are_in_the_one_line(
    tmp_path: Path, log_lines: list[dict[str, Any]]
) -> None:
    denied, skipped = fixture("pod-bad-parameters.json"), fixture("pod-update.json")
    async with serve(SETTINGS, ApiLookup(), tmp_path) as (url, context):
        answers = await post_reviews(url, context, [denied, skipped])
    assert answers[0]["response"]["allowed"] is False
    assert answers[1]["response"]["allowed"] is True
    lines = [line for line in log_lines if line["message"].startswith("admission ")]
    assert len(lines) == 2
    by_outcome = {line["extra"]["outcome"]: line for line in lines}
    message = answers[0]["response"]["status"]["message"]
    assert message in by_outcome["denied"]["message"]
    assert by_outcome["skipped"]["level"].name == "WARNING"
    for warning in answers[1]["response"]["warnings"]:
        assert warning in by_outcome["skipped"]["message"]
