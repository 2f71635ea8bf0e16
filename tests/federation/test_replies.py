"""The server leaves out a reply it cannot aggregate instead of failing the round."""

import torch

from echocare_core.federation.coordinator import check_reply
from echocare_core.federation.transport import encode

EXPECTED = [{"a": torch.Size([2]), "b": torch.Size([1])}]
GLOBAL = {"a": torch.ones(2), "b": torch.ones(1)}
GOOD = {"a": torch.zeros(2), "b": torch.zeros(1)}


def _why(sent, metrics=None, transport="fp32", expected=EXPECTED):
    return check_reply(sent, GLOBAL, expected, metrics or {"num-examples": 3}, transport)[1]


def test_replies_are_screened_for_names_shapes_dtypes_values_and_samples():
    assert _why(GOOD) == ""
    assert "names or shapes" in _why({"a": torch.zeros(2)})
    assert "names or shapes" in _why({"a": torch.zeros(3), "b": torch.zeros(1)})
    assert _why({"a": torch.tensor([1.0, float("inf")]), "b": torch.zeros(1)}) == "non-finite values"
    assert _why(GOOD, {"num-examples": 0}) == "no training samples"
    assert "not in int16 (the bf16 transport)" in _why(GOOD, transport="bf16")
    nan = encode({"a": torch.tensor([0.0, float("nan")]), "b": torch.zeros(1)}, GLOBAL, "bf16")
    assert _why(nan, transport="bf16") == "non-finite values"  # NaN survives the 16-bit transport


def test_a_multi_task_reply_must_name_one_of_the_jobs_tasks_and_send_that_tasks_parameters():
    per_task = [{"a": torch.Size([2])}, EXPECTED[0]]  # task 1's sites also share "b" (their task's head)
    assert _why(GOOD, {"num-examples": 3, "task_index": 1.0}, expected=per_task) == ""
    assert "names or shapes" in _why(GOOD, {"num-examples": 3, "task_index": 0.0}, expected=per_task)
    assert _why({"a": torch.zeros(2)}, {"num-examples": 3, "task_index": 0.0}, expected=per_task) == ""
    for index in (None, 2.0, 0.5, -1.0):
        metrics = {"num-examples": 3, **({"task_index": index} if index is not None else {})}
        assert "names no task of the job" in _why(GOOD, metrics, expected=per_task)


def test_a_delta_comes_back_as_the_trained_weights():
    shared, why = check_reply(encode(GOOD, GLOBAL, "bf16"), GLOBAL, EXPECTED, {"num-examples": 3}, "bf16")
    assert why == "" and all(torch.equal(shared[k], GOOD[k]) for k in GOOD)
