"""decode/text.py on SmolLM2 with its real tokenizer: text in, text out, greedy text identical to ar's."""

import subprocess
import sys

import pytest

from decode import TextDecoder
from heads import UserError, build_head, load_base

pytestmark = pytest.mark.integration

PROMPT = "Name three rivers in Africa."


@pytest.fixture(scope="module")
def smollm2_head(tmp_path_factory):
    """An untrained layer-15 MLP head on the embedded SmolLM2 (the logit lens: some drafts right)."""
    folder = tmp_path_factory.mktemp("smollm2-head") / "mlp15"
    base = load_base("smollm2", layers=range(0, 1), lm_head=False)
    build_head(base, "mlp", exit_layer=15).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def ar_text():
    with TextDecoder.from_pretrained(threads=1) as dec:  # no head: auto -> ar
        assert dec.method == "ar" and dec.settings["why"] == "no exit head"
        return dec.generate(PROMPT, 24), dec.last_generation.tokens


@pytest.mark.parametrize("method", ["eesd", "ppsd"])
def test_greedy_text_is_ars_text(smollm2_head, ar_text, method):
    text, tokens = ar_text
    with TextDecoder.from_pretrained(smollm2_head, method=method, threads=1, stage_threads=1) as dec:
        assert dec.settings["dtype"] in ("bfloat16", "float32")  # dtype=auto resolved as the CLI does
        pieces = list(dec.stream(PROMPT, 24))
        assert dec.last_generation.tokens == tokens
        assert "".join(pieces) == text and len(pieces) > 3 and text.strip()
        if method == "eesd":  # a list: one prompt after another (a string and the same chat as messages)
            assert dec.generate([PROMPT, [{"role": "user", "content": PROMPT}]], 24) == [text, text]
        assert 0 <= dec.last_generation.acceptance_rate <= 1


def test_auto_picks_ar_on_one_device_and_says_why(smollm2_head):
    with TextDecoder.from_pretrained(smollm2_head, threads=1) as dec:
        assert dec.method == "ar" and "one device" in dec.settings["why"]
        text = dec.generate(PROMPT, 4, temperature=0.8, top_p=0.9, top_k=20, seed=1)
        assert isinstance(text, str) and text
        with pytest.raises(UserError, match="stream takes one prompt"):
            list(dec.stream([PROMPT, PROMPT]))
        with pytest.raises(UserError, match="a prompt is a string or chat messages"):
            dec.generate([{"text": "hi"}])


def test_a_script_without_the_main_guard_is_told_before_any_stage_starts(smollm2_head, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(f"from decode import TextDecoder\nTextDecoder.from_pretrained({smollm2_head!r}, method='ppsd')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert 'put the code that decodes under `if __name__ == "__main__":`' in done.stderr.strip().splitlines()[-1]


def _answers(output: str) -> tuple[list[str], list[str]]:
    """(answers, figure lines) of a piped interactive session's output."""
    blocks = output.split("\n[")
    return [b.split("]\n", 1)[-1].strip() for b in blocks[:-1]], [b.split("]\n", 1)[0] for b in blocks[1:]]


def test_interactive_mode_streams_ar_s_answers_from_piped_stdin(smollm2_head, tmp_path):
    """Two turns of one conversation through `python -m decode interactive=true` (eesd), against the same
    conversation decoded by ar in-process: the same answers; every answer ends with the method, tokens/s, α."""
    import io
    import os

    from omegaconf import OmegaConf

    from decode.chat import chat

    turns = "Name three rivers in Africa.\n\nAnd in Europe?\n"
    args = ["interactive=true", "method=eesd", f"head_path={smollm2_head}", "max_new_tokens=12", "threads=1",
            f"hydra.run.dir={tmp_path}"]
    env = os.environ | {"PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-m", "decode", *args], input=turns, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    header, _, session = done.stdout.partition("temperature=0.0\n")
    assert header.splitlines()[-1].startswith("eesd (asked for) on cpu")
    answers, figures = _answers(session)
    assert len(answers) == 2 and all(f.startswith("eesd · 12 tokens · ") and " tokens/s · α " in f for f in figures)

    cfg = OmegaConf.load("conf/decode.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.merge_with({"interactive": True, "method": "ar", "max_new_tokens": 12, "threads": 1})
    out = io.StringIO()
    chat(cfg, stdin=io.StringIO(turns), out=out)
    ar_answers, ar_figures = _answers(out.getvalue().partition("temperature=0.0\n")[2])
    assert ar_answers == answers and all(f.startswith("ar · 12 tokens · ") and "α" not in f for f in ar_figures)
