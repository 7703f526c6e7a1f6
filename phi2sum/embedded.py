"""The embedded default: a synthetic XSum-shaped corpus and a tiny Phi built from it on the fly.

Why: the project must run end to end offline on a CPU, without downloading microsoft/phi-2 or XSum.
`EMBEDDED_DATA` names a deterministic news corpus whose one-sentence summaries restate the key facts of
their article in a fixed-ish pattern per story type, so a very small model can learn the task in minutes.
`EMBEDDED_MODEL` names a tiny randomly initialised `PhiForCausalLM` (same architecture as Phi-2, so every
code path - 4-bit loading, LoRA on q_proj/k_proj/v_proj/dense, generation - is the real one) with a
byte-level BPE tokenizer trained on the corpus. The base gets a short plain-text pre-training on the
train split (documents and summaries as separate sequences, never in the prompt format), so it knows the
language of the corpus but not the article -> summary task; fine-tuning then has something to adapt.

The model is built once and cached in a folder named after a hash of its recipe and corpus, so changing
either rebuilds it, and concurrent callers (e.g. Ray workers) wait on a file lock and reuse one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from phi2sum.errors import DataError, TrainingError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:tiny-phi"
EMBEDDED_DATA = "embedded:synthetic-xsum"

EOS_TOKEN = "<|endoftext|>"  # Phi-2's single special token: bos, eos and unk at once.
BUILD_INFO_FILE = "phi2sum_build.json"  # written last inside the build; its presence marks a complete build.

SPLIT_SIZES = {"train": 480, "validation": 60, "test": 120}
CORPUS_VERSION = 1  # bump when the generator changes in a way the corpus hash would not show

# Everything that decides the built model. Its hash (with the corpus text) names the cache folder.
RECIPE = {
    "recipe_version": 1,
    "tokenizer": {"type": "byte-level-bpe", "vocab_size": 2000, "min_frequency": 2},
    "model": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "partial_rotary_factor": 0.4,  # as in Phi-2
        "hidden_act": "gelu_new",
        "seed": 1234,
    },
    "pretrain": {
        "steps": 250,
        "doc_batch_size": 12,
        "summary_batch_size": 48,
        "learning_rate": 3e-3,
        "warmup_steps": 12,
        "weight_decay": 0.01,
        "max_length": 256,
        "seed": 4321,
        "log_every": 20,
    },
}

# --------------------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------------------

FIRST_NAMES_M = [
    "James", "Oliver", "Harry", "George", "Thomas", "Daniel", "Samuel", "Joseph", "David", "Owen",
    "Aaron", "Callum", "Martin", "Rhys", "Ethan", "Lewis", "Adam", "Patrick", "Simon", "Kieran",
]
FIRST_NAMES_F = [
    "Emma", "Sophie", "Olivia", "Hannah", "Grace", "Chloe", "Lucy", "Megan", "Rachel", "Laura",
    "Amelia", "Isla", "Zara", "Helen", "Fiona", "Nadia", "Alice", "Ruth", "Claire", "Jessica",
]
SURNAMES = [
    "Walker", "Hughes", "Bennett", "Carter", "Fletcher", "Morgan", "Price", "Turner", "Hayes", "Doyle",
    "Barker", "Sutton", "Lloyd", "Marsh", "Porter", "Reeves", "Shaw", "Quinn", "Foster", "Holt",
    "Griffin", "Dawson", "Nash", "Pearce", "Kemp", "Rowe", "Ellis", "Booth", "Webb", "Chambers",
]
TOWNS = [
    "Ashford", "Kelby", "Brackley", "Dunmore", "Easton", "Fairhaven", "Glenbury", "Harwood", "Ivybridge",
    "Kirkdale", "Langford", "Marlow", "Newhaven", "Oakham", "Penrith", "Redhill", "Saltash", "Thornbury",
    "Upton", "Westbury", "Yarwell", "Alderley", "Barnsford", "Colbeck", "Dalston", "Elmstead", "Fenwick",
    "Greyhaven", "Holbrook", "Kingsmere", "Lydford", "Millbrook", "Northam", "Otterley", "Pembury",
    "Rosedale", "Stanwick", "Tolworth", "Whitmore", "Brookfield",
]
TEAM_SUFFIXES = ["Rovers", "Town", "United", "City", "Athletic", "Wanderers", "Albion", "Rangers"]
COMPETITIONS = ["County Cup", "Northern Trophy", "League Cup", "Challenge Cup", "Senior Shield", "Regional Cup"]
COMPANY_SECTORS = [
    "Foods", "Motors", "Energy", "Retail", "Homes", "Pharma", "Logistics", "Brewing", "Textiles", "Telecom",
]
PARTIES = ["Progress Party", "Civic Alliance", "Heritage Party", "Green Future Party", "Independent Group"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PERIODS = ["first half", "full year", "third quarter", "second quarter"]
JOURNALS = ["Nature Letters", "Journal of Field Biology", "Public Health Review", "Science Reports", "Ecology Today"]

# Article filler shared by every story type: varies the text without touching the facts of the summary.
GENERIC_FILLER = [
    "Local people have been sharing pictures on social media.",
    "Further updates are expected later this week.",
    "The story was first reported by the local newspaper.",
    "It is the second time this year that the town has made headlines.",
    "Residents said they had never seen anything like it.",
    "More details are expected to be released in the coming days.",
    "The news was welcomed by many in the area, although some remain cautious.",
    "Several people contacted the newsroom to share their views.",
    "Officials said they would publish a full statement shortly.",
    "A public meeting is planned for later this month to discuss the issue.",
    "Many people in the area had been following the story closely.",
    "Reporters were at the scene throughout the day.",
]


def _person(rng: random.Random) -> tuple[str, str]:
    """A (full name, pronoun) pair; the pronoun keeps quotes and sentences grammatical."""
    if rng.random() < 0.5:
        return f"{rng.choice(FIRST_NAMES_M)} {rng.choice(SURNAMES)}", "he"
    return f"{rng.choice(FIRST_NAMES_F)} {rng.choice(SURNAMES)}", "she"


def _towns(rng: random.Random, n: int) -> list[str]:
    return rng.sample(TOWNS, n)


def _sports(rng: random.Random) -> tuple[list[list[str]], str]:
    t1, t2 = _towns(rng, 2)
    s1, s2 = rng.sample(TEAM_SUFFIXES, 2)
    winner, loser = f"{t1} {s1}", f"{t2} {s2}"
    ws = rng.randint(2, 5)
    ls = rng.randint(0, ws - 1)
    score, day, comp = f"{ws}-{ls}", rng.choice(DAYS), rng.choice(COMPETITIONS)
    scorer, _ = _person(rng)
    manager, _ = _person(rng)
    minute, crowd = rng.randint(5, 88), rng.randint(800, 9000)
    lead = rng.choice([
        f"{winner} came from behind to beat {loser} {score} on {day} and book a place in the {comp} final.",
        f"{scorer} was on target as {winner} beat {loser} {score} in the {comp} semi-final on {day}.",
        f"{loser} are out of the {comp} after a {score} defeat by {winner} in {day}'s semi-final.",
        f"A {score} win over {loser} on {day} has sent {winner} through to the final of the {comp}.",
    ])
    support = [
        f"{scorer} opened the scoring after {minute} minutes with a low shot.",
        f"{loser} pushed for a late reply but could not find a way through.",
        f"A crowd of {crowd} watched the semi-final at {t1}.",
        f"It is the first time {winner} have reached the final in more than a decade.",
    ]
    quote = rng.choice([
        f"\"The players showed real character today,\" said {winner} manager {manager}.",
        f"{manager}, the {winner} manager, said: \"We never stopped believing and we deserve to be in the final.\"",
    ])
    summary = f"{winner} beat {loser} {score} on {day} to reach the {comp} final."
    return [[lead], rng.sample(support, rng.randint(2, 4)), [quote]], summary


def _company(rng: random.Random) -> tuple[list[list[str]], str]:
    company = f"{rng.choice(TOWNS + SURNAMES)} {rng.choice(COMPANY_SECTORS)}"
    boss, pronoun = _person(rng)
    pct, amount, period = rng.randint(3, 45), rng.randint(12, 480), rng.choice(PERIODS)
    staff = rng.randint(3, 90) * 100
    if rng.random() < 0.5:
        reason = rng.choice(["strong online sales", "lower energy costs", "new contracts abroad",
                             "a rise in demand", "cost cutting"])
        lead = rng.choice([
            f"{company} has reported a {pct}% rise in {period} profits to £{amount}m, helped by {reason}.",
            f"Profits at {company} climbed {pct}% to £{amount}m in the {period}, which the firm put down to {reason}.",
        ])
        summary = f"{company} said {period} profits rose by {pct}% to £{amount}m thanks to {reason}."
        quote = (f"\"This is a strong set of results and we are confident about the future,\" "
                 f"said chief executive {boss}.")
    else:
        reason = rng.choice(["higher energy costs", "weak consumer spending", "supply problems",
                             "falling prices", "the loss of a major customer"])
        lead = rng.choice([
            f"{company} has reported a {pct}% fall in {period} profits to £{amount}m, blaming {reason}.",
            f"Profits at {company} dropped {pct}% to £{amount}m in the {period}, hit by {reason}.",
        ])
        summary = f"{company} said {period} profits fell by {pct}% to £{amount}m because of {reason}."
        quote = f"\"It has been a difficult period but the business remains sound,\" said chief executive {boss}."
    support = [
        f"The company employs about {staff} people.",
        "Shares in the firm moved sharply in early trading.",
        f"{boss} said {pronoun} expected the next few months to be busy.",
        "Analysts had expected a smaller change.",
    ]
    return [[lead], rng.sample(support, rng.randint(2, 4)), [quote]], summary


def _weather(rng: random.Random) -> tuple[list[list[str]], str]:
    town, other = _towns(rng, 2)
    day = rng.choice(DAYS)
    spokes, _ = _person(rng)
    kind = rng.choice(["flood", "storm", "snow"])
    if kind == "flood":
        homes, mm, hours = rng.randint(20, 400), rng.randint(40, 120), rng.randint(2, 12)
        lead = (f"Around {homes} homes in {town} were flooded on {day} "
                f"after {mm}mm of heavy rain fell in just {hours} hours.")
        support = [f"Roads between {town} and {other} were closed as water levels rose.",
                   "Sandbags were handed out to residents at the town hall.",
                   "Forecasters said the worst of the rain had now passed."]
        summary = f"Heavy rain flooded around {homes} homes in {town} on {day}, after {mm}mm fell in {hours} hours."
    elif kind == "storm":
        homes, mph = rng.randint(500, 9000), rng.randint(60, 95)
        lead = (f"A storm with winds of up to {mph}mph brought down trees "
                f"and cut power to {homes} homes in {town} on {day}.")
        support = ["Engineers worked through the night to restore supplies.",
                   f"A tree fell on to the main road into {town}, blocking it for several hours.",
                   "The storm is expected to ease by the weekend."]
        summary = f"Storm winds of up to {mph}mph left {homes} homes in {town} without power on {day}."
    else:
        schools, cm = rng.randint(5, 60), rng.randint(5, 30)
        lead = (f"More than {schools} schools in and around {town} were closed on {day} "
                f"after {cm}cm of heavy snow fell overnight.")
        support = [f"Gritters were out on the roads between {town} and {other}.",
                   "Bus services were cancelled for most of the morning.",
                   "Parents were told to check the council website for updates."]
        summary = f"Heavy snow of {cm}cm closed more than {schools} schools around {town} on {day}."
    quote = f"\"Please only travel if you really need to,\" said {spokes} of the emergency services."
    return [[lead], rng.sample(support, rng.randint(2, 3)), [quote]], summary


def _election(rng: random.Random) -> tuple[list[list[str]], str]:
    town = rng.choice(TOWNS)
    winner, pronoun = _person(rng)
    second, _ = _person(rng)
    p1, p2 = rng.sample(PARTIES, 2)
    v2 = rng.randint(400, 2500)
    majority = rng.randint(30, 900)
    v1, turnout, day = v2 + majority, rng.randint(18, 45), rng.choice(DAYS)
    gain = rng.random() < 0.5
    lead = (f"{winner} of the {p1} has won the {town} by-election with {v1} votes, "
            f"ahead of {second} of the {p2} on {v2}.")
    if gain:
        history = f"The seat was previously held by the {p2}, so the result is a gain for the {p1}."
        summary = f"{winner} won the {town} by-election for the {p1}, gaining the seat from the {p2}."
    else:
        history = f"The {p1} held the seat with a majority of {majority}."
        summary = f"{winner} held the {town} seat for the {p1} with a majority of {majority} in the by-election."
    support = [history, f"Turnout was {turnout}%, lower than at the last election.",
               f"The count took place overnight after polls closed on {day}."]
    quote = f"\"I will work hard for everyone in {town},\" {winner} said after the result was declared."
    return [[lead], [support[0]] + rng.sample(support[1:], rng.randint(1, 2)), [quote]], summary


def _court(rng: random.Random) -> tuple[list[list[str]], str]:
    home, court_town = _towns(rng, 2)
    name, pronoun = _person(rng)
    judge, _ = _person(rng)
    noun = "man" if pronoun == "he" else "woman"
    age, years = rng.randint(19, 67), rng.randint(2, 12)
    crime = rng.choice(["burglary", "fraud", "dangerous driving", "arson", "robbery", "theft from employers"])
    lead = (f"A {age}-year-old {noun} from {home} has been jailed for {years} years for {crime} "
            f"after a trial at {court_town} Crown Court.")
    support = [
        f"{name}, {age}, was found guilty by a jury on {rng.choice(DAYS)}.",
        f"The court heard that {pronoun} had shown no remorse.",
        f"Police said the case had caused great distress in {home}.",
    ]
    quote = f"Judge {judge} told {name}: \"You knew exactly what you were doing.\""
    summary = f"{name}, {age}, from {home} has been jailed for {years} years at {court_town} Crown Court for {crime}."
    return [[lead], [support[0]] + rng.sample(support[1:], rng.randint(1, 2)), [quote]], summary


FINDINGS = [
    ("older adults who walk every day", "are {pct}% less likely to have memory problems"),
    ("hedgehogs in gardens with ponds", "live {pct}% longer on average"),
    ("children who read at bedtime", "sleep {pct}% longer than those who do not"),
    ("seedlings grown under blue light", "grow {pct}% faster"),
    ("bees living near busy roads", "collect {pct}% less pollen"),
    ("commuters who cycle to work", "take {pct}% fewer sick days"),
    ("cows that listen to music", "produce {pct}% more milk"),
]


def _science(rng: random.Random) -> tuple[list[list[str]], str]:
    town = rng.choice(TOWNS)
    subject, result = rng.choice(FINDINGS)
    result = result.format(pct=rng.randint(8, 60))
    lead_author, pronoun = _person(rng)
    n, years, journal = rng.randint(120, 5000), rng.randint(2, 10), rng.choice(JOURNALS)
    lead = rng.choice([
        f"Scientists at the University of {town} say {subject} {result}, according to a study in {journal}.",
        f"A study by the University of {town}, published in {journal}, suggests that {subject} {result}.",
    ])
    support = [
        f"The research followed {n} cases over {years} years.",
        "The scientists said more work was needed to understand why.",
        "Similar results have been reported in other countries.",
    ]
    quote = f"\"We were surprised by how large the effect was,\" said lead author {lead_author}."
    summary = f"University of {town} researchers who studied {n} cases found {subject} {result}."
    return [[lead], [support[0]] + rng.sample(support[1:], rng.randint(1, 2)), [quote]], summary


def _transport(rng: random.Random) -> tuple[list[list[str]], str]:
    t1, t2, t3 = _towns(rng, 3)
    day = rng.choice(DAYS)
    spokes, _ = _person(rng)
    if rng.random() < 0.6:
        cause = rng.choice(["a landslip", "a signal failure", "flooding on the track", "a damaged bridge"])
        lead = f"Trains between {t1} and {t2} will not run until {day} after {cause} near {t3}."
        support = ["Replacement buses are running between the stations.",
                   f"Engineers are working around the clock at {t3}.",
                   "Passengers have been told to allow extra time for their journeys."]
        summary = f"Trains between {t1} and {t2} are cancelled until {day} because of {cause} near {t3}."
        quote = f"\"We are sorry for the disruption,\" said {spokes}, a spokesperson for the rail operator."
    else:
        road = f"A{rng.randint(10, 699)}"
        cause = rng.choice(["a lorry crash", "a burst water main", "a fuel spill", "emergency repairs"])
        hours = rng.randint(3, 14)
        lead = f"The {road} between {t1} and {t2} was closed for {hours} hours on {day} after {cause}."
        support = ["Long queues built up on nearby roads.",
                   f"Drivers were diverted through {t3}.",
                   "Police thanked drivers for their patience."]
        summary = f"The {road} between {t1} and {t2} was shut for {hours} hours on {day} because of {cause}."
        quote = f"\"The road has now reopened,\" said {spokes} of the highways team."
    return [[lead], rng.sample(support, rng.randint(2, 3)), [quote]], summary


def _fire(rng: random.Random) -> tuple[list[list[str]], str]:
    town = rng.choice(TOWNS)
    street = f"{rng.choice(SURNAMES)} {rng.choice(['Road', 'Street', 'Lane', 'Avenue'])}"
    building = rng.choice(["warehouse", "primary school", "hotel", "farm barn", "block of flats", "pub"])
    crews, day = rng.randint(20, 90), rng.choice(DAYS)
    officer, _ = _person(rng)
    hurt = rng.randint(0, 4)
    outcome = {0: "no one was hurt", 1: "1 person was treated for smoke inhalation"}.get(
        hurt, f"{hurt} people were treated for smoke inhalation")
    lead = f"About {crews} firefighters tackled a large fire at a {building} on {street} in {town} on {day} night."
    support = [
        f"The fire service said {outcome}.",
        "Smoke could be seen for several miles.",
        "Nearby residents were told to keep their windows and doors closed.",
        "The cause of the fire is being investigated.",
    ]
    quote = f"Station manager {officer} said: \"Crews worked hard in difficult conditions.\""
    summary = f"About {crews} firefighters fought a fire at a {building} in {town} on {day} and {outcome}."
    return [[lead], [support[0]] + rng.sample(support[1:], rng.randint(1, 3)), [quote]], summary


def _council(rng: random.Random) -> tuple[list[list[str]], str]:
    town = rng.choice(TOWNS)
    project = rng.choice(["a new leisure centre", f"{rng.randint(2, 9) * 50} new homes", "a town centre bypass",
                          "a new library", "a park and ride site", "a solar farm"])
    cost, yes = rng.randint(3, 90), rng.randint(20, 40)
    no, year = rng.randint(2, 19), rng.randint(2027, 2031)
    leader, _ = _person(rng)
    lead = rng.choice([
        f"Plans for {project} in {town} have been approved by councillors, despite objections from residents.",
        f"Councillors in {town} have voted in favour of {project}, which has divided opinion in the town.",
    ])
    support = [
        f"The scheme, costing £{cost}m, was backed by {yes} votes to {no} at a meeting of {town} Council.",
        f"Work is due to be finished in {year}.",
        "Campaigners said they were disappointed by the decision.",
    ]
    quote = f"Council leader {leader} said: \"This is a good day for {town}.\""
    summary = f"{town} Council approved plans for {project}, costing £{cost}m, by {yes} votes to {no}."
    return [[lead], [support[0]] + rng.sample(support[1:], rng.randint(1, 2)), [quote]], summary


STORY_TYPES = [_sports, _company, _weather, _election, _court, _science, _transport, _fire, _council]

_STORY_OFFSET = {"train": 11, "validation": 22, "test": 33}  # rotates which story type each split starts with
_MIN_WORDS, _MAX_WORDS = 60, 160


def _assemble(rng: random.Random, paragraphs: list[list[str]]) -> str:
    """Lay sentences out as an article: add varying filler to reach the length range, newlines sometimes."""
    paragraphs = [list(p) for p in paragraphs]
    filler = rng.sample(GENERIC_FILLER, len(GENERIC_FILLER))
    extra = [filler.pop() for _ in range(rng.randint(1, 4))]
    paragraphs.insert(rng.randint(2, len(paragraphs)), extra)

    def words() -> int:
        return sum(len(s.split()) for p in paragraphs for s in p)

    while words() < _MIN_WORDS and filler:
        paragraphs[-1].append(filler.pop())
    while words() > _MAX_WORDS and len(extra) > 0:
        extra.pop()
    sep = "\n" if rng.random() < 0.6 else " "
    return sep.join(" ".join(p) for p in paragraphs if p)


def synthetic_records(split: str) -> list[dict]:
    """The synthetic XSum-shaped corpus for one split, identical on every call and machine.

    Each record is seeded from its split and index (string seeds hash with SHA-512, not Python's randomised
    hash), and ids carry the split name so splits never share an id.
    """
    if split not in SPLIT_SIZES:
        raise DataError(f"unknown split {split!r} for {EMBEDDED_DATA}; valid splits: {', '.join(SPLIT_SIZES)}")
    records = []
    for i in range(SPLIT_SIZES[split]):
        rng = random.Random(f"phi2sum-synthetic-v{CORPUS_VERSION}-{split}-{i}")
        story = STORY_TYPES[(i + _STORY_OFFSET[split]) % len(STORY_TYPES)]
        paragraphs, summary = story(rng)
        document = _assemble(rng, paragraphs)
        records.append({"id": f"syn-{split}-{i + 1:04d}", "document": document, "summary": summary})
    random.Random(f"phi2sum-order-{split}").shuffle(records)
    return records


# --------------------------------------------------------------------------------------------------
# Tokenizer, model, pre-training
# --------------------------------------------------------------------------------------------------


def _corpus_texts(splits: tuple[str, ...] = ("train", "validation", "test")) -> list[str]:
    """Every document and summary as separate texts: the tokenizer training and recipe-hash input."""
    return [text for s in splits for r in synthetic_records(s) for text in (r["document"], r["summary"])]


def train_tokenizer(texts: list[str]):
    """A byte-level BPE like Phi-2's (no unknown bytes), small enough that the embedding stays tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    cfg = RECIPE["tokenizer"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg["vocab_size"],
        min_frequency=cfg["min_frequency"],
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=RECIPE["model"]["max_position_embeddings"],
    )


