"""The needle task (``data.kind = "needle"``): needles planted in the first half of a haystack, asked for in
the second half; labels only at the questions, each a copy of its needle; needle tokens never in the haystack;
every mistake in its config named."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.train.data import NeedleTask, make_data

IGNORE = -100


def _task(**kw) -> NeedleTask:
    args = {"pairs": 3, "keys": 4, "values": 8, "filler": 10, "questions": 40, "repeat": 2, **kw}
    vocab = args["filler"] + args["keys"] + args["keys"] * args["values"]
    return NeedleTask(vocab_size=vocab, seq_len=512, seed=1, **args)


def test_shapes_and_labels_only_on_questions():
    task = _task()
    ids, labels = task.batch(0, 5)
    assert ids.shape == labels.shape == (5, 512) and ids.dtype == labels.dtype == torch.long
    questions = (ids >= 10) & (ids < 14)
    assert bool(((labels != IGNORE) == questions).all())  # a label exactly at each question, nowhere else
    assert (questions.sum(1) == 40).all() and bool((questions.nonzero()[:, 1] >= 256).all())  # second half
    assert bool(((labels[questions] >= 14) & (labels[questions] < 14 + 32)).all())  # answers are needle tokens


def test_each_question_is_answered_by_its_needle_planted_before_it_in_the_first_half():
    task = _task()
    ids, labels = task.batch(3, 4)
    for b in range(4):
        needles = (ids[b] >= 14).nonzero()[:, 0]
        assert len(needles) == 3 * 2 and int(needles.max()) < 256  # 3 needles x 2 copies, in the first half
        planted = {(int(ids[b, i]) - 14) // 8: int(ids[b, i]) for i in needles}  # key -> needle token
        assert len(planted) == 3  # distinct keys
        for i in (labels[b] != IGNORE).nonzero()[:, 0]:
            key = int(ids[b, i]) - 10
            assert int(labels[b, i]) == planted[key]  # the needle of the key asked
            assert int(needles[ids[b, needles] == labels[b, i]].max()) < int(i)  # planted before the question


def test_needle_values_never_appear_in_the_filler():
    task = _task(pairs=1, keys=1, values=16, filler=16, repeat=1)
    ids, _ = task.batch(0, 8)
    needles = ids >= 17
    assert (needles.sum(1) == 1).all()  # each sequence: one needle token, the rest filler or questions
    assert bool((ids[~needles & (ids != 16)] < 16).all())


def test_batches_are_deterministic_per_step_and_differ_between_steps():
    task = _task()
    a, b, c = task.batch(5, 2), task.batch(5, 2), task.batch(6, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_make_data_builds_it_with_its_keys():
    task = make_data({"kind": "needle", "pairs": 2, "keys": 3, "values": 4, "filler": 5, "questions": 7,
                      "repeat": 3}, 5 + 3 + 12, 64, 0)
    assert isinstance(task, NeedleTask) and (task.pairs, task.keys, task.values, task.filler, task.questions,
                                             task.repeat) == (2, 3, 4, 5, 7, 3)
    with pytest.raises(seqpar.ConfigError, match=r"unknown key\(s\) \['kinds'\] in \[data\] \(kind = 'needle'\)"):
        make_data({"kind": "needle", "kinds": 2}, 100, 64, 0)


@pytest.mark.parametrize("kw,message", [
    ({"pairs": 0}, "needle task: pairs=0 must be >= 1"),
    ({"values": 1}, "needle task: values=1 must be >= 2"),
    ({"filler": 0}, "needle task: filler=0 must be >= 1"),
    ({"questions": 0}, "needle task: questions=0 must be >= 1"),
    ({"repeat": 0}, "needle task: repeat=0 must be >= 1"),
    ({"pairs": 5, "keys": 4}, "needle task: 5 pairs need 5 distinct keys but keys=4"),
    ({"vocab_size": 40}, "need a vocabulary of 46 tokens but vocab_size=40"),
    ({"repeat": 100}, "seq_len=512 cannot hold 3 facts x 100 copies in its first half"),
    ({"questions": 300}, "seq_len=512 cannot hold 300 questions in its second half"),
])
def test_config_errors_are_named(kw, message):
    args = {"vocab_size": 46, "seq_len": 512, "pairs": 3, "keys": 4, "values": 8, "filler": 10, "questions": 40,
            **kw}
    with pytest.raises(seqpar.ConfigError, match=message):
        NeedleTask(**args)
