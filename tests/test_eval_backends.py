"""The transformers backend of eval.generation on the tiny Qwen-Merge: decoding settings, streaming, thought budget."""
import pytest
import torch

from eval.generation import FORCED_ANSWER_CUE, SamplingSettings, load_backend, load_image

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]


@pytest.fixture(scope="module")
def backend(tiny_merged):
    return load_backend(tiny_merged, "hf")


@pytest.fixture(scope="module")
def image(sample_images):
    return load_image(sample_images[0])


def settings(backend, **overrides):
    return SamplingSettings.for_checkpoint(backend.info, **overrides)


def test_greedy_reply_equals_plain_transformers_greedy_decoding(backend, image):
    prompt = backend.render(QUESTION)
    reply = backend.reply(prompt, [image], settings(backend, greedy=True, max_new_tokens=12))
    inputs = backend.processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.inference_mode():
        ids = backend.model.generate(**inputs, do_sample=False, max_new_tokens=12)
    expected = backend.processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.text == expected and not reply.forced_answer


def test_sampling_is_applied_and_reproducible_with_a_seed(backend, image):
    prompt = backend.render(QUESTION)
    greedy = backend.reply(prompt, [image], settings(backend, greedy=True, max_new_tokens=16)).text
    hot = settings(backend, temperature=50.0, top_p=1.0, top_k=0, max_new_tokens=16, seed=7)
    first, second = (backend.reply(prompt, [image], hot).text for _ in range(2))
    assert first == second
    assert first != greedy


def test_streamed_pieces_add_up_to_the_reply(backend, image):
    pieces = []
    reply = backend.reply(backend.render(QUESTION), [image], settings(backend, greedy=True, max_new_tokens=12),
                          on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == reply.text


def test_a_thought_out_of_budget_is_closed_and_answered(backend, image):
    prompt = backend.render(QUESTION) + "<think>\n"  # as templates that open the thought in the prompt do
    budget = settings(backend, greedy=True, max_new_tokens=4)
    thought = backend.complete(prompt, [image], budget)
    assert thought.hit_limit

    pieces = []
    reply = backend.reply(prompt, [image], budget, answer_budget=6, on_text=pieces.append)
    assert reply.thinking_open and reply.forced_answer and not reply.truncated
    assert "".join(pieces) == reply.text  # the cue and the answer are streamed too
    assert reply.text.startswith(thought.text + FORCED_ANSWER_CUE)
    answer = reply.text[len(thought.text + FORCED_ANSWER_CUE):].strip()
    assert answer and reply.answer() == answer

    unanswered = backend.reply(prompt, [image], budget, answer_budget=0)
    assert unanswered.truncated and not unanswered.forced_answer and unanswered.text == thought.text
    assert unanswered.answer("empty") == "" and unanswered.answer("full") == thought.text.strip()


def test_text_only_turns_need_no_image(backend):
    prompt = backend.render([{"role": "user", "content": "Hello"}], enable_thinking=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")  # the template's no-thinking switch
    assert backend.reply(prompt, [], settings(backend, greedy=True, max_new_tokens=3)).text


def test_unknown_backend_options_are_named(tiny_merged):
    with pytest.raises(ValueError, match="unknown option\\(s\\) for the hf backend: max_model_len"):
        load_backend(tiny_merged, "hf", max_model_len=10)
    with pytest.raises(ValueError, match="unknown backend 'trt'"):
        load_backend(tiny_merged, "trt")
