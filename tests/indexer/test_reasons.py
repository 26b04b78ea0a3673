"""Reasons: what a hit shares with its query (category, attribute labels, colours, score), on
/search (the photo's predictions sent by the gateway), /similar (the stored item's) and
/recommend (the nearest liked example's), and none with explain=false."""

from __future__ import annotations

from fashionrec_indexer.reasons import QuerySide, reasons_for
from fashionrec_shared.tasks import Predicted
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.indexer.conftest import MODEL, add_item, colours, predicted
from tests.indexer.test_api import client, query, settings  # noqa: F401 (fixtures)
from tests.indexer.test_recommend import unit


def labels(category: str | None, **attributes: list[str]) -> Predicted:
    return Predicted.model_validate(
        {
            "category": None if category is None else {"label": category, "confidence": 0.9},
            "attributes": {
                kind: [{"label": label, "confidence": 0.6} for label in values]
                for kind, values in attributes.items()
            },
        }
    )


def test_reasons_are_what_both_sides_have() -> None:
    hit = QuerySide(
        labels("dress", texture=["floral", "plain"], sleeve=["long"], neckline=["v"]),
        colours("navy", "white", "red"),
    )
    query = QuerySide(
        labels("dress", texture=["plain", "floral"], sleeve=["short"], fabric=["denim"]),
        colours("red", "navy"),
    )
    reasons = reasons_for(0.8, hit, query, like=2)
    assert reasons.score == 0.8 and reasons.like == 2 and reasons.category == "dress"
    # In the hit's order; types without a shared label are left out.
    assert reasons.attributes == {"texture": ["floral", "plain"]}
    assert reasons.colours == ["navy", "red"]

    other = reasons_for(0.5, hit, QuerySide(labels("shirt"), None))
    assert other.category is None and other.attributes == {} and other.colours == []
    # A model without heads, or an embedder older than colours: nothing to share.
    bare = reasons_for(0.4, QuerySide(), query)
    assert (bare.category, bare.attributes, bare.colours, bare.like) == (None, {}, [], None)


def test_search_similar_and_recommend_explain(client: TestClient, engine: Engine) -> None:  # noqa: F811
    dress = predicted("dress", texture="floral")
    shirt = predicted("shirt", texture="floral")
    a = add_item(engine, "A", unit(1, 0), predicted=dress, colours=colours("navy", "white"))
    b = add_item(engine, "B", unit(1, 0.2), predicted=dress, colours=colours("white"))
    add_item(engine, "C", unit(0, 1), predicted=shirt, colours=colours("red"))

    body = {
        **query(unit(1, 0.1), k=3),
        "predicted": dress.model_dump(mode="json"),
        "colours": [c.model_dump() for c in colours("navy")],
    }
    found = client.post("/search", json=body).json()["results"]
    reasons = {hit["sku"]: hit["reasons"] for hit in found}
    assert reasons["A"] == {
        "score": next(hit["score"] for hit in found if hit["sku"] == "A"),
        "like": None,
        "category": "dress",
        "attributes": {"texture": ["floral"]},
        "colours": ["navy"],
    }
    assert reasons["B"]["category"] == "dress" and reasons["B"]["colours"] == []
    assert reasons["C"]["category"] is None and reasons["C"]["attributes"] == {
        "texture": ["floral"]
    }
    # A query without predictions or colours (an old gateway): only the score.
    bare = client.post("/search", json=query(unit(1, 0.1), k=1)).json()["results"][0]
    assert bare["reasons"] == {
        "score": bare["score"],
        "like": None,
        "category": None,
        "attributes": {},
        "colours": [],
    }

    similar = client.get(f"/items/{a}/similar", params={"k": 2}).json()["results"]
    assert [hit["sku"] for hit in similar] == ["B", "C"]
    assert similar[0]["reasons"]["category"] == "dress"
    assert similar[0]["reasons"]["colours"] == ["white"]  # A has navy and white, B white

    liked = {
        "model_version": MODEL,
        "liked": [
            {
                "vector": encode_vector(unit(0, 1, 0.1)),
                "predicted": shirt.model_dump(mode="json"),
                "colours": [c.model_dump() for c in colours("red")],
            }
        ],
        "liked_items": [str(b)],
        "k": 2,
    }
    for strategy in ("average", "best_score"):
        answer = client.post("/recommend", json={**liked, "strategy": strategy}).json()
        reasons = {hit["sku"]: hit["reasons"] for hit in answer["results"]}
        assert set(reasons) == {"A", "C"}  # B is an example
        assert reasons["C"]["like"] == 0 and reasons["C"]["category"] == "shirt"
        assert reasons["C"]["colours"] == ["red"]
        assert reasons["A"]["like"] == 1 and reasons["A"]["category"] == "dress"
        assert reasons["A"]["colours"] == ["white"]

    # explain=false: no reasons anywhere, the same results.
    off = client.post("/search", json={**body, "explain": False}).json()["results"]
    assert [h["sku"] for h in off] == [h["sku"] for h in found]
    assert all(h["reasons"] is None for h in off)
    similar_off = client.get(f"/items/{a}/similar", params={"explain": "false"}).json()
    assert all(h["reasons"] is None for h in similar_off["results"])
    recommend_off = client.post("/recommend", json={**liked, "explain": False}).json()
    assert recommend_off["results"] and all(h["reasons"] is None for h in recommend_off["results"])
    assert (
        "score;dur="
        not in client.post("/recommend", json={**liked, "explain": False}).headers["server-timing"]
    )
