"""``SamplingParams.clone``: an equal copy that shares no mutable container with the original."""

from __future__ import annotations

import dataclasses

from pagedllm import SamplingParams
from pagedllm.core.sampling_params import RequestOutputKind


def test_clone_is_equal_and_shares_no_mutable_field() -> None:
    params = SamplingParams(n=2, temperature=0.7, top_k=5, seed=3, stop=["\n\n", "END"], stop_token_ids=[7],
                            logprobs=2, output_kind=RequestOutputKind.FINAL_ONLY, logit_bias={4: 1.5},
                            allowed_token_ids=[4, 5], bad_words=["no"])
    params.all_stop_token_ids.update({1, 2})
    params.bad_words_token_ids = [[3, 4]]
    copy = params.clone()
    assert copy == params and copy is not params
    for field in dataclasses.fields(SamplingParams):
        value = getattr(params, field.name)
        if isinstance(value, (list, set, dict)):  # a field added later with a container must be copied too
            assert getattr(copy, field.name) is not value, f"clone shares SamplingParams.{field.name}"
    copy.stop.append("x")
    copy.stop_token_ids.append(9)
    copy.all_stop_token_ids.add(3)
    assert params.stop == ["\n\n", "END"] and params.stop_token_ids == [7] and params.all_stop_token_ids == {1, 2}
