"""Model changes in the embedder: previous models stay loaded, queries use the served version,
items are embedded with every loaded model (or the one a re-embed job asks for), and each
process announces its primary model to the indexer."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import redis
from fashionrec_embedder import worker
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.preprocess import decode_image
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.worker import (
    EmbedderResources,
    VersionNotLoaded,
    WorkerContext,
    announce_model,
    create_worker_app,
    embed_items,
    embed_query,
    load_previous,
)
from fashionrec_shared.storage import LocalBlobStore, content_key
from fashionrec_shared.tasks import EmbedQueryResult, ModelOnline, StoreEmbeddings, TaskName
from fashionrec_shared.vectors import decode_vector

from .conftest import encode, pattern_image, small_settings
from .test_colours import garment_on
from .test_main import settings_given_to_worker_app
from .test_worker import worker_process

PRIMARY = "resnet50-random-s7-px64"
PREVIOUS = "resnet50-random-s8-px64"


@pytest.fixture(scope="module")
def previous_model() -> Embedder:
    model = Embedder(small_settings(weights="random:8"))
    model.load()
    return model


@pytest.fixture
def context(
    tmp_path: Path, redis_url: str, random_model: Embedder, previous_model: Embedder
) -> WorkerContext:
    settings = small_settings(
        tmp_path,
        broker={"url": redis_url},
        storage={"backend": "local", "local_dir": tmp_path / "blobs"},
    )
    client = redis.Redis.from_url(redis_url)
    ctx = WorkerContext(
        settings=settings,
        store=LocalBlobStore(settings.storage.local_dir),
        redis=client,
        model=random_model,
        previous=[previous_model],
    )
    yield ctx
    client.close()


def put(ctx: WorkerContext, data: bytes, prefix: str = "inventory") -> dict:
    key, digest = content_key(prefix, data, "jpg")
    ctx.store.put(key, data)
    return {"key": key, "sha256": digest}


class Collector(list):
    def __call__(self, result: StoreEmbeddings) -> None:
        self.append(result)


def test_previous_weights_setting_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_PREVIOUS_WEIGHTS", " random:0 ,, imagenet ")
    assert EmbedderSettings().previous_weights == ["random:0", "imagenet"]
    monkeypatch.setenv("FASHIONREC_EMBEDDER_PREVIOUS_WEIGHTS", "")
    assert EmbedderSettings().previous_weights == []


def test_load_previous_skips_the_primary_and_unusable_weights(tmp_path: Path) -> None:
    settings = small_settings(
        tmp_path, previous_weights=["random:7", str(tmp_path / "missing.pt"), "random:8"]
    )
    loaded = load_previous(settings, PRIMARY)
    assert [m.model_version for m in loaded] == [PREVIOUS]
    assert loaded[0].loaded


def test_queries_use_the_served_version_when_loaded(context: WorkerContext) -> None:
    data = encode(pattern_image(100, 90), "JPEG", quality=90)
    ref = put(context, data, "uploads")
    image = decode_image(data, draft_size=64)
    by_version = {}
    for asked, expected in [(PREVIOUS, PREVIOUS), (PRIMARY, PRIMARY), (None, PRIMARY)]:
        payload = {"image": ref, "model_version": asked}
        result = EmbedQueryResult.model_validate(embed_query(context, payload))
        assert result.model_version == expected
        by_version[expected] = decode_vector(result.vector, 2048)
    # A version this process does not hold: its primary answers (the indexer then says 409).
    unknown = embed_query(context, {"image": ref, "model_version": "other"})
    assert unknown["model_version"] == PRIMARY
    np.testing.assert_allclose(
        by_version[PREVIOUS], context.previous[0].embed([image])[0], atol=1e-5
    )
    assert float(by_version[PREVIOUS] @ by_version[PRIMARY]) < 0.9999


def test_items_without_a_version_are_embedded_with_every_loaded_model(
    context: WorkerContext,
) -> None:
    good = put(context, encode(pattern_image(seed=1), "JPEG"))
    missing = {"key": "inventory/" + "0" * 64 + ".jpg", "sha256": "0" * 64}
    payload = {
        "job_id": "j",
        "items": [{"item_id": "a", "image": good}, {"item_id": "b", "image": missing}],
    }
    sent = Collector()
    summary = embed_items(context, payload, store_results=sent)
    assert summary["model_versions"] == [PRIMARY, PREVIOUS]
    assert [s.model_version for s in sent] == [PRIMARY, PREVIOUS]
    for stored in sent:
        assert stored.job_id == "j" and stored.dim == 2048
        assert [e.item_id for e in stored.embeddings] == ["a"]
        assert [f.item_id for f in stored.failures] == ["b"]  # reported under each version
    first, second = (decode_vector(s.embeddings[0].vector, 2048) for s in sent)
    assert float(first @ second) < 0.9999


def test_colours_are_computed_once_per_image_for_every_version(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: list[tuple[int, int]] = []

    def counting(image: object) -> list:
        computed.append(image.size)  # type: ignore[attr-defined]
        return real(image)

    real = worker.dominant_colours
    monkeypatch.setattr(worker, "dominant_colours", counting)
    fills = [(200, 30, 40), (25, 35, 90), (30, 110, 60)]
    items = [
        {"item_id": f"i{n}", "image": put(context, encode(garment_on(f), "JPEG", quality=90))}
        for n, f in enumerate(fills)
    ]
    sent = Collector()
    embed_items(context, {"items": items}, store_results=sent)
    assert len(computed) == len(items)  # not once per model version
    assert [s.model_version for s in sent] == [PRIMARY, PREVIOUS]
    for stored in sent:
        names = [e.colours[0].name for e in stored.embeddings if e.colours]
        assert names == ["red", "navy", "green"]
    assert [e.colours for e in sent[0].embeddings] == [e.colours for e in sent[1].embeddings]


def test_a_reembed_job_embeds_with_the_requested_model_only(context: WorkerContext) -> None:
    ref = put(context, encode(pattern_image(seed=2), "JPEG"))
    payload = {"job_id": "r", "model_version": PREVIOUS, "items": [{"item_id": "a", "image": ref}]}
    sent = Collector()
    embed_items(context, payload, store_results=sent)
    [stored] = sent
    assert stored.model_version == PREVIOUS and [e.item_id for e in stored.embeddings] == ["a"]


def test_a_version_not_loaded_is_handed_back_then_reported(context: WorkerContext) -> None:
    ref = put(context, encode(pattern_image(seed=3), "JPEG"))
    payload = {"job_id": "r", "model_version": "other", "items": [{"item_id": "a", "image": ref}]}
    sent = Collector()
    with pytest.raises(VersionNotLoaded):
        embed_items(context, payload, store_results=sent, final=False)
    assert sent == []
    embed_items(context, payload, store_results=sent, final=True)
    [stored] = sent
    assert stored.model_version == "other" and stored.embeddings == []
    assert "not loaded" in stored.failures[0].error


def test_heartbeat_lists_every_loaded_version(context: WorkerContext) -> None:
    info = context.describe()
    assert info["model_version"] == PRIMARY
    assert info["model_versions"] == [PRIMARY, PREVIOUS]


def test_announce_sends_model_online_for_the_primary(context: WorkerContext) -> None:
    calls = []
    app = create_worker_app(context.settings)
    assert announce_model(context, app, sender=lambda *call: calls.append(call))
    [(sent_with, task, payload)] = calls
    assert sent_with is app  # the worker's own app, not a throwaway one
    assert task == TaskName.MODEL_ONLINE
    assert payload.model_version == PRIMARY and payload.dim == 2048 and payload.hostname

    def broken(*_: object) -> None:
        raise ConnectionError("broker down")

    assert announce_model(context, app, sender=broken) is False  # logged, serving goes on


def test_process_start_loads_previous_models_and_announces(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new model (s8) is primary here, the served one (s7) is kept as previous.
    monkeypatch.setenv("FASHIONREC_EMBEDDER_WEIGHTS", "random:8")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_PREVIOUS_WEIGHTS", "random:7")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_DEVICE", "cpu")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_IMAGE_SIZE", "64")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASHIONREC_BROKER_URL", redis_url)
    monkeypatch.setenv("FASHIONREC_STORAGE_BACKEND", "local")
    monkeypatch.setenv("FASHIONREC_STORAGE_LOCAL_DIR", str(tmp_path / "blobs"))
    settings = EmbedderSettings()
    resources = EmbedderResources(settings)
    client = redis.Redis.from_url(redis_url)
    with worker_process(create_worker_app(settings, resources=resources)):
        context = resources.context
        assert context is not None
        assert list(context.models) == [PREVIOUS, PRIMARY]
        alive = json.loads(client.get(context.heartbeat.key))
        assert alive["model_versions"] == [PREVIOUS, PRIMARY]
        raw = client.rpop("index")
        assert raw is not None, "no MODEL_ONLINE on the index queue"
        message = json.loads(raw)
        assert message["headers"]["task"] == str(TaskName.MODEL_ONLINE)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert ModelOnline.model_validate(args[0]).model_version == PREVIOUS
    client.close()


def test_worker_command_takes_previous_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery
    from fashionrec_embedder.__main__ import cli
    from typer.testing import CliRunner

    for name in ("WEIGHTS", "PREVIOUS_WEIGHTS"):
        monkeypatch.setenv(f"FASHIONREC_EMBEDDER_{name}", "")
        monkeypatch.delenv(f"FASHIONREC_EMBEDDER_{name}")
    monkeypatch.setattr(Celery, "worker_main", lambda self, argv: None)
    given = settings_given_to_worker_app(monkeypatch)
    result = CliRunner().invoke(
        cli, ["worker", "--weights", "random:1", "--previous-weights", "random:0,random:2"]
    )
    assert result.exit_code == 0, result.output
    [settings] = given  # what the worker processes get by forking
    assert settings.previous_weights == ["random:0", "random:2"]
