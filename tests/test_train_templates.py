"""Golden tests of the training templates `qwen_merge_vl` and `qwen_merge_vl_pt`, through LLaMA-Factory's own
supervised encoder (the code `llamafactory-cli train` runs), on the tiny merged model's tokenizer and processor.

Expected strings are written from the rules: Qwen3 chat markers, Qwen3 thinking rules, and one `<|image_pad|>` per
2x2 group of 14-pixel patches (a W x H image, both multiples of 28, gives (W/14)(H/14)/4 pads; a video of F frames
gives F/2 times that). Every picture is a real photo resized to such a size.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.timeout(300)

IGNORE = -100
WIDTH, HEIGHT = 112, 56  # within the tiny processor's pixel bounds and multiples of 28: kept as is
FRAMES = 4
THINK_EMPTY = "<think>\n\n</think>\n\n"


def pads(token: str, count: int) -> str:
    return "<|vision_start|>" + token * count + "<|vision_end|>"


IMAGE_BLOCK = pads("<|image_pad|>", (WIDTH // 14) * (HEIGHT // 14) // 4)
VIDEO_BLOCK = pads("<|video_pad|>", (FRAMES // 2) * (WIDTH // 14) * (HEIGHT // 14) // 4)


def chat_user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def photo(sample_images) -> Image.Image:
    return Image.open(sample_images[0]).convert("RGB").resize((WIDTH, HEIGHT))


@pytest.fixture(scope="module")
def video_frames(sample_images, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("frames")
    paths = []
    for i in range(FRAMES):
        path = folder / f"frame{i}.png"
        Image.open(sample_images[i % len(sample_images)]).convert("RGB").resize((WIDTH, HEIGHT)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def encoder(tiny_merged):
    """encode(template, messages, images, videos, enable_thinking) -> (input_ids, labels, tokenizer module), with
    the tokenizer/processor LLaMA-Factory loads and its supervised encoder (what training runs)."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments, get_infer_args
    from llamafactory.model import load_tokenizer

    model_args, _, _, _ = get_infer_args({"model_name_or_path": str(tiny_merged), "template": "qwen_merge_vl"})
    modules = load_tokenizer(model_args)

    def encode(template, messages, images=(), videos=(), enable_thinking=True):
        data_args = DataArguments(template=template, enable_thinking=enable_thinking, cutoff_len=4096)
        template_obj = get_template_and_fix_tokenizer(modules["tokenizer"], data_args)
        processor = SupervisedDatasetProcessor(template=template_obj, tokenizer=modules["tokenizer"],
                                               processor=modules["processor"], data_args=data_args)
        ids, labels = processor._encode_data_example(messages[:-1], messages[-1:], None, None, list(images),
                                                     list(videos), [])
        return ids, labels, modules

    return encode


def turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def render(encoded) -> tuple[str, list[str]]:
    """(the whole decoded sequence, the decoded label spans in order)."""
    ids, labels, modules = encoded
    tokenizer = modules["tokenizer"]
    assert len(ids) == len(labels)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token  # a trained position is labelled with its own token
            current.append(token)
    if current:
        spans.append(current)
    return tokenizer.decode(ids), [tokenizer.decode(span) for span in spans]


def test_chat_single_turn_image_with_thoughts(encoder, photo):
    answer = "<think>\nA spacesuit and a flag.\n</think>\n\nAn astronaut."
    text, labels = render(encoder("qwen_merge_vl", turns("<image>\nWho is this?", answer), images=[photo]))
    assert text == chat_user(f"{IMAGE_BLOCK}\nWho is this?") + answer + "<|im_end|>\n"
    assert labels == [answer + "<|im_end|>\n"]


def test_chat_thinking_on_adds_empty_thoughts_to_the_loss(encoder, photo):
    text, labels = render(encoder("qwen_merge_vl", turns("<image>\nWho is this?", "An astronaut."), images=[photo]))
    assert text == chat_user(f"{IMAGE_BLOCK}\nWho is this?") + THINK_EMPTY + "An astronaut.<|im_end|>\n"
    assert labels == [THINK_EMPTY + "An astronaut.<|im_end|>\n"]


def test_chat_thinking_off_strips_thoughts_and_puts_empty_ones_in_the_prompt(encoder, photo):
    answer = "<think>\nA spacesuit.\n</think>\n\nAn astronaut."
    text, labels = render(encoder("qwen_merge_vl", turns("<image>\nWho is this?", answer), images=[photo],
                                  enable_thinking=False))
    assert text == chat_user(f"{IMAGE_BLOCK}\nWho is this?") + THINK_EMPTY + "An astronaut.<|im_end|>\n"
    assert labels == ["An astronaut.<|im_end|>\n"]


def test_chat_multi_turn_history_is_rendered_as_the_chat_template(encoder, photo):
    """Earlier answers lose their thoughts (and get no empty think block), as chat_template.jinja renders history;
    the last answer is the generated one. Which turns are trained is per_turn.py's job (test_train_multiturn.py)."""
    first = "<think>\nIt is a suit.\n</think>\n\nWhite."
    second = "<think>\nIt is space.\n</think>\n\nBlack."
    messages = turns("<image>\nWhat colour is it?", first, "And the sky?", second)
    text, labels = render(encoder("qwen_merge_vl", messages, images=[photo]))
    assert text == (chat_user(f"{IMAGE_BLOCK}\nWhat colour is it?") + "White.<|im_end|>\n"
                    + chat_user("And the sky?") + second + "<|im_end|>\n")
    assert labels[-1] == second + "<|im_end|>\n"


