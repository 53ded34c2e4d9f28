"""Registry lookups, name resolution, attention choice, and the embedded Gemma on a CPU."""

import time

import pytest

from zhtune.errors import UserError
from zhtune.hub import download_model
from zhtune.models.loader import pick_attention
from zhtune.models.resolve import resolve_model
from zhtune.models.registry import MODELS, find_by_hub_id, get_model_info

REQUIRED = ["gemma2-2b", "gemma2-2b-instruct", "gemma2-9b", "gemma2-9b-instruct", "gemma2-27b", "gemma2-27b-instruct",
            "gemma3-270m", "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", "llama3-8b-instruct"]


def test_registry_has_the_required_models():
    assert set(REQUIRED) <= set(MODELS)
    info = get_model_info("gemma2-9b-instruct")
    assert (info.ms_id, info.hf_id, info.template) == ("LLM-Research/gemma-2-9b-it", "google/gemma-2-9b-it", "gemma")


@pytest.mark.parametrize("hub_id,model_type", [("LLM-Research/gemma-2-9b-it", "gemma2-9b-instruct"),
                                               ("google/gemma-2-9b-it", "gemma2-9b-instruct"),
                                               ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),
                                               ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b-instruct")])
def test_hub_ids_map_back_to_their_model_type(hub_id, model_type):
    assert find_by_hub_id(hub_id).model_type == model_type
    assert resolve_model(None, hub_id).model_type == model_type


def test_default_is_the_embedded_model():
    resolved = resolve_model(None, None)
    assert (resolved.model_type, resolved.source, resolved.template) == ("gemma3-270m", "embedded", "gemma")


def test_local_folder_type_from_config(tiny_models):
    assert resolve_model(None, str(tiny_models["gemma2"])).model_type == "gemma2-9b-instruct"
    assert resolve_model("gemma2-2b", str(tiny_models["gemma2"])).template == "default-generation"


def test_use_hf_switches_hub(monkeypatch):
    monkeypatch.setenv("USE_HF", "1")
    assert resolve_model("gemma2-9b-instruct", None).location == "google/gemma-2-9b-it"
    monkeypatch.setenv("USE_HF", "0")
    assert resolve_model("gemma2-9b-instruct", None).location == "LLM-Research/gemma-2-9b-it"


@pytest.mark.parametrize("value,hf", [("1", True), ("true", True), ("YES", True), ("On", True), ("0", False),
                                      ("false", False), ("no", False), ("", False)])
def test_use_hf_means_the_same_for_models_datasets_and_benchmarks(monkeypatch, value, hf):
    from zhtune.data.entries import parse_entry
    from zhtune.eval.arc import ARC
    monkeypatch.setenv("USE_HF", value)
    assert (resolve_model("gemma2-9b-instruct", None).location == "google/gemma-2-9b-it") is hf
    assert parse_entry("alpaca-zh").use_hf is hf
    assert ARC().source(None).startswith("HF::" if hf else "MS::")


def test_no_hub_is_one_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_modelscope(name, *args, **kwargs):
        if name == "modelscope":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.delenv("USE_HF", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_modelscope)
    with pytest.raises(UserError, match="pass its folder: --model_id_or_path") as e:
        download_model("LLM-Research/gemma-2-9b-it")
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, ImportError)  # the cause is kept


def test_gemma2_never_gets_sdpa():
    gemma2, qwen = get_model_info("gemma2-9b-instruct").arch, get_model_info("qwen2.5-7b-instruct").arch
    assert pick_attention(gemma2, True, "cuda:0") == "flex_attention"
    assert pick_attention(gemma2, None, "cuda:0") == "eager"
    assert pick_attention(gemma2, True, "cpu") == "eager"
    assert pick_attention(qwen, None, "cpu") == "sdpa"


@pytest.mark.slow
def test_embedded_model_loads_fast_and_generates():
    """Second and later loads come from the converted cache folder, in seconds."""
    from zhtune.args import InferArguments, parse_args
    from zhtune.infer.base import GenerationSettings
    from zhtune.infer.engine import load_engine
    from zhtune.models.embedded import embedded_model_dir
    embedded_model_dir()  # converts on first use
    start = time.time()
    engine = load_engine(resolve_model("gemma3-270m"), parse_args(InferArguments, ["--infer_backend", "pt"]))
    assert time.time() - start < 30
    replies = engine.generate([[{"role": "user", "content": "浙江的省会是哪里？"}],
                               [{"role": "user", "content": "What is 2 + 2?"}]],
                              GenerationSettings(max_new_tokens=8, do_sample=False), batch_size=2)
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    # batching with left padding gives the same greedy reply as one at a time
    single = engine.generate([[{"role": "user", "content": "What is 2 + 2?"}]],
                             GenerationSettings(max_new_tokens=8, do_sample=False), batch_size=1)
    assert single[0] == replies[1]