def _new_model(vocab_size: int, eos_id: int):
    """A randomly initialised Phi shrunk to ~1M parameters; seeded so a rebuild gives the same start."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    cfg = RECIPE["model"]
    config = PhiConfig(
        vocab_size=vocab_size,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        hidden_act=cfg["hidden_act"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": cfg["partial_rotary_factor"]},
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg["seed"])
    return PhiForCausalLM(config)


def _batches(tokenizer, texts: list[str], batch_size: int, max_length: int):
    """Right-padded batches of single sequences (text + EOS); padding is masked out of the loss."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
           for t in texts]
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, x in enumerate(chunk):
            input_ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return out


def _schedule(tokenizer, records: list[dict], rng: random.Random) -> list[dict]:
    """One epoch of batches: documents and summaries in separate batches (similar token counts, little
    padding), each text its own sequence so the model never sees an article next to its summary."""
    cfg = RECIPE["pretrain"]
    docs = [r["document"] for r in records]
    sums = [r["summary"] for r in records]
    rng.shuffle(docs)
    rng.shuffle(sums)
    batches = (_batches(tokenizer, docs, cfg["doc_batch_size"], cfg["max_length"])
               + _batches(tokenizer, sums, cfg["summary_batch_size"], cfg["max_length"]))
    rng.shuffle(batches)
    return batches


