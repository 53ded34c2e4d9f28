"""Chat formats, one small class each. `get_template(name, tokenizer)` is the only entry point."""

from zhtune.errors import UserError, closest
from zhtune.templates.base import IGNORE_INDEX, Encoded, Template, check_messages
from zhtune.templates.chatml import ChatMLTemplate, Qwen25Template
from zhtune.templates.gemma import GemmaTemplate
from zhtune.templates.generation import GenerationTemplate
from zhtune.templates.llama3 import Llama3Template

TEMPLATES = {t.name: t for t in (GemmaTemplate, ChatMLTemplate, Qwen25Template, Llama3Template, GenerationTemplate)}


def get_template(name: str, tokenizer=None) -> Template:
    try:
        return TEMPLATES[name](tokenizer)
    except KeyError:
        raise UserError(f"unknown --template_type '{name}'.{closest(name, TEMPLATES)} "
                        f"Known templates: {', '.join(TEMPLATES)}.") from None


__all__ = ["IGNORE_INDEX", "Encoded", "Template", "TEMPLATES", "check_messages", "get_template"]
