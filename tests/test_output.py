"""Output for people: each command's --help, the table at the end of python -m decode, the benchmark's plot."""

import subprocess
import sys

import pytest

from decode.report import methods_table


@pytest.mark.parametrize("command,must,must_not", [
    ("decode", ["top_p=1.0", "interactive=false", "method=ppsd"], ["__main__", "data=", "deepspeed", "head.lr"]),
    ("train", ["data=default", "one of default|large|tiny|xlarge", "head.lr=", "exit_layer=15"], ["__main__", "gamma="]),
    ("scripts.benchmark", ["prompts=", "decode/prompts/default.jsonl", "theory.layer_ms="], ["__main__", "  exit_layers=", "heads=[mlp]"]),
])
def test_help_lists_the_commands_own_options_one_line_each(command, must, must_not):
    done = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines()[0] == f"usage: python -m {command} [key=value ...]"
    for text in must:
        assert text in out
    for text in must_not:
        assert text not in out
    options = [line for line in out.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    assert len(options) == len({line.split()[0].split("=")[0] for line in options}) > 5  # each once, one line


def test_the_table_has_a_row_per_method_and_both_speeds():
    figures = lambda tps, dtps, speedup, alpha: {"tokens_per_s": tps, "decode_tokens_per_s": dtps,  # noqa: E731
                                                 "speedup_vs_ar": speedup, "predicted_speedup": speedup,
                                                 "acceptance_rate": alpha}
    result = {"method": "ppsd", "figures": figures(12.0, 13.5, 0.8, 0.41), "temperature": 0.0,
              "compare": {"ar": figures(15.0, 16.0, 1.0, None), "eesd": figures(6.0, 6.2, 0.4, 0.4)},
              "lossless_by_method": {"ppsd": True, "eesd": False}, "model": "m", "dtype": "bfloat16",
              "device": "cpu", "questions": 2, "max_new_tokens": 8}
    rows = [line for line in methods_table(result).splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["method", "ar", "ppsd", "eesd"]
    assert rows[2].split("|")[2:8] == [" 12.0     ", " 13.5            ", " 0.80×         ", " 0.80×     ",
                                       " 0.41 ", " yes         "]
    assert "NO" in rows[3] and "(reference)" in rows[1]
    assert "prefill included" in methods_table(result) and "prefill excluded" in methods_table(result)
