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


# ---------------------------------------------------------------- realistic questions (issue 17, item 4)

def test_all_lists_every_layout_even_when_nothing_fits(capsys):
    rc, out, err = _run(capsys, "llama3-70b", "--seq-len", "1M", "--gpus", "8", "--all", "--plain")
    assert rc == 2 and "nothing fits" in err
    assert "ring sp=8" in out and "ulysses sp=8" in out  # the table the user asked for, infeasible rows too
    assert len([line for line in out.splitlines() if " no " in line or " n/a " in line]) > 5


def test_json_errors_reach_stdout(capsys):
    for argv in (["llama3-8b", "--seq-len", "8k", "--gpus", "6", "--tp", "4", "--json"],
                 ["llama3-70b", "--seq-len", "1M", "--gpus", "8", "--json"]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 2 and err.startswith("seqpar plan: error: ")
        assert json.loads(out)["error"] == err.strip()[len("seqpar plan: error: "):]


def test_the_fix_is_written_as_the_flags_typed(capsys):
    rc, _, err = _run(capsys, "llama3-70b", "--seq-len", "64k", "--gpus", "2", "--recompute", "selective",
                      "--zero-stage", "1", "--no-offload-optimizer")
    assert rc == 2 and "nothing fits" in err
    assert "dropping --recompute selective" in err and "dropping --zero-stage 1" in err
    assert "dropping --no-offload-optimizer" in err and "more --gpus" in err and "a shorter --seq-len" in err
    assert "=" not in err.split("; try ")[1]  # no Python keyword syntax in the advice


def test_sp_degrees_that_do_not_divide_the_sequence_are_padded(capsys):
    p = seqpar.plan("llama3-8b", 1000, 16, strategies=["ring"])
    ring16 = [c for c in p.candidates if c.sp == 16]
    assert ring16 and ring16[0].feasible and ring16[0].padded_len == 1024 and "padded to 1024" in ring16[0].reason
    rc, out, _ = _run(capsys, "llama3-8b", "--seq-len", "1001", "--gpus", "8", "--sp", "8", "--plain")
    assert rc == 0 and "padded to 1008" in out


def test_ties_go_to_data_parallelism_which_communicates_less():
    # links so fast that nothing is exposed: sp=4 and dp=4 run the same tokens per second
    p = seqpar.plan("tiny", 4096, 4, tp=1, strategies=["none", "ring"], nvlink_gbps=1e9, ib_gbps=1e9,
                    recompute="none", zero_stage=0, mlp_tiles=1, loss_chunk=0)
    ring = next(c for c in p.candidates if c.strategy == "ring" and c.sp == 4)
    assert ring.time.tokens_per_s == pytest.approx(p.recommended.time.tokens_per_s, rel=1e-9)
    assert p.recommended.label == "none dp=4" and ring.memory.total < p.recommended.memory.total


def test_inference_honours_tp_and_refuses_training_flags(capsys):
    rc, _, err = _run(capsys, "llama3-8b", "--seq-len", "8k", "--gpus", "8", "--inference", "--tp", "3")
    assert rc == 2 and "tp=3" in err
    rc, out, _ = _run(capsys, "llama3-8b", "--seq-len", "8k", "--gpus", "8", "--inference", "--tp", "2", "--json")
    assert rc == 0 and {o["tp"] for o in json.loads(out)["options"]} == {2}
    for flag in (["--strategies", "ring"], ["--sp", "4"], ["--recompute", "full"], ["--zero-stage", "3"]):
        rc, _, err = _run(capsys, "llama3-8b", "--seq-len", "8k", "--gpus", "8", "--inference", *flag)
        assert rc == 2 and f"{flag[0]} plan(s) training, not --inference" in err


@pytest.mark.parametrize("argv", [
    ["--plot", "/nonexistent/dir/plan.png"], ["--emit-config", "/nonexistent/dir/run.toml"],
    ["--peak-tflops", "-5"], ["--utilization", "2"], ["--loss-chunk", "-1"], ["--mlp-tiles", "0"],
    ["--offload", "--recompute", "selective"], ["--host-memory", "-1"],
])
def test_bad_input_is_one_line_and_a_nonzero_status(capsys, argv):
    if "--plot" in argv:
        pytest.importorskip("matplotlib")
    rc, _, err = _run(capsys, "llama3-8b", "--seq-len", "32k", "--gpus", "8", *argv)
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("seqpar plan: error: "), err


# ---------------------------------------------------------------- memory settings (issue 16)

def test_readme_example_recommends_a_layout(capsys):
    rc, out, _ = _run(capsys, "llama3-70b", "--seq-len", "128k", "--gpus", "32", "--plain")
    assert rc == 0 and out.startswith("Recommended: ")
    best = seqpar.plan("llama3-70b", 131072, 32).recommended
    assert best.fits and best.settings.label in out


def test_max_seq_len_answers_the_longest_sequence_and_how(capsys):
    rc, out, _ = _run(capsys, "llama3-8b", "--gpus", "8", "--max-seq-len", "--accounting", "seqpar", "--json")
    d = json.loads(out)
    assert rc == 0 and d["max_seq_len"] >= 4 * 2**20  # ALST: 3.7M on 8 H100s
    assert d["recommended"]["fits"] and d["seq_len"] == d["max_seq_len"]
    longer = seqpar.plan.max_seq_len("llama3-8b", 8, implementation="seqpar", param_bytes=2, grad_bytes=2,
                                     optimizer_bytes=4)
    assert longer.seq_len == d["max_seq_len"]
    with pytest.raises(seqpar.ConfigError, match="nothing fits"):
        seqpar.plan("llama3-8b", longer.seq_len + 2 * longer.step, 8, implementation="seqpar", param_bytes=2,
                    grad_bytes=2, optimizer_bytes=4)
