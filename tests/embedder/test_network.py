from __future__ import annotations

import pytest
import torch
from fashionrec_embedder.network import (
    HEAD_DIM,
    HeadSpec,
    MultiTaskNet,
    body_and_heads,
    embedding_dim,
)
from fashionrec_embedder.weights import random_backbone

HEADS = [
    HeadSpec("category", "single_label", ("a", "b", "c")),
    HeadSpec("texture", "multi_label", ("x", "y")),
    HeadSpec("part", "multi_label", ("p", "q", "r", "s")),
]


@pytest.fixture(scope="module")
def net() -> MultiTaskNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MultiTaskNet(random_backbone(3, "resnet50"), HEADS, "resnet50").eval()


def test_forward_gives_one_logit_tensor_per_head(net: MultiTaskNet) -> None:
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in out] == [(2, 3), (2, 2), (2, 4)]


def test_embeddings_are_normalised_and_every_head_weighs_the_same(net: MultiTaskNet) -> None:
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pooled, heads = net.embed(x, "pooled"), net.embed(x, "heads")
    assert pooled.shape == (3, 2048) and heads.shape == (3, HEAD_DIM * 3)
    assert pooled.dtype == heads.dtype == torch.float32
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(heads.norm(dim=1), torch.ones(3))
    blocks = heads.reshape(3, 3, HEAD_DIM).norm(dim=2)
    torch.testing.assert_close(blocks, torch.full((3, 3), 3**-0.5))
    with pytest.raises(ValueError, match="unknown embedding kind"):
        net.embed(x, "other")


def test_parameter_groups_split_body_and_heads(net: MultiTaskNet) -> None:
    body, heads = body_and_heads(net)
    assert len(body) + len(heads) == len(list(net.parameters()))
    assert {id(p) for p in heads} == {id(p) for p in net.heads.parameters()}
    assert embedding_dim("heads", 5, 2048) == 2560 and embedding_dim("pooled", 5, 2048) == 2048
