"""Golden tests: zhtune's encoding equals the models' own chat templates, and labels cover replies only."""

import copy

import pytest

from zhtune.errors import UserError
from zhtune.templates import IGNORE_INDEX, get_template

GEMMA2_OFFICIAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] "
    "| trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# Gemma 3's rule for a system prompt: folded into the first user turn, followed by a blank line.
GEMMA3_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] | trim "
    "+ '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages "
    "= messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'assistant') %}{% set role = "
    "'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "(first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
QWEN25_OFFICIAL = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or (message.role == "
    "'assistant') %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
LLAMA3_OFFICIAL = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = '<|begin_of_text|>' + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

SINGLE = [{"role": "user", "content": "浙江的省会在哪？"}, {"role": "assistant", "content": "浙江的省会是杭州。"}]
MULTI = SINGLE + [{"role": "user", "content": "这有什么好吃的？"},
                  {"role": "assistant", "content": "西湖醋鱼、东坡肉和龙井虾仁。\nEnjoy!"}]
WITH_SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}] + MULTI


@pytest.fixture(scope="module")
def tokenizers(gemma_tokenizer):
    """The real Gemma tokenizer, and copies that know ChatML's and Llama 3's special tokens."""
    out = {"gemma": gemma_tokenizer}
    for name, specials in (("chatml", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
                           ("llama3", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                       "<|eot_id|>", "<|end_of_text|>"])):
        tok = copy.deepcopy(gemma_tokenizer)
        tok.add_special_tokens({"additional_special_tokens": specials})
        out[name] = tok
    return out


def official_ids(tokenizer, chat_template, messages, add_generation_prompt):
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


CASES = [("gemma", "gemma", GEMMA2_OFFICIAL, [SINGLE, MULTI]),
         ("gemma", "gemma", GEMMA3_SYSTEM, [SINGLE, MULTI, WITH_SYSTEM]),
         ("qwen2_5", "chatml", QWEN25_OFFICIAL, [SINGLE, MULTI, WITH_SYSTEM]),
         ("llama3", "llama3", LLAMA3_OFFICIAL, [SINGLE, MULTI, WITH_SYSTEM])]


@pytest.mark.parametrize("template_name,tok_name,official,conversations", CASES)
def test_encoding_equals_official_chat_template(tokenizers, template_name, tok_name, official, conversations):
    tok = tokenizers[tok_name]
    template = get_template(template_name, tok)
    for messages in conversations:
        assert template.encode(messages).input_ids == official_ids(tok, official, messages, False)
        prompt = messages[:-1]
        assert template.encode(prompt, add_generation_prompt=True).input_ids == official_ids(tok, official, prompt, True)


@pytest.mark.parametrize("template_name,tok_name", [("gemma", "gemma"), ("qwen2_5", "chatml"), ("llama3", "llama3"),
                                                     ("default-generation", "gemma")])
def test_labels_cover_each_reply_and_its_end_of_turn_only(tokenizers, template_name, tok_name):
    tok = tokenizers[tok_name]
    template = get_template(template_name, tok)
    enc = template.encode(MULTI)
    assert len(enc.input_ids) == len(enc.labels)
    trained = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(enc.input_ids, enc.labels))
    text = tok.decode(trained)
    for reply in (MULTI[1]["content"], MULTI[3]["content"]):
        assert reply.strip() in text
    for query in (MULTI[0]["content"], MULTI[2]["content"]):
        assert query not in text
    end = template.end_of_turn_text()
    assert text.count(end) == 2, f"both replies end with {end!r} and it is trained"
    # the last trained token is the end-of-turn marker of the last reply
    assert trained[-1] == tok.convert_tokens_to_ids(end)


def test_gemma_golden_ids(gemma_tokenizer):
    """Fixed ids for a two-turn Gemma prompt: <bos> <start_of_turn> user \\n ... <end_of_turn> \\n ..."""
    enc = get_template("gemma", gemma_tokenizer).encode(SINGLE)
    assert enc.input_ids[:4] == [2, 105, 2364, 107]
    assert enc.input_ids[-2:] == [106, 107]
    assert enc.labels[-2:] == [106, IGNORE_INDEX]  # <end_of_turn> trained, the newline after it not
    assert all(l == IGNORE_INDEX for l in enc.labels[:enc.input_ids.index(4368) + 2])  # up to "model\n"


def test_stop_tokens(tokenizers):
    assert get_template("gemma", tokenizers["gemma"]).stop_token_ids() == sorted({106, 1})
    llama = tokenizers["llama3"]
    assert llama.convert_tokens_to_ids("<|eot_id|>") in get_template("llama3", llama).stop_token_ids()


@pytest.mark.parametrize("messages,for_generation,message", [
    ([], True, "empty conversation"),
    ([{"role": "assistant", "content": "hi"}], False, "expected 'user'"),
    ([{"role": "user", "content": "hi"}], False, "must end with an assistant reply"),
    (SINGLE, True, "must end with a user message"),
])
def test_bad_conversations_are_one_clear_error(gemma_tokenizer, messages, for_generation, message):
    with pytest.raises(UserError, match=message):
        get_template("gemma", gemma_tokenizer).encode(messages, add_generation_prompt=for_generation)


def test_unknown_template_names_closest():
    with pytest.raises(UserError, match="Did you mean 'gemma'"):
        get_template("gema")
