"""Silver-pair scoring as Ray Data batch inference (an actor pool of teachers) equals the in-process path."""

from __future__ import annotations

import numpy as np
import pytest

from codiemb.data.augment import score_pairs

pytestmark = pytest.mark.integration


def test_ray_scoring_equals_local(ray_local, tiny_model_dir):
    s1 = [f"the {w} runs in the house" for w in ("cat", "dog", "man", "woman", "child")] * 3
    s2 = [f"a {w} sleeps under a tree" for w in ("dog", "cat", "car", "sun", "moon")] * 3
    local = score_pairs(str(tiny_model_dir), s1, s2, use_ray=False)
    # chunk 4: several blocks over two actors, results come back out of order and are put in place by index
    on_ray = score_pairs(str(tiny_model_dir), s1, s2, use_ray=True, concurrency=2, chunk=4)
    assert local.shape == on_ray.shape == (15,)
    np.testing.assert_allclose(on_ray, local, atol=1e-5)
