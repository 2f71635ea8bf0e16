"""Compact transport: deltas in bf16 / fp16 against the round's global weights, aggregated in fp32."""

import numpy as np
import pytest
import torch

from echocare_core.federation.job import weighted_mean
from echocare_core.federation.transport import decode, digest, encode


def _round(seed=0, sites=3):
    g = torch.Generator().manual_seed(seed)
    reference = {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(32, generator=g)}
    trained = [{k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in reference.items()} for _ in range(sites)]
    return reference, trained


@pytest.mark.parametrize(
    "transport, bytes_per_value, tolerance", [("fp32", 4, 0.0), ("bf16", 2, 1e-4), ("fp16", 2, 1e-5)]
)
def test_the_round_trip_keeps_the_aggregate_within_tolerance_of_fp32(transport, bytes_per_value, tolerance):
    reference, trained = _round()
    exact = weighted_mean([(t, n) for t, n in zip(trained, (5, 7, 11))])
    sent = [encode(t, reference, transport) for t in trained]
    assert all(v.element_size() == bytes_per_value for s in sent for v in s.values())
    received = [decode(s, reference, transport) for s in sent]
    assert all(v.dtype == torch.float32 for r in received for v in r.values())
    approx = weighted_mean([(r, n) for r, n in zip(received, (5, 7, 11))])
    for name in exact:  # a delta of size 1e-2 keeps 8 (bf16) or 11 (fp16) significant bits
        assert (approx[name] - exact[name]).abs().max().item() <= tolerance
    if transport != "fp32":  # sending the weights themselves in 16 bits would be far worse than the deltas
        rounded = weighted_mean(
            [({k: v.to(torch.bfloat16).float() for k, v in t.items()}, n) for t, n in zip(trained, (5, 7, 11))]
        )
        assert max((rounded[k] - exact[k]).abs().max().item() for k in exact) > 10 * tolerance


def test_a_tensor_in_another_dtype_is_refused():
    reference, (trained, *_) = _round()
    sent = encode(trained, reference, "bf16")
    with pytest.raises(ValueError, match="not in int16"):
        decode({**sent, "b.bias": trained["b.bias"]}, reference, "bf16")
    with pytest.raises(ValueError, match="not in float32"):
        decode(sent, reference, "fp32")


def test_the_digest_names_contents_and_layout():
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.zeros(2, dtype=np.int64)}
    assert digest(arrays) == digest(dict(reversed(arrays.items())))
    assert digest(arrays) == digest({k: torch.from_numpy(v).numpy() for k, v in arrays.items()})
    for changed in (
        {**arrays, "x": arrays["x"].reshape(3, 2)},
        {**arrays, "y": np.ones(2, dtype=np.int64)},
        {"z": arrays["x"], "y": arrays["y"]},
        {**arrays, "y": np.zeros(2, dtype=np.int32)},
    ):
        assert digest(changed) != digest(arrays)


def test_bf16_keeps_small_deltas_that_fp16_flushes():
    reference = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(1))}
    for size in (1e-6, 1e-7):
        trained = {"w": reference["w"] + size * torch.linspace(1, 2, 1000)}
        delta = trained["w"] - reference["w"]
        error = {
            t: ((decode(encode(trained, reference, t), reference, t)["w"] - reference["w"]) - delta).abs().max()
            / delta.abs().max()
            for t in ("bf16", "fp16")
        }
        assert error["bf16"] < 1e-2 < error["fp16"]  # fp16 subnormals: documented, bf16 is the default
