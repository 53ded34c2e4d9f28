"""Plain continuation for base models: the turns joined by blank lines, replies end with EOS."""

from zhtune.templates.base import Template


class GenerationTemplate(Template):
    name = "default-generation"
    user_turn = "{}"
    after_turn = "\n\n"

    def bos_text(self) -> str:
        return (self.tokenizer.bos_token or "") if self.tokenizer is not None else ""

    def end_of_turn_text(self) -> str:
        return (self.tokenizer.eos_token or "") if self.tokenizer is not None else ""
