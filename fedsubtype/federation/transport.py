"""Weights on the wire: one flat float32 array per message instead of one array per tensor.

Flower 1.42 moves every array of an ArrayRecord as its own object, each with its own HTTP(S) round trip
between SuperLink, SuperNode and ClientApp. The full model has 74 tensors (the per-task ablations up to
248), so a round paid hundreds of round trips for 1.1 MB of weights. Packed, a message carries one array
and the layout (the tensors' shapes, as JSON in the round config) to split it again. Averaging is
element-wise, so FedAvg, FedProx, FedAdam/FedYogi and the clipping wrappers work on the packed array
unchanged.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

LAYOUT_KEY = "weight-layout"
"""Round-config key holding the JSON list of tensor shapes; absent means unpacked (one array per tensor)."""


def layout_of(arrays: Sequence[np.ndarray]) -> str:
    """The JSON layout (list of shapes) that `unpack` needs to split `pack(arrays)`."""
    return json.dumps([list(a.shape) for a in arrays])


def pack(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """[one flat array] holding every tensor in order: float32, or float64 for a FedAdam/FedYogi global model."""
    dtypes = {str(a.dtype) for a in arrays}
    if len(dtypes) > 1 or not dtypes <= {"float32", "float64"}:
        got = ", ".join(sorted(dtypes))
        raise ValueError(f"only weights of one float dtype (float32 or float64) can be packed, got {got}")
    return [np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0, np.float32)]


def unpack(arrays: Sequence[np.ndarray], layout: str | None) -> list[np.ndarray]:
    """The tensors from `pack`'s output; without a layout the arrays are returned as they are."""
    if not layout:
        return list(arrays)
    shapes = [tuple(int(d) for d in s) for s in json.loads(layout)]
    sizes = [math.prod(s) for s in shapes]
    if len(arrays) != 1 or arrays[0].ndim != 1 or arrays[0].size != sum(sizes):
        got = ", ".join(str(tuple(a.shape)) for a in arrays)
        raise ValueError(f"expected one packed array of {sum(sizes)} values for {len(shapes)} tensors, got {got}")
    pieces = np.split(arrays[0], np.cumsum(sizes)[:-1]) if sizes else []
    return [p.reshape(s) for p, s in zip(pieces, shapes)]
