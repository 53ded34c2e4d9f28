"""ChatML, as Qwen uses it. `qwen2_5` adds Qwen 2.5's default system prompt."""

from zhtune.templates.base import Template


class ChatMLTemplate(Template):
    name = "chatml"
    system_prefix = "<|im_start|>system\n{}<|im_end|>\n"
    user_turn = "<|im_start|>user\n{}<|im_end|>\n"
    assistant_prefix = "<|im_start|>assistant\n"
    end_of_turn = "<|im_end|>"
    after_turn = "\n"
    stop_words = ("<|im_end|>", "<|endoftext|>")
    strip_content = False


class Qwen25Template(ChatMLTemplate):
    name = "qwen2_5"
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
