"""Chat templates of Qwen-Merge (qwen-merge overlay).

* ``qwen_merge_vl``: the Qwen3 chat format with the thinking rules of the model's ``chat_template.jinja``
  (``QwenMergeTemplate``): the last answer gets ``<think>\\n{thoughts}\\n</think>\\n\\n`` (empty when it has none) in
  its loss when ``enable_thinking`` is true, and an empty one in its prompt when false; earlier answers are rendered
  as the chat template renders history (thoughts dropped before the last user query, kept after it, e.g. around
  tool calls); tools in the system turn and tool calls as the chat template writes them; no default system prompt.
  With ``per_turn_samples`` (``per_turn.py``) every trained turn therefore sees its inference prefix token for token.
  Used for stage 2.2 (``enable_thinking: false``) and stage 3.
* ``qwen_merge_vl_pt``: the role-less caption/OCR pretraining format ``<|im_start|>{prompt}{answer}<|im_end|>\\n``
  of stages 1 and 2.1 (a system prompt, should a sample carry one, takes the chat format).

Both use the ``qwen_merge_vl`` plugin: the upstream ``qwen2_vl`` one (``<image>`` / ``<video>`` become
``<|vision_start|>`` + n x ``<|image_pad|>`` / ``<|video_pad|>`` + ``<|vision_end|>``, n = grid_t * grid_h * grid_w /
merge_size**2) with every placeholder followed by a newline, as the data (``<image>\\n...``) and the model's chat
template have it. Upstream chat/webchat prepend a bare ``<image>`` to an uploaded picture's query, which would
otherwise render ``<|vision_end|>question``, a prompt the model never saw in training.
"""
import re
from copy import deepcopy

from typing_extensions import override

from ..data.formatter import FunctionFormatter, StringFormatter, ToolFormatter
from ..data.mm_plugin import Qwen2VLPlugin, get_mm_plugin, register_mm_plugin
from ..data.template import ReasoningTemplate, register_template
from ..extras.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from ..data.data_utils import Role

IM_END = "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
TOOLS_WITHOUT_SYSTEM = "\n\n# Tools\n\n"  # LLaMA-Factory's qwen tool text, appended to an empty system prompt


class ChatSystemFormatter(StringFormatter):
    """The system turn. A tool list without a system prompt starts right after `system\\n`, as in the chat template
    (LLaMA-Factory joins system prompt and tool text with a blank line even when the prompt is empty)."""

    @override
    def apply(self, **kwargs):
        if "content" not in kwargs:  # slots only (the ollama Modelfile export asks for them)
            return super().apply(**kwargs)
        content = kwargs.pop("content")
        if content.startswith(TOOLS_WITHOUT_SYSTEM):
            content = content[2:]
        return super().apply(content=content, **kwargs)


class ThoughtFunctionFormatter(FunctionFormatter):
    """Tool calls after their thoughts: `<think>\\n...\\n</think>\\n\\n<tool_call>...` as the chat template writes
    them (upstream drops the blank line after `</think>`)."""

    @override
    def apply(self, **kwargs):
        if "content" not in kwargs:
            return super().apply(**kwargs)
        content = kwargs.pop("content")
        thought, end, calls = content.rpartition(END_THINK)
        slots = super().apply(content=calls, **kwargs)
        return [thought + end + "\n\n" + slots[0], *slots[1:]] if end else slots


def split_thought(content: str) -> tuple[str, str]:
    """(thoughts, answer) as the chat template splits an assistant message: thoughts stripped of newlines, the
    answer is the text after `</think>` without leading newlines."""
    if END_THINK not in content:
        return "", content.lstrip("\n")
    head, _, answer = content.rpartition(END_THINK)
    return head.split(THINK)[-1].strip("\n"), answer.lstrip("\n")


def think_block(thoughts: str) -> str:
    return f"{THINK}\n{thoughts}\n{END_THINK}\n\n"


