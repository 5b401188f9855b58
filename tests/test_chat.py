"""Chat prompts (runtime/chat.py): messages rendered by the chat template a bundle carries give the
token ids transformers' apply_chat_template gives for the same folder; a bundle without a template,
a template that rejects the messages or reaches into Python internals, and bad messages are one clear
error; `nadoo generate --chat` answers a user message."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from lm_fixtures import tiny_model, tiny_tokenizer_json  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.lm_compile import compile_lm  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions  # noqa: E402
from nadoo.runtime.chat import render  # noqa: E402
from nadoo.runtime.errors import InputError  # noqa: E402

VOCAB = 400
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}model: {% else %}"
            "{{ m['role'] }}: {% endif %}{{ m['content'] | trim }}\n{% endfor %}"
            "{% if add_generation_prompt %}model:{% endif %}")
CHAT = [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over"},
        {"role": "user", "content": "the lazy dog?"}]


def folder(path: Path, template: str | None) -> Path:
    tiny_model("gemma3", vocab=VOCAB).save_pretrained(path)
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(VOCAB))
    cfg = {"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>"}
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    out = {}
    for name, template in (("chat", TEMPLATE), ("plain", None)):
        src = folder(d / name, template)
        compile_lm(src, d / f"{name}.ndc", CompileOptions(keep_float=True), quiet=True)
        out[name] = (src, d / f"{name}.ndc")
    return out


def test_chat_ids_equal_transformers_apply_chat_template(bundles):
    src, bundle = bundles["chat"]
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ref = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref)
    with nd.Session(bundle, policy=nd.Policy(bits="float")) as s:
        r = s.generate(messages=CHAT, max_new_tokens=6, stop_at_eos=False)
        assert r.prompt_ids == ref and ref.count(2) == 1  # BOS once: the template writes it
        again = s.generate(prompt_ids=ref, max_new_tokens=6, stop_at_eos=False)
    assert r.token_ids == again.token_ids and len(r.token_ids) == 6


def test_chat_errors_are_one_input_error(bundles):
    with nd.Session(bundles["plain"][1], policy=nd.Policy(bits="float")) as s:
        with pytest.raises(InputError, match="no chat template"):
            s.generate(messages=CHAT)
    with nd.Session(bundles["chat"][1], policy=nd.Policy(bits="float")) as s:
        for bad in ("hello", [], [{"role": "user"}], [{"role": 1, "content": "x"}]):
            with pytest.raises(InputError, match="message"):
                s.generate(messages=bad)
        with pytest.raises(InputError, match="one of"):
            s.generate("text", messages=CHAT)
    with pytest.raises(InputError, match="rejects these messages: roles"):
        render("{{ raise_exception('roles must alternate') }}", CHAT)
    with pytest.raises(InputError, match="chat template failed"):  # the sandbox: no Python internals
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}", CHAT)
    with pytest.raises(InputError, match="chat template failed"):
        render("{% for %}", CHAT)


def test_cli_chat(bundles):
    def nadoo(*args):
        return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=180)

    bundle = bundles["chat"][1]
    r = nadoo("generate", bundle, "--chat", "--prompt", "the lazy dog?", "--max-new-tokens", "4", "--bits", "float",
              "--no-eos", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    with nd.Session(bundle, policy=nd.Policy(bits="float")) as s:
        ids = s.generate(messages=[{"role": "user", "content": "the lazy dog?"}], max_new_tokens=1).prompt_ids
    assert out["prompt_tokens"] == len(ids) and len(out["token_ids"]) == 4
    r = nadoo("generate", bundles["plain"][1], "--chat", "--prompt", "hi")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no chat template" in lines[0]
    r = nadoo("generate", bundle, "--chat", "--prompt-ids", "2,5")
    assert r.returncode == 2 and "--chat formats a text --prompt" in r.stderr
