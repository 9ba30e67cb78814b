"""Tokenising fine-tune records: loss on completion / assistant tokens only."""

import pytest

from workers.trainer import sft_data
from workers.trainer.sft_data import IGNORE


def test_prompt_completion_labels_cover_completion_and_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ex = sft_data.encode_record({"prompt": "apple ->", "completion": " red"}, tok)
    prompt = tok("apple ->")["input_ids"]
    completion = tok(" red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(ex.input_ids) == prompt + completion
    assert list(ex.labels) == [IGNORE] * len(prompt) + completion


def test_messages_label_only_assistant_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "apple?"},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "river?"},
                {"role": "assistant", "content": "blue"}]
    ex = sft_data.encode_record({"messages": messages}, tok)
    supervised = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    text = tok.decode(supervised)
    assert "red" in text and "blue" in text
    assert "apple" not in text and "river" not in text and "Be brief" not in text
    assert sft_data.prompt_ids({"messages": messages}, tok) == list(ex.input_ids[:len(sft_data.prompt_ids(
        {"messages": messages}, tok))])


def test_batches_are_padded_and_truncated(smollm2_tokenizer):
    records = [{"prompt": "a", "completion": " b c d e f"}, {"prompt": "long " * 50, "completion": " x"}]
    examples = sft_data.encode_records(records, smollm2_tokenizer, max_seq_len=16)
    assert len(examples) == 1  # the second has no completion left within 16 tokens
    batch = sft_data.collate(examples + [sft_data.Example((5, 6), (IGNORE, 6))], pad_id=0)
    assert batch.input_ids.shape == batch.labels.shape == (2, len(examples[0].input_ids))
    assert batch.attention_mask[1].tolist()[:3] == [1, 1, 0] and batch.labels[1, 2:].eq(IGNORE).all()


@pytest.mark.parametrize("record", [{"prompt": "a"}, {"messages": [{"role": "user", "content": "hi"}]},
                                    {"messages": [{"role": "robot", "content": "x"}]}, ["a"],
                                    {"prompt": "a", "completion": ""}])
def test_bad_records_are_refused(record, smollm2_tokenizer):
    with pytest.raises(ValueError, match="record 0"):
        sft_data.encode_records([record], smollm2_tokenizer, 64)