class QwenMergeTemplate(ReasoningTemplate):
    """Renders a conversation as the model's chat template does, for the last assistant turn as the one generated:

    * last turn: thinking on -> `<think>\\n{thoughts}\\n</think>\\n\\n{answer}` in the loss (empty thoughts when it
      has none); thinking off -> thoughts removed, `<think>\\n\\n</think>\\n\\n` ends the prompt (not in the loss);
    * earlier turns (history): the answer only, except after the last user query (tool-call chains), where
      non-empty thoughts stay; with thinking off there are none.

    Every earlier turn is still a prompt/response pair, but only the last one has its inference prefix, so multi-turn
    samples train correctly only with `per_turn_samples` (history masked)."""

    def _render(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        messages = deepcopy(messages)
        users = [i for i, m in enumerate(messages) if m["role"] == Role.USER.value]
        last_query = users[-1] if users else 0
        last = len(messages) - 1
        for i in range(1, len(messages), 2):
            thoughts, answer = split_thought(messages[i]["content"])
            if self.enable_thinking is False:
                thoughts = ""
            if i == last and self.enable_thinking is not False:
                messages[i]["content"] = think_block(thoughts) + answer
            elif i > last_query and thoughts:
                messages[i]["content"] = think_block(thoughts) + answer
            else:
                messages[i]["content"] = answer
        return messages

    def _encode_pairs(self, tokenizer, messages, system, tools) -> list[list[int]]:
        encoded = self._encode(tokenizer, self._render(messages), system, tools)
        if self.enable_thinking is False:
            encoded[-2] = encoded[-2] + self.get_thought_word_ids(tokenizer)  # the generation prompt's empty thoughts
        return encoded

    @override
    def encode_oneturn(self, tokenizer, messages, system=None, tools=None):
        encoded = self._encode_pairs(tokenizer, messages, system, tools)
        return [token for ids in encoded[:-1] for token in ids], encoded[-1]

    @override
    def encode_multiturn(self, tokenizer, messages, system=None, tools=None):
        encoded = self._encode_pairs(tokenizer, messages, system, tools)
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]


CHAT_SYSTEM = ChatSystemFormatter(slots=["<|im_start|>system\n{{content}}<|im_end|>\n"])
ANSWER = StringFormatter(slots=["{{content}}<|im_end|>\n"])
PLACEHOLDER_WITHOUT_NEWLINE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})(?!\n)")


class QwenMergeVLPlugin(Qwen2VLPlugin):
    @override
    def process_messages(self, messages, images, videos, audios, processor):
        messages = [{**m, "content": PLACEHOLDER_WITHOUT_NEWLINE.sub("\\1\n", m["content"])} for m in messages]
        return super().process_messages(messages, images, videos, audios, processor)


register_mm_plugin("qwen_merge_vl", QwenMergeVLPlugin)


def vision_plugin():
    return get_mm_plugin(name="qwen_merge_vl", image_token="<|image_pad|>", video_token="<|video_pad|>")


register_template(
    name="qwen_merge_vl",
    format_user=StringFormatter(slots=["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"]),
    format_assistant=ANSWER,
    format_system=CHAT_SYSTEM,
    format_function=ThoughtFunctionFormatter(slots=["{{content}}<|im_end|>\n"], tool_format="qwen"),
    format_observation=StringFormatter(
        slots=["<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"]
    ),
    format_tools=ToolFormatter(tool_format="qwen"),
    stop_words=[IM_END],
    replace_eos=True,
    mm_plugin=vision_plugin(),
    template_class=QwenMergeTemplate,
)

register_template(
    name="qwen_merge_vl_pt",
    format_user=StringFormatter(slots=["<|im_start|>{{content}}"]),
    format_assistant=ANSWER,
    format_system=CHAT_SYSTEM,
    stop_words=[IM_END],
    replace_eos=True,
    mm_plugin=vision_plugin(),
)
