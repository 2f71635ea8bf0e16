"""What crosses the network each round, kept small.

Up (site to server): the shared parameters as deltas against the round's global weights, in the job's
`transport` precision; bf16 travels as its raw 16 bits (int16: Flower's arrays and numpy have no bf16),
fp32 sends the weights themselves. The server adds the deltas back to its global weights in fp32.
bf16 (the default) keeps 8 significant bits at any magnitude; fp16 keeps 11 but loses deltas below
about 6e-5 to its subnormal range (1.4% off at 1e-6, most of the value at 3e-8) and turns those above
65504 into inf, which the server rejects: use it only where updates are known to sit in its range.

Down (server to site): the shared parameters every round; the frozen rest of the model (the pretrained
encoder of a LoRA or head-only job, buffers) only when the site does not hold it yet. Its digest
travels every round; the site keeps the frozen part under that digest and asks for it when missing.

Only numpy is imported here: the ClientApp process stays light. The torch functions take tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["FAILED", "NEED_FROZEN", "REFUSED", "WIRE_DTYPE", "decode", "digest", "encode", "text_hash"]

# error codes of a site's reply (Flower's own are 0-8)
REFUSED = 1001  # the site refused the job (the reason names job keys and declared labels)
FAILED = 1002  # the site accepted the job but the round failed there (details in the site's log)
NEED_FROZEN = 1003  # the site does not hold the frozen part of the model: send it along

WIRE_DTYPE = {"fp32": "float32", "bf16": "int16", "fp16": "float16"}  # the dtype each transport travels in


def text_hash(job_json: str) -> str:
    """A job's identity: the SHA-256 of its JSON as the coordinator sends it (`Job.to_json`, canonical), what a
    site pins in `approved_jobs` and both sides log."""
    return hashlib.sha256(job_json.encode()).hexdigest()


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: the same on both sides."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode(trained: Mapping[str, Any], reference: Mapping[str, Any], transport: str) -> dict[str, Any]:
    """What a site sends for its trained shared tensors (torch): weights (fp32) or deltas in 16 bits."""
    import torch

    if transport == "fp32":
        return {k: v.detach().float().contiguous() for k, v in trained.items()}
    dtype = torch.bfloat16 if transport == "bf16" else torch.float16
    out = {}
    for name, value in trained.items():
        delta = (value.detach().float() - reference[name].float()).to(dtype)
        out[name] = (delta.view(torch.int16) if transport == "bf16" else delta).contiguous()
    return out


def decode(sent: Mapping[str, Any], reference: Mapping[str, Any], transport: str) -> dict[str, Any]:
    """The site's trained tensors (fp32 torch) from what it sent, against the round's global `reference`.

    Raises:
        ValueError: a tensor does not travel in the transport's dtype.
    """
    import torch

    wrong = [k for k, v in sent.items() if str(v.dtype).removeprefix("torch.") != WIRE_DTYPE[transport]]
    if wrong:
        raise ValueError(
            f"{len(wrong)} tensor(s) not in {WIRE_DTYPE[transport]} (the {transport} transport), e.g. {wrong[0]}"
        )
    if transport == "fp32":
        return dict(sent)
    return {
        k: reference[k].float() + (v.view(torch.bfloat16) if transport == "bf16" else v).float()
        for k, v in sent.items()
    }
