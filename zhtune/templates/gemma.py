"""Gemma's turn format (Gemma 2 and 3). A system prompt is folded into the first user turn."""

from zhtune.templates.base import Template


class GemmaTemplate(Template):
    name = "gemma"
    bos = "<bos>"
    user_turn = "<start_of_turn>user\n{}<end_of_turn>\n"
    assistant_prefix = "<start_of_turn>model\n"
    end_of_turn = "<end_of_turn>"
    after_turn = "\n"
    stop_words = ("<end_of_turn>",)