def test_precedence_flag_then_checkpoint_then_registry(tiny_models, tmp_path):
    """One rule for every command: a flag given > the checkpoint's sft_args.json > the registry."""
    import json
    lora = tmp_path / "output" / "gemma2-9b-instruct" / "v0-1" / "checkpoint-4"
    lora.mkdir(parents=True)
    (lora / "adapter_config.json").write_text("{}")
    (lora / "sft_args.json").write_text(json.dumps({"model_type": "gemma2-9b-instruct", "template_type": "chatml",
                                                    "model_id_or_path": str(tiny_models["gemma2"]), "system": "S"}))
    from_ckpt = resolve_model(ckpt_dir=str(lora))
    assert (from_ckpt.model_type, from_ckpt.template, from_ckpt.system) == ("gemma2-9b-instruct", "chatml", "S")
    assert from_ckpt.adapter_dir == str(lora) and from_ckpt.location == str(tiny_models["gemma2"])
    assert from_ckpt.label == "v0-1/checkpoint-4" and from_ckpt.describe()["lora"] is True
    flagged = resolve_model(ckpt_dir=str(lora), template_type="gemma", system="T")
    assert (flagged.template, flagged.system) == ("gemma", "T")
    assert resolve_model("gemma2-9b-instruct").template == "gemma"  # the registry's, without a checkpoint

    full = tmp_path / "full" / "checkpoint-2"  # full fine-tuning: the checkpoint is the model folder
    full.mkdir(parents=True)
    (full / "sft_args.json").write_text(json.dumps({"model_type": "gemma2-9b-instruct"}))
    with pytest.raises(UserError, match="neither adapter_config.json"):  # no config.json yet: damaged
        resolve_model(ckpt_dir=str(full))
    (full / "config.json").write_text("{}")
    resolved = resolve_model(ckpt_dir=str(full))
    assert resolved.adapter_dir is None and (resolved.source, resolved.location) == ("local", str(full))

    planned = resolve_model(ckpt_dir="output/qwen2.5-7b-instruct/v9-x/checkpoint-1", dry_run=True)
    assert planned.model_type == "qwen2.5-7b-instruct" and planned.ckpt_exists is False
    with pytest.raises(UserError, match="no such folder"):
        resolve_model(ckpt_dir=str(tmp_path / "nope"))


def test_embedded_tokenizer_reads_back_the_real_gemma3_ids():
    """The converted folder splits text as the real Gemma 3 tokenizer does, whatever transformers made it."""
    from transformers import AutoTokenizer

    from zhtune.models import embedded
    tokenizer = AutoTokenizer.from_pretrained(embedded.embedded_model_dir())
    assert embedded.probe_ids(tokenizer) == embedded.PROBE_IDS
    assert tokenizer.decode(embedded.PROBE_IDS) == embedded.TOKENIZER_PROBE
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 2


@pytest.mark.slow
def test_the_tokenizer_built_from_the_gguf_is_gemma3s():
    """What the conversion falls back to where transformers converts the GGUF's tokenizer wrongly (5.17)."""
    from transformers import AutoTokenizer

    from zhtune.models import embedded
    built = embedded.gemma_tokenizer_from_gguf(embedded._assemble_gguf())
    assert embedded.probe_ids(built) == embedded.PROBE_IDS
    saved = AutoTokenizer.from_pretrained(embedded.embedded_model_dir())
    for text in ["  两个空格\t\ttabs\n\n\nnewlines", "def f(x):\n    return x  # 😀", "<start_of_turn>user\n你好<end_of_turn>"]:
        ids = built(text, add_special_tokens=False)["input_ids"]
        assert ids == saved(text, add_special_tokens=False)["input_ids"] and built.decode(ids) == text


def test_a_saved_tokenizer_that_does_not_read_back_is_saved_as_the_generic_one(tmp_path, monkeypatch):
    """transformers 5.17 read a tokenizer.json saved under GemmaTokenizer back one character per token
    (the chat markers too): the conversion notices and names the generic fast tokenizer, which reads
    tokenizer.json as it is; a tokenizer that still differs stops the conversion."""
    import json
    import shutil

    import transformers

    from zhtune.models import embedded
    from zhtune.models.embedded import check_saved_tokenizer, embedded_model_dir

    source = embedded_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)
    real = transformers.AutoTokenizer.from_pretrained

    class CharLevel:  # what GemmaTokenizer made of a Unigram tokenizer.json
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    def from_pretrained(path, **kwargs):
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        return CharLevel() if config.get("tokenizer_class") != "PreTrainedTokenizerFast" else real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    check_saved_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert embedded.probe_ids(real(tmp_path)) == embedded.PROBE_IDS

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharLevel())
    with pytest.raises(RuntimeError, match="cannot convert the embedded model"):
        check_saved_tokenizer(tmp_path)


def test_env_switches_read_one_way(monkeypatch):
    """Every on/off variable (USE_HF, the hub's offline ones, the ZHTUNE_PT_* levers, ZHTUNE_FLEX_TILES) reads
    1/true/yes/on and 0/false/no/off in any case; unset or anything else keeps its default."""
    from zhtune.env import env_switch
    monkeypatch.delenv("ZHTUNE_X", raising=False)
    assert env_switch("ZHTUNE_X", True) and not env_switch("ZHTUNE_X", False)
    for word in ("0", "false", "No", " OFF "):
        monkeypatch.setenv("ZHTUNE_X", word)
        assert not env_switch("ZHTUNE_X", True) and not env_switch("ZHTUNE_X", False)
    for word in ("1", "TRUE", "yes", "on"):
        monkeypatch.setenv("ZHTUNE_X", word)
        assert env_switch("ZHTUNE_X", True) and env_switch("ZHTUNE_X", False)
    monkeypatch.setenv("ZHTUNE_X", "maybe")
    assert env_switch("ZHTUNE_X", True) and not env_switch("ZHTUNE_X", False)
