"""One request's decode state and the batch's token selection (`service.rows`): when a row finishes, which token each
row gets, how an unusable logits row fails only its own request, and what the padded batch values share."""

from __future__ import annotations

import pytest
import torch

from service.errors import NonFiniteLogitsError
from service.requests import FinishReason, GenerationRequest, SamplingParams
from service.rows import PaddedRows, Row, padded_to, select_tokens
from service.sampler import RowSampler

CPU = torch.device("cpu")
EOS = frozenset({2})


def row(prompt: list[int] | None = None, **params: object) -> Row:
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    return Row(request=GenerationRequest(prompt or [5, 6], None, sampling), sampler=RowSampler(sampling, CPU))


def test_a_row_finishes_on_eos_or_at_its_length() -> None:
    by_eos = row(max_new_tokens=5)
    by_eos.accept(7, EOS)
    assert not by_eos.finished
    by_eos.accept(2, EOS)
    assert by_eos.finish_reason is FinishReason.EOS_TOKEN and by_eos.generated == [7, 2]

    by_length = row(max_new_tokens=2, ignore_eos=True)
    by_length.accept(2, EOS)
    assert not by_length.finished, "ignore_eos: the EOS token is just a token"
    by_length.accept(2, EOS)
    assert by_length.finish_reason is FinishReason.LENGTH
    assert by_length.result("text").token_ids == [2, 2] and by_length.result("text").prompt_tokens == 2


def test_history_is_the_prompt_and_output_or_for_a_decoder_its_own_ids() -> None:
    decoder_only = row([5, 6])
    decoder_only.accept(9, EOS)
    assert decoder_only.history(CPU).tolist() == [[5, 6, 9]]
    encoder_decoder = row([5, 6])
    encoder_decoder.decoder_start_token_id = 0
    encoder_decoder.accept(9, EOS)
    assert encoder_decoder.history(CPU).tolist() == [[0, 9]], "the prompt went to the encoder"


def test_greedy_rows_take_the_argmax() -> None:
    rows = [row(), row()]
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 4.0]])
    assert select_tokens(rows, logits, CPU) == [1, 0]
    assert not any(r.finished for r in rows)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all-equal"])
def test_an_unusable_logits_row_fails_only_its_own_request(bad: float | str) -> None:
    rows = [row(), row(), row(do_sample=True, seed=0)]
    logits = torch.tensor([[0.0, 3.0, 1.0], [1.0, 2.0, 0.0], [0.0, 0.0, 9.0]])
    if bad == "all-equal":
        logits[1] = 0.25  # an overflowed norm zeroes the state: every logit equal
    else:
        logits[1, 2] = bad
    tokens = select_tokens(rows, logits, CPU)
    assert tokens[0] == 1 and tokens[2] == 2
    assert isinstance(rows[1].error, NonFiniteLogitsError) and rows[1].finished
    assert tokens[1] == 0, "a valid id for the step's tensors; the row leaves before the next forward"
    assert rows[0].error is None and rows[2].error is None
    with pytest.raises(NonFiniteLogitsError):
        rows[1].result()


def test_a_row_already_finished_keeps_its_result_whatever_its_leftover_logits() -> None:
    done = row(max_new_tokens=1)
    done.accept(7, EOS)
    select_tokens([done], torch.full((1, 3), float("nan")), CPU)
    assert done.error is None and done.result().token_ids == [7]


def test_padding_goes_on_the_side_asked_along_the_dimension_asked() -> None:
    t = torch.ones((2, 3, 4))
    left = padded_to(t, 6, 2, left=True)  # dimension -2 (3 -> 6)
    assert left.shape == (2, 6, 4) and left[:, :3].abs().sum() == 0 and (left[:, 3:] == 1).all()
    right = padded_to(t, 6, 1, left=False)  # dimension -1 (4 -> 6)
    assert right.shape == (2, 3, 6) and (right[..., :4] == 1).all() and right[..., 4:].abs().sum() == 0
    assert padded_to(t, 4, 1, left=True) is t


class _ListRows(PaddedRows):
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.kept: list[list[int]] = []

    def filter(self, keep: list[int]) -> None:
        self.kept.append(keep)
        self.rows = [self.rows[i] for i in keep]


def test_finished_rows_leave_through_the_batch_values_own_filter() -> None:
    rows = [row(max_new_tokens=1), row(max_new_tokens=5), row(max_new_tokens=1)]
    rows[0].accept(7, EOS)
    rows[2].accept(8, EOS)
    batch = _ListRows(rows)
    assert batch.pop_finished() == [rows[0], rows[2]]
    assert batch.kept == [[1]] and batch.rows == [rows[1]]
    assert batch.pop_finished() == [] and batch.kept == [[1]], "nothing finished: no filter call"


def test_a_padded_batch_value_must_say_how_its_rows_leave() -> None:
    class Forgetful(PaddedRows):
        pass

    with pytest.raises(TypeError, match="filter"):
        Forgetful()  # type: ignore[abstract]
