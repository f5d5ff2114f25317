"""Example tasks with data the project generates itself: deterministic, seeded, nothing downloaded.

Each task has a training split and a held-out split built from disjoint material, so held-out accuracy measures the
learnt task, not memorised sentences. Every word list of a task (nouns, sentiment words, clauses, companies, issues,
sentence templates; for dates: the years) is split once, at random but seeded, into a training part and a held-out
part (`HELDOUT_SHARE`); held-out records are built only from held-out parts. So no held-out review shares its
adjective, clause, noun or sentence shape with any training review, and no held-out date its year.

- `sentiment`: product reviews -> positive / negative (`{"text", "label"}` records, template "Review : {text} Sentiment :").
- `complaints`: tweets to companies -> complaint / no complaint, in the spirit of the twitter_complaints example the
  PEFT prefix-tuning guide uses (`{"text", "label"}`, template "Tweet text : {text} Label :").
- `date-iso`: a date written out in one of several styles -> YYYY-MM-DD (`{"prompt", "completion"}` records).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from service.training.data import Example, apply_template

Split = Literal["train", "heldout"]
Record = dict[str, Any]
_Generator = Callable[[Split, int, random.Random], list[Record]]


@dataclass(frozen=True)
class ExampleTask:
    task_id: str
    description: str
    template: str | None  # for {"text", "label"} data; None when records are {"prompt", "completion"}
    instruction: str  # the request an instructed zero-shot baseline gets in front of the raw input
    prompt_template: str  # what the served task wraps a plain input in ({inputs} slot): stored in its task.json
    train_size: int
    heldout_size: int
    seed: int
    _generate: _Generator

    def records(self, split: Split) -> list[Record]:
        """The split's JSONL records; the same on every call and machine (seeded, no global state)."""
        size = self.train_size if split == "train" else self.heldout_size
        rng = random.Random(f"{self.task_id}:{split}:{self.seed}")  # str seeds hash deterministically (sha512)
        return self._generate(split, size, rng)

    def examples(self, split: Split) -> list[Example]:
        out = []
        for number, record in enumerate(self.records(split), start=1):
            if "prompt" in record:
                example = Example(prompt=record["prompt"], completion=record["completion"])
            else:
                assert self.template is not None
                example = apply_template(self.template, record["text"], record["label"])
            out.append(Example(prompt=example.prompt, completion=example.completion, line=number))
        return out

    def raw_input(self, record: Record) -> str:
        """The bare input (without the trained template) an instructed baseline is shown."""
        return str(record["text"] if "text" in record else record["input"])


def _balanced(makers: list[Callable[[], Record]], size: int, rng: random.Random, key: str = "text") -> list[Record]:
    """`size` distinct records, as evenly as possible from each maker (one per class), in seeded random order."""
    seen: set[str] = set()
    out: list[Record] = []
    for index, make in enumerate(makers):
        want = size // len(makers) + (1 if index < size % len(makers) else 0)
        got = attempts = 0
        while got < want:
            attempts += 1
            if attempts > want * 200:
                raise RuntimeError(f"example generator ran out of distinct records ({got} of {want})")
            record = make()
            if record[key] not in seen:
                seen.add(record[key])
                out.append(record)
                got += 1
    rng.shuffle(out)
    return out


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _capitalise(text: str) -> str:
    """Capitalise every sentence start a filled-in template leaves lower-case."""
    for end in (". ", "! ", "? "):
        text = end.join(_sentence(part) for part in text.split(end))
    return text


HELDOUT_SHARE = 0.3


def split_pool(task_id: str, pool: dict[str, list[str]]) -> dict[Split, dict[str, list[str]]]:
    """Split every list of `pool` at random (seeded by task and list name) into disjoint train / held-out parts."""
    out: dict[Split, dict[str, list[str]]] = {"train": {}, "heldout": {}}
    for key, values in pool.items():
        shuffled = sorted(set(values))
        random.Random(f"{task_id}:pool:{key}").shuffle(shuffled)
        cut = max(1, round(len(shuffled) * HELDOUT_SHARE))
        out["heldout"][key], out["train"][key] = shuffled[:cut], shuffled[cut:]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# sentiment

