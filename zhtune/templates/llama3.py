"""Llama 3 Instruct's header format."""

from zhtune.templates.base import Template


class Llama3Template(Template):
    name = "llama3"
    bos = "<|begin_of_text|>"
    system_prefix = "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>"
    user_turn = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    assistant_prefix = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    end_of_turn = "<|eot_id|>"
    stop_words = ("<|eot_id|>", "<|end_of_text|>")
