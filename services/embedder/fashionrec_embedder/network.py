"""The multi-task network of the paper, in plain torch (training and serving share it).

A backbone body up to global average pooling (backbones.py: 2048-d for ResNet50, 1280-d for
EfficientNet-Lite) feeds one single-label category head and one multi-label head per attribute
type. Every head is fastai's `create_head` on average pooling: BatchNorm1d(F) → Dropout →
Linear(F→512) → ReLU →
BatchNorm1d(512) → Dropout → Linear(512→classes). Its 512-d penultimate activations (the input of
the last Dropout/Linear) are what the paper uses as the garment's embedding.

Serving imports this module, so it must never import fastai.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fashionrec_embedder.backbones import get_backbone

HEAD_DIM = 512
EMBEDDING_KINDS: tuple[str, ...] = ("heads", "pooled")
HeadKind = Literal["single_label", "multi_label"]
HEAD_KINDS: tuple[str, ...] = ("single_label", "multi_label")


@dataclass(frozen=True)
class HeadSpec:
    """One output head: `category` (single_label) or an attribute type (multi_label)."""

    name: str
    kind: HeadKind
    classes: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "classes": list(self.classes)}


def resolve_head_weights(
    heads: Sequence[HeadSpec], weights: Mapping[str, float] | None
) -> tuple[float, ...] | None:
    """`{head name: weight}` (heads not named weigh 1) → one weight per head, in head order;
    None when every head weighs 1 (the paper's equal concatenation)."""
    if not weights:
        return None
    names = [h.name for h in heads]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"no head named {', '.join(unknown)}; the heads are {', '.join(names)}")
    bad = {k: v for k, v in weights.items() if not 0.0 <= float(v) <= 100.0}
    if bad:
        raise ValueError(f"head weights must be between 0 and 100, not {bad}")
    resolved = tuple(float(weights.get(name, 1.0)) for name in names)
    if not any(resolved):
        raise ValueError("at least one head weight must be above 0")
    return None if all(w == 1.0 for w in resolved) else resolved


def embedding_dim(kind: str, n_heads: int, feature_dim: int) -> int:
    if kind == "pooled":
        return feature_dim
    if kind == "heads":
        return HEAD_DIM * n_heads
    raise ValueError(f"unknown embedding kind {kind!r}; use one of {EMBEDDING_KINDS}")


class Head(nn.Module):
    def __init__(self, n_classes: int, feature_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        # The leading BatchNorm standardises each pooled feature: a body's features share large
        # offsets that would otherwise swamp what tells garments apart.
        self.features = nn.Sequential(
            nn.BatchNorm1d(feature_dim),
            nn.Dropout(dropout / 2),
            nn.Linear(feature_dim, HEAD_DIM),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(HEAD_DIM),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_DIM, n_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(pooled)))


class MultiTaskNet(nn.Module):
    """`body`: the `backbone`'s module mapping images to (N, feature_dim) pooled features."""

    def __init__(
        self,
        body: nn.Module,
        heads_spec: list[HeadSpec],
        backbone: str,
        dropout: float = 0.5,
        head_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not heads_spec:
            raise ValueError("MultiTaskNet needs at least one head")
        self.body = body
        self.heads_spec = list(heads_spec)
        # How much each head's block counts in the `heads` embedding (None: all equal).
        self.head_weights: tuple[float, ...] | None = (
            tuple(head_weights) if head_weights is not None else None
        )
        if self.head_weights is not None and len(self.head_weights) != len(self.heads_spec):
            raise ValueError(f"{len(self.head_weights)} head weights for {len(heads_spec)} heads")
        self.backbone = get_backbone(backbone).name
        feature_dim = get_backbone(backbone).feature_dim
        # A ModuleList (not a dict): head names are free text, state_dict keys stay heads.<i>.*
        self.heads = nn.ModuleList(
            Head(len(spec.classes), feature_dim, dropout) for spec in heads_spec
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = self.body(x)
        return tuple(head(pooled) for head in self.heads)

    def embed(self, x: torch.Tensor, kind: str = "heads") -> torch.Tensor:
        """L2-normalised float32 embeddings (call in eval mode)."""
        return self.embed_pooled(self.body(x).float(), kind)

    def embed_and_predict(
        self, x: torch.Tensor, kind: str = "heads"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, probabilities) from one pass of the body (call in eval mode).

        Probabilities are every head's outputs side by side, in head order: a softmax over the
        classes of a single-label head, a sigmoid per class of a multi-label one.
        """
        pooled = self.body(x).float()
        probs = []
        for spec, head in zip(self.heads_spec, self.heads, strict=True):
            logits = head(pooled)
            probs.append(logits.softmax(1) if spec.kind == "single_label" else logits.sigmoid())
        return self.embed_pooled(pooled, kind), torch.cat(probs, dim=1).float()

    def embed_pooled(self, pooled: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "pooled":
            return nn.functional.normalize(pooled, p=2.0, dim=1)
        if kind != "heads":
            raise ValueError(f"unknown embedding kind {kind!r}; use one of {EMBEDDING_KINDS}")
        # Each head's block is normalised first, so in the cosine every head weighs the same, or
        # its weight squared: a shop may rank what its garments are (category) above details.
        weights = self.head_weights or (1.0,) * len(self.heads)
        blocks = [
            weight * nn.functional.normalize(head.features(pooled).float(), p=2.0, dim=1)
            for weight, head in zip(weights, self.heads, strict=True)
        ]
        return nn.functional.normalize(torch.cat(blocks, dim=1), p=2.0, dim=1)


def body_and_heads(model: MultiTaskNet) -> list[list[nn.Parameter]]:
    """Parameter groups for discriminative learning rates: body first, heads last."""
    return [list(model.body.parameters()), list(model.heads.parameters())]