_SENTIMENT_POOL: dict[str, list[str]] = {
    "noun": ["phone", "blender", "jacket", "laptop", "backpack", "coffee maker", "headset", "desk lamp", "novel",
             "movie", "hotel room", "keyboard", "vacuum cleaner", "tent", "rain coat", "monitor", "chair", "blanket",
             "microwave", "tablet", "suitcase", "drill", "helmet", "scarf", "camera", "sofa", "toaster", "bicycle",
             "wristwatch", "album", "printer", "mattress", "board game", "umbrella", "kettle", "speaker"],
    "pos": ["great", "excellent", "wonderful", "fantastic", "amazing", "perfect", "lovely", "brilliant", "reliable",
            "comfortable", "beautiful", "awesome", "solid", "nice", "pleasant", "elegant", "fabulous", "stunning",
            "fun", "well made", "exceptional", "top notch", "superb", "outstanding", "delightful", "terrific",
            "impressive", "charming", "flawless", "marvelous"],
    "neg": ["terrible", "awful", "horrible", "disappointing", "useless", "broken", "uncomfortable", "noisy",
            "boring", "unreliable", "bad", "poor", "ugly", "fragile", "annoying", "frustrating", "overpriced",
            "worthless", "unpleasant", "badly made", "subpar", "inferior", "dreadful", "shoddy", "flimsy", "lousy",
            "defective", "mediocre", "pathetic", "faulty"],
    "pos_clause": ["I would buy it again", "it works perfectly", "my whole family loves it", "worth every penny",
                   "highly recommended", "five stars from me", "I use it every day", "it was a great gift",
                   "I am very happy with it", "it arrived early and works well", "I kept it and love it",
                   "no complaints at all", "I am so glad I bought it", "it exceeded my expectations",
                   "I will recommend it to friends", "best purchase this year"],
    "neg_clause": ["I want my money back", "it stopped working after a week", "do not buy it",
                   "a complete waste of money", "I regret buying it", "one star is too many",
                   "I sent it back for a refund", "it broke on the first day", "I am very unhappy with it",
                   "it went back to the store within a week", "the seller ignored my emails",
                   "never buying this again", "I returned it the next day", "it fell apart quickly",
                   "avoid this one at all costs", "what a letdown"],
    "template": ["The {noun} is {adj}.", "This {noun} was {adj}, {clause}.", "{adj} {noun}! {clause}.",
                 "I found the {noun} {adj} and {clause}.", "My new {noun} is {adj}. {clause}.",
                 "{clause}. The {noun} is {adj}.", "Just got the {noun}. {adj}. {clause}.",
                 "Overall a {adj} {noun}, {clause}.", "Honestly, the {noun} turned out {adj}. {clause}.",
                 "What a {adj} {noun}; {clause}.", "Bought this {noun} last month: {adj}. {clause}.",
                 "Quality of the {noun}? {adj}. {clause}."],
}  # fmt: skip
SENTIMENT_WORDS = split_pool("sentiment", _SENTIMENT_POOL)


def _sentiment(split: Split, size: int, rng: random.Random) -> list[Record]:
    words = SENTIMENT_WORDS[split]

    def make(label: str) -> Record:
        side = "pos" if label == "positive" else "neg"
        template = rng.choice(words["template"])
        text = template.format(
            noun=rng.choice(words["noun"]), adj=rng.choice(words[side]), clause=rng.choice(words[f"{side}_clause"])
        )
        return {"text": _capitalise(text), "label": label}

    return _balanced([lambda: make("positive"), lambda: make("negative")], size, rng)


# ---------------------------------------------------------------------------------------------------------------------
# complaints

_COMPLAINTS_POOL: dict[str, list[str]] = {
    "company": ["@SkyJetAir", "@QuickShip", "@MetroBank", "@FreshMart", "@NovaMobile", "@CityPower", "@StreamBox",
                "@BlueRailways", "@ParcelPro", "@HomeNetISP", "@UrbanGrocer", "@PeakInsurance"],
    "issue": ["my flight was delayed for five hours", "my package never arrived", "I was charged twice",
              "the app keeps crashing", "nobody answers the support line", "my order arrived damaged",
              "the internet has been down all day", "you cancelled my booking without telling me",
              "my card was declined for no reason", "the store was out of stock again", "my luggage is lost",
              "the technician never showed up", "I have been on hold for two hours",
              "the refund still has not arrived", "my bill doubled this month",
              "the driver left my parcel in the rain", "your website will not let me log in",
              "the train was cancelled again"],
    "complaint": ["{company} {issue}. Unacceptable.", "{company} {issue} and I am furious",
                  "Hey {company}, {issue}. Fix this now!", "{company} why is it that {issue}?!",
                  "Dear {company}, {issue}. I want a refund.", "Really disappointed, {company}: {issue}.",
                  "{company} {issue}. Never using you again.", "Is anyone at {company} listening? {issue}.",
                  "So annoyed with {company} today, {issue}.", "Seriously {company}? {issue}. So frustrated.",
                  "{company} {issue}, worst service ever", "{company} this is the third time {issue}. Not happy."],
    "topic": ["the new app update", "the friendly staff", "the fast delivery", "the helpful support team",
              "the weekend sale", "the new loyalty program", "the free upgrade", "the new store downtown",
              "the summer menu", "the quick refund", "the holiday opening hours", "the student discount",
              "the early delivery", "the new mobile plans", "the kind cashier"],
    "other": ["{company} thanks for {topic}!", "Really enjoying {topic} from {company}",
              "{company} quick question about {topic}: is it available in my city?", "Big fan of {topic}, {company}",
              "Just read about {topic} from {company}", "Thank you {company}, {topic} made my day",
              "Love {topic}, {company}! Keep it up", "{company} when does {topic} start?",
              "Great job on {topic}, {company}", "Happy with {topic}. Well done {company}",
              "Excited about {topic} from {company}", "Shout out to {company} for {topic}",
              "{company} can you tell me more about {topic}?", "Big thanks {company}, loved {topic}",
              "Reading up on {topic} at {company} today"],
}  # fmt: skip
COMPLAINT_WORDS = split_pool("complaints", _COMPLAINTS_POOL)


