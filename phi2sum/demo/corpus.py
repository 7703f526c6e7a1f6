"""The synthetic XSum-shaped news corpus behind `embedded:synthetic-xsum`.

Why: the offline demo needs training and evaluation data without downloading XSum. Each story type below
writes an article and a one-sentence summary that restates its key facts (names, numbers, places) in a
fixed-ish pattern, so a very small model can learn the task in minutes, and every record is seeded from its
split and index, so the corpus is identical on every call and machine.

The story functions draw from their `random.Random` in a fixed order: reordering a draw changes the corpus
text, hence the tiny model's recipe hash and its cache folder, so edit them only on purpose (and bump
CORPUS_VERSION when a change would not show in the text).
"""

from __future__ import annotations

import random

from phi2sum.errors import DataError

EMBEDDED_DATA = "embedded:synthetic-xsum"

SPLIT_SIZES = {"train": 480, "validation": 60, "test": 120}
CORPUS_VERSION = 1  # bump when the generator changes in a way the corpus hash would not show
ALL_SPLITS = tuple(SPLIT_SIZES)

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


def _paragraphs(rng: random.Random, lead: str, support: list[str], quote: str, fewest: int, most: int,
                keep_first: bool = False) -> list[list[str]]:
    """The article's paragraphs: the lead, `fewest` to `most` supporting sentences in random order, the quote.

    `keep_first` always keeps support[0], first, for story types whose summary states a fact that only that
    sentence gives. The draws (count, then sample) keep their order, on which the corpus text depends.
    """
    if keep_first:
        return [[lead], [support[0]] + rng.sample(support[1:], rng.randint(fewest, most)), [quote]]
    return [[lead], rng.sample(support, rng.randint(fewest, most)), [quote]]


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
    return _paragraphs(rng, lead, support, quote, 2, 4), summary


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
    return _paragraphs(rng, lead, support, quote, 2, 4), summary


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
    return _paragraphs(rng, lead, support, quote, 2, 3), summary


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
    return _paragraphs(rng, lead, support, quote, 1, 2, keep_first=True), summary


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
    return _paragraphs(rng, lead, support, quote, 1, 2, keep_first=True), summary


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
    return _paragraphs(rng, lead, support, quote, 1, 2, keep_first=True), summary


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
    return _paragraphs(rng, lead, support, quote, 2, 3), summary


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
    return _paragraphs(rng, lead, support, quote, 1, 3, keep_first=True), summary


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
    return _paragraphs(rng, lead, support, quote, 1, 2, keep_first=True), summary


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


def corpus_texts(splits: tuple[str, ...] = ALL_SPLITS) -> list[str]:
    """Every document and summary of `splits` as separate texts, in a fixed order: what the tokenizer is
    trained on, what the recipe hash covers and what pre-training validates on."""
    return [text for s in splits for r in synthetic_records(s) for text in (r["document"], r["summary"])]
