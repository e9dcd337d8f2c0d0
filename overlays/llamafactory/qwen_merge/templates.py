"""Chat templates of Qwen-Merge (qwen-merge overlay).

* ``qwen_merge_vl``: the Qwen3 chat format with Qwen3 thinking rules (``ReasoningTemplate``: history thoughts kept
  for SFT, an empty ``<think>\\n\\n</think>\\n\\n`` added to answers without one: in the loss when ``enable_thinking``
  is true, in the prompt when false) and no default system prompt. It renders exactly what the model's
  ``chat_template.jinja`` renders at inference. Used for stage 2.2 (``enable_thinking: false``) and stage 3.
* ``qwen_merge_vl_pt``: the role-less caption/OCR pretraining format ``<|im_start|>{prompt}{answer}<|im_end|>\\n``
  of stages 1 and 2.1 (a system prompt, should a sample carry one, takes the chat format).

Both use the ``qwen_merge_vl`` plugin: the upstream ``qwen2_vl`` one (``<image>`` / ``<video>`` become
``<|vision_start|>`` + n x ``<|image_pad|>`` / ``<|video_pad|>`` + ``<|vision_end|>``, n = grid_t * grid_h * grid_w /
merge_size**2) with every placeholder followed by a newline, as the data (``<image>\\n...``) and the model's chat
template have it. Upstream chat/webchat prepend a bare ``<image>`` to an uploaded picture's query, which would
otherwise render ``<|vision_end|>question``, a prompt the model never saw in training.
"""
import re

from typing_extensions import override

from ..data.formatter import FunctionFormatter, StringFormatter, ToolFormatter
from ..data.mm_plugin import Qwen2VLPlugin, get_mm_plugin, register_mm_plugin
from ..data.template import ReasoningTemplate, register_template
from ..extras.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

IM_END = "<|im_end|>"
CHAT_SYSTEM = StringFormatter(slots=["<|im_start|>system\n{{content}}<|im_end|>\n"])
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
    format_function=FunctionFormatter(slots=["{{content}}<|im_end|>\n"], tool_format="qwen"),
    format_observation=StringFormatter(
        slots=["<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"]
    ),
    format_tools=ToolFormatter(tool_format="qwen"),
    stop_words=[IM_END],
    replace_eos=True,
    mm_plugin=vision_plugin(),
    template_class=ReasoningTemplate,
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
