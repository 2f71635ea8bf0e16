"""The server leaves out a reply it cannot aggregate instead of failing the round."""

import torch

from echocare_server.server_app import _invalid

EXPECTED = {"a": torch.Size([2]), "b": torch.Size([1])}
GOOD = {"a": torch.zeros(2), "b": torch.zeros(1)}


def test_replies_are_screened_for_names_shapes_values_and_samples():
    assert _invalid(GOOD, EXPECTED, {"num-examples": 3}) == ""
    assert "names or shapes" in _invalid({"a": torch.zeros(2)}, EXPECTED, {"num-examples": 3})
    assert "names or shapes" in _invalid({"a": torch.zeros(3), "b": torch.zeros(1)}, EXPECTED, {"num-examples": 3})
    assert _invalid({"a": torch.tensor([1.0, float("inf")]), "b": torch.zeros(1)}, EXPECTED,
                    {"num-examples": 3}) == "non-finite values"
    assert _invalid(GOOD, EXPECTED, {"num-examples": 0}) == "no training samples"