def test_chat_video(encoder, video_frames):
    text, labels = render(encoder("qwen_merge_vl", turns("<video>\nWhat happens?", "Nothing."), videos=[video_frames],
                                  enable_thinking=False))
    assert text == chat_user(f"{VIDEO_BLOCK}\nWhat happens?") + THINK_EMPTY + "Nothing.<|im_end|>\n"
    assert labels == ["Nothing.<|im_end|>\n"]


def test_placeholder_without_newline_gets_one(encoder, photo):
    """LLaMA-Factory's chat/webchat prepend a bare `<image>` to the question of an uploaded picture."""
    text, _ = render(encoder("qwen_merge_vl", turns("<image>Who is this?", "An astronaut."), images=[photo]))
    assert text.startswith(chat_user(f"{IMAGE_BLOCK}\nWho is this?"))


def test_pretraining_template_single_turn(encoder, photo):
    text, labels = render(encoder("qwen_merge_vl_pt", turns("<image>\nDescribe the image.", "A man in a spacesuit."),
                                  images=[photo]))
    assert text == f"<|im_start|>{IMAGE_BLOCK}\nDescribe the image.A man in a spacesuit.<|im_end|>\n"
    assert labels == ["A man in a spacesuit.<|im_end|>\n"]


def test_pretraining_template_multi_turn_and_video(encoder, video_frames):
    messages = turns("<video>\nWhat is shown?", "Photos.", "How many?", "Four.")
    text, labels = render(encoder("qwen_merge_vl_pt", messages, videos=[video_frames]))
    assert text == (f"<|im_start|>{VIDEO_BLOCK}\nWhat is shown?Photos.<|im_end|>\n"
                    "<|im_start|>How many?Four.<|im_end|>\n")
    assert labels == ["Photos.<|im_end|>\n", "Four.<|im_end|>\n"]


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_training_prompt_is_the_inference_prompt(encoder, photo, enable_thinking):
    """Stage 2.2/3 prompts are token for token what the model's chat_template.jinja gives at inference."""
    answer = "An astronaut."
    ids, labels, modules = encoder("qwen_merge_vl", turns("<image>\nWho is this?", answer), images=[photo],
                                   enable_thinking=enable_thinking)
    prompt = [token for token, label in zip(ids, labels) if label == IGNORE]
    processor = modules["processor"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    inference = processor(text=[text], images=[photo], return_tensors="pt")["input_ids"][0].tolist()
    assert prompt == inference


def assert_chat_renders_the_chat_template(model_dir, picture: Image.Image, question: str) -> None:
    """The engine behind `llamafactory-cli chat`/`webchat` (hf backend, thinking mode as in chat.yaml), given an
    uploaded picture and a question, feeds the model exactly the token ids and pixels that the model's own chat
    template + processor give, and answers. (Its greedy mode cannot be compared token for token: transformers 4.52
    replaces a passed `do_sample=False` by the model's generation_config `do_sample=True`, so it samples.)"""
    from llamafactory.chat import ChatModel
    from transformers import AutoProcessor

    chat = ChatModel({"model_name_or_path": str(model_dir), "template": "qwen_merge_vl", "infer_backend": "huggingface",
                      "infer_dtype": "float32", "max_new_tokens": 4})
    engine = chat.engine
    gen_kwargs, prompt_length = engine._process_args(
        engine.model, engine.tokenizer, engine.processor, engine.template, engine.generating_args,
        [{"role": "user", "content": question}], images=[picture])

    processor = AutoProcessor.from_pretrained(model_dir, use_fast=True)  # as LLaMA-Factory loads it
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)], images=[picture],
                       return_tensors="pt")
    assert gen_kwargs["inputs"].tolist() == inputs["input_ids"].tolist()
    assert torch.equal(gen_kwargs["pixel_values"], inputs["pixel_values"])
    assert torch.equal(gen_kwargs["image_grid_thw"], inputs["image_grid_thw"])

    reply = chat.chat([{"role": "user", "content": question}], images=[picture])[0]
    assert reply.prompt_length == prompt_length and reply.response_length > 0


def test_chat_engine_renders_the_chat_template(tiny_merged, sample_images):
    picture = Image.open(sample_images[3]).convert("RGB")
    assert_chat_renders_the_chat_template(tiny_merged, picture, "Describe it.")


def test_webchat_answers_about_an_uploaded_picture(tiny_merged, sample_images, monkeypatch):
    """The chat function of `llamafactory-cli webchat` (web UI demo mode, no server) with an uploaded picture."""
    from llamafactory.webui.chatter import WebChatModel
    from llamafactory.webui.manager import Manager

    monkeypatch.setenv("DEMO_MODEL", str(tiny_merged))
    monkeypatch.setenv("DEMO_TEMPLATE", "qwen_merge_vl")
    chatter = WebChatModel(Manager(), demo_mode=True)
    assert chatter.loaded and type(chatter.engine.template.mm_plugin).__name__ == "QwenMergeVLPlugin"
    messages = [{"role": "user", "content": "Describe it."}]
    picture = Image.open(sample_images[4]).convert("RGB")
    *_, (chatbot, output) = chatter.stream([], messages, "en", "", "", picture, None, None, 4, 0.7, 0.95, True, True,
                                           False)
    assert output[:-1] == messages and output[-1]["role"] == "assistant" and output[-1]["content"]
    assert chatbot[-1]["role"] == "assistant"