def _complaints(split: Split, size: int, rng: random.Random) -> list[Record]:
    words = COMPLAINT_WORDS[split]

    def complaint() -> Record:
        template = rng.choice(words["complaint"])
        text = template.format(company=rng.choice(words["company"]), issue=rng.choice(words["issue"]))
        return {"text": _capitalise(text), "label": "complaint"}

    def other() -> Record:
        template = rng.choice(words["other"])
        text = template.format(company=rng.choice(words["company"]), topic=rng.choice(words["topic"]))
        return {"text": text, "label": "no complaint"}

    return _balanced([complaint, other], size, rng)


# ---------------------------------------------------------------------------------------------------------------------
# date-iso

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]  # fmt: skip
_DATE_STYLES = [
    "{month} {day}, {year}",  # March 5, 2021
    "{day} {month} {year}",  # 5 March 2021
    "{mon} {day} {year}",  # Mar 5 2021
    "the {ordinal} of {month}, {year}",  # the 5th of March, 2021
]
_DATE_PROMPT = "Date : {input} ISO :"


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date_years() -> dict[Split, list[int]]:
    """Years 1900-2099 split once, at random but fixed: no held-out date shares its year with a training date."""
    years = list(range(1900, 2100))
    random.Random("date-iso:years").shuffle(years)
    cut = round(len(years) * HELDOUT_SHARE)
    return {"heldout": sorted(years[:cut]), "train": sorted(years[cut:])}


def _dates(split: Split, size: int, rng: random.Random) -> list[Record]:
    years = _date_years()[split]

    def make() -> Record:
        year, month = rng.choice(years), rng.randint(1, 12)
        day = rng.randint(1, 31)
        while True:
            try:
                date = dt.date(year, month, day)
                break
            except ValueError:
                day -= 1  # 31 April -> 30 April
        name = _MONTHS[month - 1]
        raw = rng.choice(_DATE_STYLES).format(
            month=name, mon=name[:3], day=date.day, year=date.year, ordinal=_ordinal(date.day)
        )
        raw = _sentence(raw)
        return {
            "prompt": _DATE_PROMPT.format(input=raw),
            "completion": " " + date.isoformat(),
            "input": raw,
        }

    return _balanced([make], size, rng, key="prompt")


# ---------------------------------------------------------------------------------------------------------------------

EXAMPLE_TASKS: dict[str, ExampleTask] = {
    task.task_id: task
    for task in (
        ExampleTask(
            task_id="sentiment",
            description="product review -> positive / negative",
            template="Review : {text} Sentiment :",
            prompt_template="Review : {inputs} Sentiment :",
            instruction="Is the sentiment of this product review positive or negative? Answer with one word.",
            train_size=400,
            heldout_size=100,
            seed=0,
            _generate=_sentiment,
        ),
        ExampleTask(
            task_id="complaints",
            description="tweet to a company -> complaint / no complaint",
            template="Tweet text : {text} Label :",
            prompt_template="Tweet text : {inputs} Label :",
            instruction=("Is this tweet a complaint? Answer with exactly 'complaint' or 'no complaint'."),
            train_size=400,
            heldout_size=100,
            seed=0,
            _generate=_complaints,
        ),
        ExampleTask(
            task_id="date-iso",
            description="date in words -> YYYY-MM-DD",
            template=None,
            prompt_template=_DATE_PROMPT.replace("{input}", "{inputs}"),
            instruction="Write this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.",
            train_size=400,
            heldout_size=100,
            seed=0,
            _generate=_dates,
        ),
    )
}


def get_task(task_id: str) -> ExampleTask:
    try:
        return EXAMPLE_TASKS[task_id]
    except KeyError:
        raise ValueError(f"unknown example task {task_id!r}; choose from {', '.join(EXAMPLE_TASKS)}") from None
