"""``seqpar plan``: table, JSON, plot, and bad input named with its fix before planning."""
from __future__ import annotations

import json
import sys

import pytest

import seqpar.plan
from seqpar.cli import main
from seqpar.cli.plan import parse_tokens


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_starts_with_the_recommendation_and_its_reason(capsys):
    rc, out, _ = _run(capsys, "llama3-8b", "--seq-len", "128k", "--gpus", "32")
    expected = seqpar.plan("llama3-8b", 131072, 32)
    assert rc == 0
    first, second = out.splitlines()[:2]
    assert first.startswith(f"Recommended: {expected.recommended.label}  (llama3-8b, 131072 tokens, 32 GPUs")
    assert second == f"Why: {expected.reason}"
    assert expected.recommended.label in out.split("Why:")[1]  # and in the table


def test_plain_table_and_explicit_sizes(capsys):
    rc, out, _ = _run(capsys, "--hidden", "1024", "--heads", "16", "--layers", "24", "--ffn", "4096", "--vocab",
                      "32000", "--seq-len", "32768", "--gpus", "4", "--plain", "--limit", "3")
    assert rc == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("layout"))
    assert all(col in header for col in ("tp", "sp", "total GB", "tok/s", "note"))
    assert sum(line.startswith(("*", "   ")) for line in lines[lines.index(header) + 2:]) == 3


def test_json_parses_and_matches_the_api(capsys):
    rc, out, _ = _run(capsys, "llama3-70b", "--seq-len", "65536", "--gpus", "64", "--tp", "8", "--json")
    assert rc == 0
    d = json.loads(out)
    api = seqpar.plan("llama3-70b", 65536, 64, tp=8)
    assert d["recommended"]["label"] == api.recommended.label
    assert len(d["candidates"]) == len(api.candidates) > 1
    assert all(c["degrees"]["tp"] == 8 for c in d["candidates"])


def test_seqpar_accounting_changes_the_memory(capsys):
    _, paper, _ = _run(capsys, "llama3-8b", "--seq-len", "32k", "--gpus", "8", "--json")
    _, ours, _ = _run(capsys, "llama3-8b", "--seq-len", "32k", "--gpus", "8", "--json", "--accounting", "seqpar")
    a, b = json.loads(paper), json.loads(ours)
    assert b["settings"]["implementation"] == "seqpar"
    assert a["recommended"]["memory"]["activations"] != b["recommended"]["memory"]["activations"]


@pytest.mark.parametrize("argv,message", [
    (["llama3-8b", "--seq-len", "8k", "--gpus", "6", "--tp", "4"],
     "--tp 4 does not divide --gpus 6: choose --tp from 1, 2, 3, 6"),
    (["llama3-8b", "--seq-len", "8k", "--gpus", "6", "--tp", "3"], "does not divide the 32 attention heads"),
    (["llama3-8b", "--seq-len", "8k", "--gpus", "6", "--ulysses", "3"],
     "32 attention heads of llama3-8b are not divisible by --ulysses 3: choose --ulysses from 2"),
    (["llama3-8b", "--seq-len", "1001", "--gpus", "8", "--sp", "8"],
     "--seq-len 1001 cannot be split over --sp 8: use a multiple of 8 (e.g. 1000 or 1008)"),
    (["llama3-8b", "--seq-len", "8k", "--gpus", "8", "--sp", "3"], "--sp 3 does not divide --gpus 8"),
    (["llama9", "--seq-len", "8k"], "unknown model 'llama9'; known models: gpt3-175b"),
    (["--hidden", "4096", "--heads", "32", "--seq-len", "8k"], "missing --layers, --ffn, --vocab"),
    (["llama3-70b", "--seq-len", "1M", "--gpus", "8"], "nothing fits in 80 GB per GPU"),
])
def test_bad_input_exits_2_with_the_fix(capsys, argv, message):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("seqpar plan: error: ") and message in err, err


def test_config_file_missing_key_is_named(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}))
    rc, _, err = _run(capsys, "--config", str(path), "--seq-len", "4096")
    assert rc == 2 and "missing required key(s)" in err and "'vocab_size'" in err and "--vocab" in err
    rc, out, _ = _run(capsys, "--config", str(path), "--ffn", "128", "--vocab", "100", "--seq-len", "4096",
                      "--gpus", "2")
    assert rc == 0 and out.startswith("Recommended: ")


def test_seq_len_suffixes():
    assert parse_tokens("131072") == parse_tokens("128k") == 131072
    assert parse_tokens("1M") == 2 ** 20
    with pytest.raises(Exception, match="not a token count"):
        parse_tokens("lots")


def test_plot_without_matplotlib_fails_before_planning(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    rc, out, err = _run(capsys, "llama3-8b", "--seq-len", "8k", "--plot", str(tmp_path / "p.png"))
    assert rc == 2 and out == "" and "--plot needs matplotlib" in err


def test_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plan.png"
    rc, out, _ = _run(capsys, "llama3-8b", "--seq-len", "32k", "--gpus", "8", "--plot", str(path))
    assert rc == 0 and path.stat().st_size > 1000 and f"plot written to {path}" in out


def test_module_is_callable_and_keeps_its_functions():
    p = seqpar.plan("tiny", 1024, 2, gpu_memory_gb=1.0)
    assert isinstance(p, seqpar.plan.Plan) and p.recommended.fits
    assert seqpar.plan.plan("tiny", 1024, 2, gpu_memory_gb=1.0).recommended.label == p.recommended.label
    assert seqpar.plan.activation_memory_per_layer("tiny", 1024, 1) > 0
