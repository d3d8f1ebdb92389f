"""wire.tokenizer agrees with transformers' AutoTokenizer on our checkpoints (ids, text, chat template,
special tokens) and never imports torch."""

import json
import os
import subprocess
import sys

import pytest

from pdserve.tools.make_tokenizer import family_special_tokens
from pdserve.wire.errors import CheckpointError
from pdserve.wire.tokenizer import load_tokenizer

TEXTS = [
    "Hello world! The model reads tokens.",
    "",
    "  leading and trailing spaces  ",
    "numbers 12345 and 3.14159, punctuation: ;!?",
    "ünïcödé, 日本語, emoji 🙂 and a tab\tand newline\n",
    "<|im_start|>user\nhi<|im_end|> inline special tokens <|end_of_text|>",
    "def add(a, b):\n    return a + b\n",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}],
        }
    ],
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def pair(request, model_dirs):
    from transformers import AutoTokenizer

    path = model_dirs[request.param]
    return request.param, load_tokenizer(path), AutoTokenizer.from_pretrained(path)


def test_encode_matches_hf(pair):
    _, ours, hf = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(
                text, add_special_tokens=special
            ), text


def test_bos_only_for_llama_style_families(pair):
    family, ours, _ = pair
    ids = ours.encode("hello")
    if family == "qwen2":
        assert ours.bos_token_id is None and ids[0] != 0
    else:
        assert ours.bos_token_id == 0 and ids[0] == 0 and ids.count(0) == 1


def test_decode_matches_hf(pair):
    _, ours, hf = pair
    for text in TEXTS:
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(TEXTS[0], add_special_tokens=False)) == TEXTS[0]


def test_every_id_decodes_and_sizes_agree(pair, model_dirs):
    family, ours, hf = pair
    with open(os.path.join(model_dirs[family], "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert ours.vocab_size == len(ours) == len(hf) == vocab
    tokens = ours.convert_ids_to_tokens(range(vocab))
    assert None not in tokens and tokens == hf.convert_ids_to_tokens(list(range(vocab)))
    assert ours.decode(list(range(vocab)), skip_special_tokens=False) == hf.decode(list(range(vocab)))


def test_special_tokens_and_eos(pair):
    family, ours, hf = pair
    turn_end = family_special_tokens(family)["end_of_turn"]
    assert ours.eos_token_ids == frozenset({hf.eos_token_id, hf.convert_tokens_to_ids(turn_end)})
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.all_special_ids >= {1, 2, 3, 4}


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_hf(pair, generation_prompt):
    _, ours, hf = pair
    for messages in CHATS:
        text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.encode_chat(messages, add_generation_prompt=generation_prompt) == list(expected)


def test_chat_template_renders_the_family_format(model_dirs):
    text = load_tokenizer(model_dirs["llama"]).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_tokenizer_does_not_import_torch(model_dirs):
    code = (
        "import sys\n"
        "from pdserve.wire.tokenizer import load_tokenizer\n"
        f"t = load_tokenizer({model_dirs['llama']!r})\n"
        "t.decode(t.encode('hello there'))\n"
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_missing_tokenizer_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_tokenizer(str(tmp_path))


def test_a_hub_style_template_with_tojson_and_system_handling(model_dirs, tmp_path):
    """A template beyond ours (loops, conditionals, tojson, raise_exception) renders as transformers renders
    it."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "tok"
    shutil.copytree(model_dirs["llama"], path)
    template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set sys = 'default <system> & co' %}{% endif %}"
        "[SYS]{{ sys }}[/SYS]\n"
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    ours, hf = load_tokenizer(str(path)), AutoTokenizer.from_pretrained(str(path))
    messages = [{"role": "user", "content": 'héllo <b>"quoted"</b>'}, {"role": "assistant", "content": "ok"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
