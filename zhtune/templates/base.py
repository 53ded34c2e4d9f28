"""The one encode function every command uses: messages -> input_ids and labels.

A template renders a conversation into text pieces, each marked trained or not. The whole text is
tokenized at once (so the ids equal what the tokenizer's own chat template gives) and a token is
trained when its first character lies in a trained piece: the assistant replies and their
end-of-turn marker.
"""

from dataclasses import dataclass

from zhtune.errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    def __len__(self):
        return len(self.input_ids)


def check_messages(messages: list[dict], for_generation: bool) -> None:
    """Conversations are: optional system, then user/assistant alternating, ending as the use needs."""
    if not messages:
        raise UserError("empty conversation: give at least one user message.")
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want:
            raise UserError(f"message {i + 1} has role '{m.get('role')}', expected '{want}': "
                            "a conversation is an optional system message, then user and assistant turns in turn.")
        if not isinstance(m.get("content"), str):
            raise UserError(f"message {i + 1} ({want}) has no text content.")
    last = turns[-1]["role"] if turns else None
    if for_generation and last != "user":
        raise UserError("to generate, the conversation must end with a user message.")
    if not for_generation and last != "assistant":
        raise UserError("to train, the conversation must end with an assistant reply.")


class Template:
    """A chat format. Subclasses give the turn markers; `pieces` does the rest."""

    name: str = ""
    bos: str = ""  # text that starts every conversation
    system_prefix: str = ""  # '{}' is replaced; empty means: fold the system prompt into the first user turn
    user_turn: str = "{}"
    assistant_prefix: str = ""
    end_of_turn: str = ""  # trained with the reply
    after_turn: str = ""  # not trained (e.g. the newline after an end-of-turn marker)
    default_system: str | None = None
    stop_words: tuple = ()
    strip_content: bool = True

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    # -- rendering -------------------------------------------------------------------------------
    def pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The conversation as (text, trained) pieces."""
        check_messages(messages, for_generation=add_generation_prompt)
        system = self.default_system
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        out = [(self.bos_text(), False)]
        if system and self.system_prefix:
            out.append((self.system_prefix.format(self._clean(system)), False))
        for i, m in enumerate(messages):
            text = self._clean(m["content"])
            if m["role"] == "user":
                if i == 0 and system and not self.system_prefix:
                    text = self._clean(system) + "\n\n" + text
                out.append((self.user_turn.format(text), False))
            else:
                out.append((self.assistant_prefix, False))
                out.append((text + self.end_of_turn_text(), True))
                out.append((self.after_turn, False))
        if add_generation_prompt:
            out.append((self.assistant_prefix, False))
        return [(t, trained) for t, trained in out if t]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(text for text, _ in self.pieces(messages, add_generation_prompt))

    def bos_text(self) -> str:
        return self.bos

    def end_of_turn_text(self) -> str:
        return self.end_of_turn

    def _clean(self, text: str) -> str:
        return text.strip() if self.strip_content else text

    # -- tokenizing ------------------------------------------------------------------------------
    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> Encoded:
        if self.tokenizer is None:
            raise ValueError(f"template '{self.name}' was built without a tokenizer")
        pieces = self.pieces(messages, add_generation_prompt)
        text, spans, pos = "", [], 0
        for piece, trained in pieces:
            if trained:
                spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = []
        for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
            trained = any(a <= start < b for a, b in spans)
            labels.append(tok if trained else IGNORE_INDEX)
        return Encoded(list(enc["input_ids"]), labels)

    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generated reply."""
        ids = []
        for word in self.stop_words:
            tok_id = self.tokenizer.convert_tokens_to_ids(word)
            if isinstance(tok_id, int) and tok_id != self.tokenizer.unk_token_id:
                ids.append(tok_id)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))