def _mean_loss(model, batches: list[dict]) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    return total / count


def _pretrain(model, tokenizer) -> dict:
    """A short full-parameter causal-LM pre-training on the train split as plain text, so the base knows
    the corpus language (names, story phrasing) but has never seen the article -> summary prompt."""
    import torch
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    cfg = RECIPE["pretrain"]
    rng = random.Random(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    train = synthetic_records("train")
    val_texts = [t for r in synthetic_records("validation") for t in (r["document"], r["summary"])]
    val_batches = _batches(tokenizer, val_texts, cfg["doc_batch_size"], cfg["max_length"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg["learning_rate"])
    steps, warmup = cfg["steps"], cfg["warmup_steps"]

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_factor)
    queue: list[dict] = []
    losses: list[float] = []
    model.train()
    with logging_redirect_tqdm(), tqdm(range(steps), desc="pre-training tiny-phi", unit="step") as bar:
        for step in bar:
            if not queue:
                queue = _schedule(tokenizer, train, rng)
            loss = model(**queue.pop()).loss
            value = loss.detach().item()
            if not math.isfinite(value):
                raise TrainingError(f"tiny-phi pre-training diverged at step {step + 1} (loss {value}); "
                                    "the recipe in phi2sum/embedded.py needs a lower learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(value)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if (step + 1) % cfg["log_every"] == 0 or step == 0:
                logger.info("tiny-phi pre-training step %d/%d: loss %.3f", step + 1, steps, losses[-1])
    tail = losses[-10:]
    return {
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),  # mean of the last steps: one batch alone is noisy
        "validation_loss": _mean_loss(model, val_batches),
        "steps": steps,
    }


def _build(dest: Path) -> None:
    """Build tokenizer and pre-trained model into `dest`; the build-info file is written last."""
    import torch

    started = time.monotonic()
    threads = torch.get_num_threads()
    # One thread: the matrices are tiny, and on a shared 2-core machine two OpenMP threads competing with
    # other processes run several times slower than one (measured 0.7 vs 3.7 steps/s under load).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
            tokenizer = train_tokenizer(_corpus_texts())
            tokenizer.save_pretrained(dest)
            model = _new_model(len(tokenizer), tokenizer.eos_token_id)
            stats = _pretrain(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(dest)
    info = {
        "model": EMBEDDED_MODEL,
        "recipe_hash": recipe_hash(),
        "recipe": RECIPE,
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **stats,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (dest / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def recipe_hash() -> str:
    """Hash of the build recipe and the exact corpus text: either changing means a different model."""
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for text in _corpus_texts():
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("PHI2SUM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phi2sum")
    return Path(root)


def tiny_model_path(cache_dir: str | None = None) -> str:
    """Local folder holding the tiny Phi and its tokenizer, building it the first time.

    Looked up under `cache_dir`, else $PHI2SUM_CACHE, else ~/.cache/phi2sum, in a folder named after the
    recipe hash. Several processes may call this at once: one builds (into a temp folder, moved into place
    with `os.replace`, so a half-written model is never visible) while the others wait on a file lock and
    then reuse its result.
    """
    root = _cache_root(cache_dir)
    final = root / f"tiny-phi-{recipe_hash()}"
    if (final / BUILD_INFO_FILE).is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            if (final / BUILD_INFO_FILE).is_file():  # another process built it while we waited
                return str(final)
            if final.exists():  # left by something other than this function: not a complete build
                shutil.rmtree(final)
            logger.info("building %s into %s (once; later calls reuse it)", EMBEDDED_MODEL, final)
            started = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
            try:
                _build(tmp)
                # mkdtemp (and the weights writer) make files private; let the cache be read like any other.
                tmp.chmod(0o755)
                for item in tmp.iterdir():
                    item.chmod(0o644)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            logger.info("built %s in %.1f s", EMBEDDED_MODEL, time.monotonic() - started)
            return str(final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
