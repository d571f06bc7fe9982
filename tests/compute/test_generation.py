"""Tokenizer, chat template, stop handling and the generation loop on the real SmolLM2."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inferencemesh.compute.generation import TextStream
from inferencemesh.compute.sampling import SamplingParams
from inferencemesh.compute.tokenizer import ChatTemplateError, Tokenizer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.load(smollm2_dir)


@pytest.mark.parametrize(
    "messages",
    [
        FRANCE,
        [{"role": "system", "content": "Be brief."}, *FRANCE],
        [*FRANCE, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}],
    ],
)
def test_chat_template_matches_transformers(smollm2_dir: Path, tokenizer: Tokenizer, messages) -> None:
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = reference(
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert tokenizer.encode_chat(messages) == expected_ids


def test_eos_and_missing_template(smollm2_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    assert tokenizer.eos_token_ids == {2}  # <|im_end|>
    for name in ("tokenizer.json", "config.json"):  # a model directory without a chat template
        shutil.copy(smollm2_dir / name, tmp_path / name)
    bare = Tokenizer.load(tmp_path)
    assert bare.encode("Paris") == tokenizer.encode("Paris")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.render_chat(FRANCE)


def test_text_stream_holds_back_possible_stop_strings(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    stream = TextStream(tokenizer, stop_strings=["Paris", "Rome"])
    deltas = [stream.push(token) for token in ids]
    assert stream.stopped and stream.text == "The capital of France is "
    assert "".join(deltas) + stream.flush() == stream.text
    assert not any("Pa" in delta for delta in deltas)
    with pytest.raises(ValueError):
        TextStream(tokenizer, stop_strings=[""])


def test_generation_stops_on_stop_string_and_length(smollm2_local) -> None:
    prompt = smollm2_local.tokenizer.encode_chat(FRANCE)
    seen: list[str] = []
    stopped = smollm2_local.generate(prompt, max_new_tokens=20, stop_strings=[" Paris"], on_text=seen.append)
    assert (stopped.text, stopped.finish_reason) == ("The capital of France is", "stop")
    assert "".join(seen) == stopped.text
    short = smollm2_local.generate(prompt, max_new_tokens=3)
    assert (len(short.token_ids), short.finish_reason, short.text) == (3, "length", "The capital of")
    assert all(len(manager) == 0 for manager in smollm2_local.caches)  # sessions were freed


def test_seeded_sampling_is_reproducible(smollm2_local) -> None:
    prompt = smollm2_local.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story."}])
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=11)
    first = smollm2_local.generate(prompt, max_new_tokens=12, sampling=params)
    again = smollm2_local.generate(prompt, max_new_tokens=12, sampling=params)
    greedy = smollm2_local.generate(prompt, max_new_tokens=12)
    assert first.token_ids == again.token_ids
    assert first.token_ids != greedy.token_ids


def test_runtime_path_does_not_import_transformers(smollm2_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from inferencemesh.compute.generation import LocalModel
        model = LocalModel.load({str(smollm2_dir)!r}, splits=[(0, 15), (15, 30)], progress=False)
        result = model.generate(model.tokenizer.encode_chat({FRANCE!r}), max_new_tokens=8)
        print(result.text)
        assert "transformers" not in sys.modules, "transformers was imported"
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "The capital of France is Paris."
