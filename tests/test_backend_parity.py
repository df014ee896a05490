"""The two backends agree with each other through the whole Session path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_LAYER, requires_mlx, requires_torch

from neuroscope import Session

pytestmark = [requires_torch, requires_mlx]


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_sae):
    out = {}
    for backend in ("torch", "mlx"):
        with Session(
            model=str(tiny_model),
            sae_local_path=str(tiny_sae["npz"]),
            layer=[1, TINY_LAYER],
            backend=backend,
            top_k=6,
            dtype="float32",
        ) as s:
            out[backend] = s.generate(
                "What is the capital of France? Tell me about Paris.",
                max_tokens=16,
                temperature=0.0,
            ).run()
    return out


def test_greedy_replies_are_identical(runs):
    assert runs["torch"].text == runs["mlx"].text
    assert runs["torch"].completion_tokens == runs["mlx"].completion_tokens == 16


def test_records_agree_position_by_position(runs):
    torch_records, mlx_records = runs["torch"].records, runs["mlx"].records
    assert len(torch_records) == len(mlx_records)
    worst = 0.0
    for a, b in zip(torch_records, mlx_records, strict=True):
        assert (a.position, a.layer, a.token_id, a.phase, a.token) == (
            b.position,
            b.layer,
            b.token_id,
            b.phase,
            b.token,
        )
        acts_a = np.array([f.activation for f in a.top_features])
        acts_b = np.array([f.activation for f in b.top_features])
        worst = max(worst, float(np.abs(acts_a - acts_b).max()))
        assert [f.index for f in a.top_features] == [f.index for f in b.top_features]
    print(f"\nmax |activation torch - mlx| over {len(torch_records)} records: {worst:.2e}")
    assert worst < 1e-3
