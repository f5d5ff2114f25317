"""A small T5 the project pretrains itself, on synthetic text, in a few CPU minutes; and two seq2seq tasks for it.

Why: the experiment "what does an encoder prefix buy on a frozen seq2seq model" needs an encoder-decoder base model
that actually reads its encoder input, plus tasks whose held-out exact match is measurable. No hub model can be
downloaded here, and a randomly initialised T5 reads nothing, so the project builds its own:

- `generate_corpus`: English-like synthetic sentences (actions, trips, purchases, meetings, descriptions, births,
  everyday scenes) from the word lists below, each with the fields it states (who, did, what, where, when, from,
  to, ...). Seeded, nothing downloaded.
- `train_tokenizer`: a case-preserving BPE tokenizer (SentencePiece-style `▁` spaces, digits split one by one,
  punctuation split off) trained offline on that corpus, wrapped as a `PreTrainedTokenizerFast` with T5's special
  tokens: `<pad>`=0, `</s>`=1, `<unk>`=2, sentinels `<extra_id_0>`..`<extra_id_N>`, and `</s>` appended to every
  encoded text, as T5's tokenizer does. Every word of the lists is one token.
- `tiny_t5_config` + `build_seq2seq_base`: a ~2.5M-parameter `T5ForConditionalGeneration` pretrained from random
  init (plus `copy_friendly_init`, see there: without it the model never learnt to copy a word in the budget) on a
  T5-style mixture: span-corruption denoising (no instruction, like T5) plus instructed transformations of the
  sentences (all fields as a record, one field, copy, word reversal) so the decoder learns to read the encoder.
  The result is a normal Hugging Face directory (float32 safetensors, tokenizer, generation config).
- `SEQ2SEQ_TASKS`: two prefix-tuning tasks on that frozen model (`trip-destination`, `who-did-what`), in the style of
  `service.training.examples`: `{"prompt", "completion"}` records whose completion is a short normalised form built
  from words of the input ("Anna to Oslo", "Anna repaired the bicycle"), train / held-out splits built from disjoint
  word lists (names, places, verbs, objects, adjectives), so a held-out answer never contains a training value.
  Their sentence templates are the task's own (not the corpus's) and shared by both splits: the tasks test reading
  roles out of a sentence, and the values are what must not be memorised. Their prompt format ("Trip : ... Who went
  where :") and answer forms are not ones the base model was pretrained on, so it does not solve them zero-shot; it
  did learn the underlying skill (finding a role's word in the encoder input and copying it), which a prefix can
  steer it to.

Runs on CPU: ~0.2 s per step of 32 examples with 2 threads, so the default 1200 steps take about 4-5 minutes. On a
shared machine, set OMP_WAIT_POLICY=PASSIVE before starting Python: with another process busy on the same cores,
OpenMP's spin-waiting made steps up to 30 times slower.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from service.training.examples import ExampleTask, Record, Split, split_pool

logger = logging.getLogger(__name__)

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_ALPHABET = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-|=/"
DEFAULT_SENTINELS = 32
DEFAULT_VOCAB_SIZE = 1500
DEFAULT_CORPUS_SIZE = 20_000
DEFAULT_STEPS = 1200
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 3e-3  # 5e-3 was unstable; 2e-3 slower
MAX_INPUT_TOKENS = 128
MAX_TARGET_TOKENS = 64
REPORT_FILE = "pretrain_report.json"


def sentinel(index: int) -> str:
    return f"<extra_id_{index}>"


# ---------------------------------------------------------------------------------------------------------------------
# Word lists: shared by the corpus (so the base model has read every word) and the tasks (which split them).

NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin", "Leo", "Maria",
         "Nils", "Olga", "Paul", "Rosa", "Simon", "Tina", "Victor", "Wendy", "Yusuf", "Zoe", "Adam", "Bianca",
         "Carlos", "Diana", "Emil", "Fatima", "George", "Hanna", "Ivan", "Julia", "Kevin", "Laura", "Marco", "Nora",
         "Oscar", "Petra", "Quentin", "Rita", "Stefan", "Ursula", "Walter", "Xenia", "Yara", "Amir", "Bruno",
         "Chloe", "Dmitri", "Erik", "Frida", "Gustav", "Helga", "Igor", "Jasmin", "Lars", "Mila", "Otto", "Pia",
         "Rafael", "Sofia", "Tomas", "Vera", "Wilma", "Aaron", "Bettina", "Conrad", "Daria", "Edgar", "Flora",
         "Gregor"]  # fmt: skip
PLACES = ["Oslo", "Lisbon", "Porto", "Kyoto", "Dublin", "Vienna", "Prague", "Madrid", "Berlin", "Paris", "Rome",
          "Athens", "Cairo", "Lima", "Quito", "Denver", "Boston", "Chicago", "Toronto", "Montreal", "Seattle",
          "Austin", "Miami", "Houston", "Sydney", "Perth", "Auckland", "Nairobi", "Lagos", "Accra", "Tunis", "Dakar",
          "Riga", "Tallinn", "Vilnius", "Warsaw", "Krakow", "Budapest", "Zagreb", "Varna", "Bergen", "Malmo",
          "Geneva", "Zurich", "Milan", "Naples", "Seville", "Valencia", "Bilbao", "Lyon", "Nantes", "Bordeaux",
          "Hamburg", "Munich", "Dresden", "Leipzig", "Utrecht", "Antwerp", "Ghent", "Bruges", "Glasgow", "Leeds",
          "Bristol", "Cardiff", "Belfast", "Galway", "Reykjavik", "Helsinki", "Turku", "Tampere", "Aarhus",
          "Odense"]  # fmt: skip
OBJECTS = ["bicycle", "lamp", "table", "window", "letter", "garden", "boat", "piano", "engine", "basket", "kettle",
           "ladder", "mirror", "camera", "blanket", "bottle", "candle", "carpet", "clock", "fence", "guitar",
           "hammer", "jacket", "key", "laptop", "map", "notebook", "painting", "pillow", "radio", "roof", "saddle",
           "shelf", "shovel", "sofa", "statue", "suitcase", "tent", "ticket", "tractor", "trumpet", "umbrella",
           "violin", "wagon", "wallet", "helmet", "drum", "bench", "cabinet", "compass", "door", "fountain",
           "kite", "lantern", "mailbox", "oven", "printer", "rocket", "scooter", "sign"]  # fmt: skip
VERBS = ["repaired", "painted", "cleaned", "moved", "opened", "polished", "delivered", "carried", "repainted",
         "checked", "collected", "decorated", "designed", "dropped", "fixed", "inspected", "installed", "lifted",
         "locked", "measured", "ordered", "packed", "photographed", "protected", "pulled", "pushed", "rebuilt",
         "recorded", "removed", "rented", "replaced", "restored", "returned", "sketched", "stored", "tested",
         "touched", "unlocked", "upgraded", "visited", "washed", "weighed", "wrapped", "borrowed", "covered",
         "guarded", "launched", "scrubbed"]  # fmt: skip
ADJECTIVES = ["old", "new", "red", "blue", "green", "yellow", "small", "large", "heavy", "light", "broken", "shiny",
              "dusty", "wooden", "metal", "tiny", "huge", "bright", "dark", "quiet", "noisy", "famous", "strange",
              "modern", "ancient", "cheap", "expensive", "clean", "dirty", "round", "square", "narrow", "wide",
              "soft", "rusty", "golden", "silver", "purple", "orange", "striped", "spotted", "folded", "tall",
              "short", "fragile", "sturdy", "elegant", "simple"]  # fmt: skip
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
VENUES = ["station", "library", "market", "museum", "harbour", "cafe", "theatre", "school", "hospital", "park"]
TRAVEL_VERBS = ["travelled", "went", "flew", "drove", "walked", "cycled", "sailed", "moved", "returned"]


# ---------------------------------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class CorpusSentence:
    text: str
    kind: str  # which family of templates made it: action, trip, purchase, meeting, description, birth, scene
    fields: dict[str, str] = field(default_factory=dict)  # what it states: who, did, what, where, when, ...


def _date(rng: random.Random) -> str:
    month, day, year = rng.choice(MONTHS), rng.randint(1, 28), rng.randint(1900, 2099)
    return rng.choice([f"{month} {day}, {year}", f"{day} {month} {year}"])


def _when(rng: random.Random) -> str:
    return rng.choice([_date(rng), _date(rng), rng.choice(WEEKDAYS), f"{rng.choice(MONTHS)} {rng.randint(1900, 2099)}"])


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _two(rng: random.Random, pool: Sequence[str]) -> tuple[str, str]:
    first, second = rng.sample(list(pool), 2)
    return first, second


def _action(rng: random.Random) -> tuple[str, dict[str, str]]:
    who, whom = _two(rng, NAMES)
    f = {"who": who, "did": rng.choice(VERBS), "what": rng.choice(OBJECTS), "where": rng.choice(PLACES),
         "when": _when(rng)}  # fmt: skip
    adj = rng.choice(ADJECTIVES)
    templates = [
        ("{who} {did} the {adj} {what} in {where}.", ("who", "did", "what", "where")),
        ("{who} {did} the {what} on {when}.", ("who", "did", "what", "when")),
        ("The {adj} {what} was {did} by {who} in {where}.", ("who", "did", "what", "where")),
        ("On {when}, {who} {did} the {adj} {what}.", ("who", "did", "what", "when")),
        ("In {where}, the {what} was {did} by {who} on {when}.", ("who", "did", "what", "where", "when")),
        ("{who} {did} the {what} for {whom} in {where}.", ("who", "did", "what", "where", "whom")),
        ("{who} and {whom} {did} the {adj} {what} together.", ("who", "did", "what")),
        ("Last {when}, {who} {did} the old {what}.", ("who", "did", "what", "when")),
    ]
    template, keys = rng.choice(templates)
    text = template.format(adj=adj, whom=whom, **f)
    if "whom" in keys:
        f["whom"] = whom
    return text, {key: f[key] for key in keys}


def _trip(rng: random.Random) -> tuple[str, dict[str, str]]:
    origin, destination = _two(rng, PLACES)
    f = {"who": rng.choice(NAMES), "from": origin, "to": destination, "when": _when(rng)}
    verb, what, adj = rng.choice(TRAVEL_VERBS), rng.choice(OBJECTS), rng.choice(ADJECTIVES)
    templates = [
        ("{who} {verb} from {from} to {to} on {when}.", ("who", "from", "to", "when")),
        ("On {when}, {who} {verb} to {to} from {from}.", ("who", "from", "to", "when")),
        ("{who} left {from} for {to} with the {adj} {what}.", ("who", "from", "to")),
        ("From {from}, {who} {verb} to {to}.", ("who", "from", "to")),
        ("{who} {verb} to {to}, far away from {from}.", ("who", "from", "to")),
    ]
    template, keys = rng.choice(templates)
    return template.format(verb=verb, what=what, adj=adj, **f), {key: f[key] for key in keys}


def _purchase(rng: random.Random) -> tuple[str, dict[str, str]]:
    count = rng.randint(2, 99)
    f = {"who": rng.choice(NAMES), "count": str(count), "what": rng.choice(OBJECTS), "where": rng.choice(PLACES),
         "when": _when(rng)}  # fmt: skip
    adj, things = rng.choice(ADJECTIVES), _plural(f["what"])
    f["what"] = things  # the field is what the sentence says: copied, not lemmatised
    templates = [
        ("{who} bought {count} {things} in {where}.", ("who", "count", "what", "where")),
        ("In {where}, {who} sold {count} {adj} {things}.", ("who", "count", "what", "where")),
        ("{count} {things} were ordered by {who} on {when}.", ("who", "count", "what", "when")),
        ("The shop in {where} had {count} {adj} {things} for {who}.", ("who", "count", "what", "where")),
    ]
    template, keys = rng.choice(templates)
    return template.format(adj=adj, things=things, **f), {key: f[key] for key in keys}


def _meeting(rng: random.Random) -> tuple[str, dict[str, str]]:
    who, whom = _two(rng, NAMES)
    f = {"who": who, "whom": whom, "where": rng.choice(PLACES), "when": rng.choice(WEEKDAYS)}
    venue = rng.choice(VENUES)
    templates = [
        ("{who} met {whom} in {where} on {when}.", ("who", "whom", "where", "when")),
        ("On {when}, {who} called {whom} from {where}.", ("who", "whom", "where", "when")),
        ("{who} visited {whom} at the {venue} in {where}.", ("who", "whom", "where")),
        ("{whom} was waiting for {who} at the {venue} on {when}.", ("who", "whom", "when")),
    ]
    template, keys = rng.choice(templates)
    return template.format(venue=venue, **f), {key: f[key] for key in keys}


def _description(rng: random.Random) -> tuple[str, dict[str, str]]:
    first, second = _two(rng, ADJECTIVES)
    f = {"what": rng.choice(OBJECTS), "where": rng.choice(PLACES), "how": first}
    templates = [
        ("The {what} in {where} is {how} and {second}.", ("what", "where", "how")),
        ("Everyone in {where} says the {what} looks {how}.", ("what", "where", "how")),
        ("A {how} {what} stands near the {venue} in {where}.", ("what", "where", "how")),
    ]
    template, keys = rng.choice(templates)
    return template.format(second=second, venue=rng.choice(VENUES), **f), {key: f[key] for key in keys}


def _birth(rng: random.Random) -> tuple[str, dict[str, str]]:
    f = {"who": rng.choice(NAMES), "where": rng.choice(PLACES), "when": _date(rng)}
    templates = [
        ("{who} was born in {where} on {when}.", ("who", "where", "when")),
        ("On {when}, {who} opened a small shop in {where}.", ("who", "where", "when")),
        ("{who} has lived in {where} since {when}.", ("who", "where", "when")),
    ]
    template, keys = rng.choice(templates)
    return template.format(**f), {key: f[key] for key in keys}


def _scene(rng: random.Random) -> tuple[str, dict[str, str]]:
    """Everyday filler that uses the words the task templates are written in, without their roles."""
    who, whom = _two(rng, NAMES)
    how, other_how = _two(rng, ADJECTIVES)
    f = {"who": who, "whom": whom, "what": rng.choice(OBJECTS), "how": how}
    venue = rng.choice(VENUES)
    templates = [
        ("{who} took the night train and watched the {what}.", ("who", "what")),
        ("{who} noticed that the {what} had been {how} for two weeks.", ("who", "what", "how")),
        ("After the bus brought {who} home, {whom} agreed to stay.", ("who", "whom")),
        ("It was {how}, and {who} saw that the {what} was not {other_how}.", ("who", "what", "how")),
        ("Having started early, {who} cycled all the way to the {venue}.", ("who",)),
        ("{who} grew up near the {venue}, while {whom} is moving away.", ("who", "whom")),
        ("Yesterday {who} flew, sailed and drove, and {whom} stays at the {venue}.", ("who", "whom")),
        ("{whom} reached the {venue} of the town after {who} left.", ("who", "whom")),
    ]
    template, keys = rng.choice(templates)
    return template.format(venue=venue, other_how=other_how, **f), {key: f[key] for key in keys}


_SENTENCE_KINDS: dict[str, tuple[float, Callable[[random.Random], tuple[str, dict[str, str]]]]] = {
    "action": (0.25, _action),
    "trip": (0.2, _trip),
    "purchase": (0.12, _purchase),
    "meeting": (0.12, _meeting),
    "description": (0.08, _description),
    "birth": (0.08, _birth),
    "scene": (0.15, _scene),
}


def generate_corpus(size: int, seed: int = 0) -> list[CorpusSentence]:
    """`size` synthetic sentences with the fields each states; the same list for the same (size, seed) anywhere."""
    rng = random.Random(f"seq2seq-base:corpus:{seed}")
    kinds = list(_SENTENCE_KINDS)
    weights = [_SENTENCE_KINDS[kind][0] for kind in kinds]
    out = []
    for _ in range(size):
        kind = rng.choices(kinds, weights)[0]
        text, fields = _SENTENCE_KINDS[kind][1](rng)
        out.append(CorpusSentence(text=text, kind=kind, fields=fields))
    return out


def lexicon() -> list[str]:
    """Every word of every list, so the tokenizer covers all of them however small the corpus it is trained on."""
    words = [*NAMES, *PLACES, *OBJECTS, *map(_plural, OBJECTS), *VERBS, *ADJECTIVES, *MONTHS, *WEEKDAYS, *VENUES,
             *TRAVEL_VERBS]  # fmt: skip
    return sorted(set(words))


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, sentinels: int = DEFAULT_SENTINELS
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained offline on `texts`, with T5's special tokens and `</s>` appended on encode.

    SentencePiece-style spaces (`▁`, so decoding restores the text exactly), punctuation split off, digits one token
    each (any number is spelt from ten tokens). On the synthetic corpus every word of the lists becomes one token.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(prepend_scheme="first"),  # "first": no "▁" invented after a sentinel
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN],
        initial_alphabet=list(_ALPHABET),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, " ".join(lexicon())], trainer=trainer)
    specials = {PAD_TOKEN: PAD_ID, EOS_TOKEN: EOS_ID, UNK_TOKEN: UNK_ID}
    for token, expected in specials.items():
        if tokenizer.token_to_id(token) != expected:
            raise RuntimeError(f"tokenizer put {token} at {tokenizer.token_to_id(token)}, T5 needs {expected}")
    sentinel_tokens = [sentinel(index) for index in range(sentinels)]
    # lstrip: "the <extra_id_0> lamp" -> ▁the <extra_id_0> ▁lamp, no stray "▁" for the space before a sentinel
    tokenizer.add_special_tokens([AddedToken(token, lstrip=True, special=True) for token in sentinel_tokens])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=sentinel_tokens,
        model_max_length=512,
        padding_side="right",
    )


def sentinel_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The ids of `<extra_id_0>`, `<extra_id_1>`, ... in order, as many as the tokenizer has."""
    ids = []
    while (token_id := tokenizer.convert_tokens_to_ids(sentinel(len(ids)))) not in (None, UNK_ID):
        ids.append(token_id)
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# Model


def tiny_t5_config(vocab_size: int, **overrides: Any) -> T5Config:
    """A ~3M-parameter T5 (v1.1-style gated-GELU, tied embeddings) with T5's pad / eos / decoder-start ids."""
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "d_model": 128,
        "d_kv": 32,
        "d_ff": 512,
        "num_layers": 4,
        "num_decoder_layers": 4,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,  # a few minutes on an endless synthetic stream: nothing to regularise
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "decoder_start_token_id": PAD_ID,
    }
    settings.update(overrides)
    return T5Config(**settings)


def generation_config() -> GenerationConfig:
    return GenerationConfig(decoder_start_token_id=PAD_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def new_model(config: T5Config, seed: int) -> T5ForConditionalGeneration:
    """A randomly initialised T5 (Hugging Face's init, seeded) with a copy-friendly cross-attention init."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    copy_friendly_init(model, seed)
    model.generation_config = generation_config()
    return model


@torch.no_grad()
def copy_friendly_init(model: T5ForConditionalGeneration, seed: int) -> None:
    """Initialise each decoder cross-attention's value and output projections as a random orthogonal pair (o = v^T).

    Why: almost every pretraining target is a word the decoder must copy from the encoder, and a copy of one of
    ~450 different words needs the cross-attention's value -> output map to be close to the identity on the
    embedding space. From T5's Gaussian init that full-rank map took longer to appear than a CPU budget allows: after
    1200 steps the model only copied digits (10 frequent tokens) and guessed names and places from the templates.
    Started as an identity map (still random: a random orthogonal basis), a decoder that attends to a word already
    emits it, and the model only has to learn where to attend: a field-extraction run reached 0.8 exact match on
    names and places in 400 steps, against ~0.02 from the plain init. The query/key projections (where to attend) and
    everything else keep Hugging Face's T5 init. With heads * d_kv < d_model the map is a projection onto a random
    subspace of that size instead of the identity.
    """
    generator = torch.Generator().manual_seed(seed)
    for block in model.decoder.block:
        attention = block.layer[1].EncDecAttention
        inner, d_model = attention.v.weight.shape
        size = max(inner, d_model)
        basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
        value = basis[:inner, :d_model]
        attention.v.weight.copy_(value)
        attention.o.weight.copy_(value.T)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining mixture: span corruption + instructed transformations

Pair = tuple[list[int], list[int]]  # (encoder input ids, decoder target ids), both ending in </s>

FIELD_ORDER = ["who", "did", "whom", "what", "count", "how", "from", "to", "where", "when"]
# Record-heavy: in a record the decoder has just written the key ("to =") when it must find the value, so it learns
# role lookups faster than from the one-field objective, whose key it can only read through the encoder. After 1200
# steps, record 0.35 / field 0.2 beat field 0.45 / record 0.15 on one-field exact match: object 0.66 vs 0.28, verb
# 0.56 vs 0.09, destination 0.63 vs 0.50 (origin 0.39 vs 0.45, names equal).
DEFAULT_MIXTURE: dict[str, float] = {
    "span": 0.25,  # T5 span corruption, no instruction
    "record": 0.35,  # "fields : sentence" -> "who = Anna ; did = repaired ; what = bicycle ; where = Oslo"
    "field": 0.2,  # "<field> : sentence" -> that field's value
    "copy": 0.1,  # "copy : sentence" -> sentence
    "reverse": 0.1,  # "reverse : sentence" -> its words in reverse order
}


def random_spans_noise_mask(length: int, rng: random.Random, noise_density: float, mean_span: float,
                            max_spans: int) -> list[bool]:  # fmt: skip
    """T5's span-corruption mask: about `noise_density` of `length` positions, in at most `max_spans` spans of mean
    length `mean_span`, each span after at least one kept position."""
    if length < 2:
        return [False] * length
    noise = max(1, min(length - 1, round(length * noise_density)))
    spans = max(1, min(max_spans, round(noise / mean_span), length - noise))
    mask: list[bool] = []
    for keep, drop in zip(_random_partition(length - noise, spans, rng), _random_partition(noise, spans, rng)):
        mask += [False] * keep + [True] * drop
    return mask


def _random_partition(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` (>= `parts`) split at random into `parts` positive integers."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    edges = [0, *cuts, total]
    return [edges[i + 1] - edges[i] for i in range(parts)]


def span_corruption_pair(ids: Sequence[int], sentinels: Sequence[int], rng: random.Random,
                         noise_density: float = 0.15, mean_span: float = 3.0) -> Pair:  # fmt: skip
    """T5 denoising: each masked span becomes one sentinel in the input; the target lists each sentinel followed by
    the span it hides, and a closing sentinel."""
    mask = random_spans_noise_mask(len(ids), rng, noise_density, mean_span, max_spans=len(sentinels) - 1)
    source: list[int] = []
    target: list[int] = []
    used = 0
    for position, (token, masked) in enumerate(zip(ids, mask)):
        if masked and (position == 0 or not mask[position - 1]):
            source.append(sentinels[used])
            target.append(sentinels[used])
            used += 1
        (target if masked else source).append(token)
    target.append(sentinels[used])
    return source + [EOS_ID], target + [EOS_ID]


def field_record(fields: dict[str, str]) -> str:
    return " ; ".join(f"{key} = {fields[key]}" for key in FIELD_ORDER if key in fields)


def reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))


class PretrainingMixture:
    """An endless seeded stream of (input, target) id pairs drawn from the corpus with the mixture's weights."""

    def __init__(self, corpus: Sequence[CorpusSentence], tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                 mixture: dict[str, float] | None = None) -> None:  # fmt: skip
        self.corpus = list(corpus)
        self.tokenizer = tokenizer
        self.rng = random.Random(f"seq2seq-base:mixture:{seed}")
        self.mixture = dict(mixture or DEFAULT_MIXTURE)
        self.sentinels = sentinel_ids(tokenizer)
        if not self.sentinels:
            raise ValueError("the tokenizer has no <extra_id_N> sentinels for span corruption")
        encoded = tokenizer([s.text for s in self.corpus], add_special_tokens=False)
        self._ids: list[list[int]] = list(encoded["input_ids"])

    def sample(self, batch_size: int) -> tuple[list[Pair], list[str]]:
        """`batch_size` pairs and the objective each came from."""
        objectives = self.rng.choices(list(self.mixture), list(self.mixture.values()), k=batch_size)
        return [self.pair(objective) for objective in objectives], objectives

    def pair(self, objective: str) -> Pair:
        if objective == "span":
            return self._span_pair()
        sentence = self.rng.choice(self.corpus)
        source, target = self.text_pair(objective, sentence)
        return self._encode(source), self._encode(target)

    def text_pair(self, objective: str, sentence: CorpusSentence) -> tuple[str, str]:
        if objective == "field":
            key = self.rng.choice(sorted(sentence.fields))
            return f"{key} : {sentence.text}", sentence.fields[key]
        if objective == "record":
            return f"fields : {sentence.text}", field_record(sentence.fields)
        if objective == "copy":
            return f"copy : {sentence.text}", sentence.text
        if objective == "reverse":
            return f"reverse : {sentence.text}", reverse_words(sentence.text)
        raise ValueError(f"unknown pretraining objective {objective!r}")

    def _span_pair(self) -> Pair:
        ids: list[int] = []
        for _ in range(self.rng.randint(1, 2)):  # sometimes two sentences: more context to fill the spans from
            ids += self._ids[self.rng.randrange(len(self._ids))]
        source, target = span_corruption_pair(ids[: MAX_INPUT_TOKENS - 1], self.sentinels, self.rng)
        return source, target[:MAX_TARGET_TOKENS]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=True, max_length=MAX_INPUT_TOKENS)["input_ids"])


def collate(pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` / `attention_mask`, and `labels` padded with -100 (ignored by the loss)."""
    source_length = max(len(source) for source, _ in pairs)
    target_length = max(len(target) for _, target in pairs)
    input_ids = torch.full((len(pairs), source_length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), source_length), dtype=torch.long)
    labels = torch.full((len(pairs), target_length), -100, dtype=torch.long)
    for row, (source, target) in enumerate(pairs):
        input_ids[row, : len(source)] = torch.tensor(source)
        attention_mask[row, : len(source)] = 1
        labels[row, : len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def training_step(model: T5ForConditionalGeneration, optimizer: torch.optim.Optimizer,
                  batch: dict[str, torch.Tensor], max_grad_norm: float = 1.0) -> float:  # fmt: skip
    """One AdamW step on `batch`; returns the loss before the step."""
    loss = model(**batch).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretraining loss is {loss.item()}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.98))


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, floor: float = 0.1
                  ) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """Linear warmup over 5% of the steps, then cosine decay to `floor` times the peak rate."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class PretrainResult:
    losses: list[float]
    objective_losses: dict[str, float]  # per objective: mean loss of its examples in the last 10% of steps
    seconds: float


def pretrain(model: T5ForConditionalGeneration, mixture: PretrainingMixture, *, steps: int, batch_size: int,
             learning_rate: float, log_every: int = 50) -> PretrainResult:  # fmt: skip
    """AdamW with warmup + cosine decay on `steps` batches from `mixture`; per-objective losses of the last 10%."""
    optimizer = make_optimizer(model, learning_rate)
    scheduler = warmup_cosine(optimizer, steps)
    model.train()
    losses: list[float] = []
    tail: dict[str, list[float]] = {}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        pairs, objectives = mixture.sample(batch_size)
        losses.append(training_step(model, optimizer, collate(pairs)))
        scheduler.step()
        if step > steps - max(1, steps // 10):
            _objective_losses(model, pairs, objectives, tail)
        if step % log_every == 0 or step == steps:
            recent = losses[-log_every:]
            logger.info("pretrain step %d/%d: loss %.3f (%.0f s)", step, steps, sum(recent) / len(recent),
                        time.perf_counter() - started)  # fmt: skip
    model.eval()
    objective_losses = {name: sum(values) / len(values) for name, values in sorted(tail.items())}
    return PretrainResult(losses=losses, objective_losses=objective_losses, seconds=time.perf_counter() - started)


@torch.no_grad()
def _objective_losses(model: T5ForConditionalGeneration, pairs: Sequence[Pair], objectives: Sequence[str],
                      into: dict[str, list[float]]) -> None:  # fmt: skip
    """Per-objective loss of this batch after its step (cheap: the last 10% of steps only)."""
    for name in sorted(set(objectives)):
        chosen = [pair for pair, objective in zip(pairs, objectives) if objective == name]
        into.setdefault(name, []).append(float(model(**collate(chosen)).loss.item()))


def build_seq2seq_base(
    out_dir: Path,
    *,
    steps: int,
    seed: int = 0,
    corpus_size: int = DEFAULT_CORPUS_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    sentinels: int = DEFAULT_SENTINELS,
    mixture: dict[str, float] | None = None,
    threads: int = 2,
    model_overrides: dict[str, Any] | None = None,
    log_every: int = 50,
) -> dict[str, Any]:
    """Generate the corpus, train the tokenizer, pretrain a tiny T5 and save it as a Hugging Face model directory.

    `out_dir` gets `config.json`, `generation_config.json`, `model.safetensors` (float32), the tokenizer files and
    `pretrain_report.json` (the returned dict). Loads with `AutoModelForSeq2SeqLM` / `AutoTokenizer`, offline.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        corpus = generate_corpus(corpus_size, seed)
        tokenizer = train_tokenizer((s.text for s in corpus), vocab_size=vocab_size, sentinels=sentinels)
        config = tiny_t5_config(len(tokenizer), **(model_overrides or {}))
        model = new_model(config, seed)
        logger.info("pretraining a %d-parameter T5 (vocab %d) on %d sentences for %d steps",
                    parameter_count(model), len(tokenizer), len(corpus), steps)  # fmt: skip
        stream = PretrainingMixture(corpus, tokenizer, seed, mixture)
        result = pretrain(model, stream, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                          log_every=log_every)  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    last = result.losses[-max(1, steps // 20) :]
    report = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "first_loss": result.losses[0],
        "final_loss": sum(last) / len(last),  # mean of the last 5% of steps: one batch is noisy
        "objective_losses": result.objective_losses,
        "train_seconds": round(result.seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "params": parameter_count(model),
        "vocab_size": len(tokenizer),
        "corpus_size": len(corpus),
        "mixture": stream.mixture,
        "threads": threads,
        "init": "Hugging Face T5 init + copy_friendly_init (orthogonal cross-attention value/output)",
        "config": {key: getattr(config, key) for key in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers",
                                                           "num_decoder_layers", "feed_forward_proj")},  # fmt: skip
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("saved the seq2seq base model to %s: final loss %.3f after %.0f s", out_dir, report["final_loss"],
                report["seconds"])  # fmt: skip
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Greedy decoding and exact match


@torch.no_grad()
def greedy_answers(model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], *,
                   max_new_tokens: int = 24, batch_size: int = 64) -> list[str]:  # fmt: skip
    """Greedy decodes of `prompts` (encoder inputs), special tokens dropped, whitespace stripped."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return out


def exact_match_rate(model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, task: ExampleTask,
                     split: Split = "heldout", limit: int | None = None) -> float:  # fmt: skip
    """Share of the split's records whose greedy answer equals the completion (both whitespace-stripped)."""
    records = task.records(split)[:limit]
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in records])
    return sum(a == r["completion"].strip() for a, r in zip(answers, records)) / max(1, len(records))


# ---------------------------------------------------------------------------------------------------------------------
# Seq2seq tasks for prefix tuning on the frozen base model

_TRIP_PROMPT = "Trip : {input} Who went where :"
_TRIP_TEMPLATES = [
    "{name} took the night train from {a} to {b}.",
    "On {date}, {name} flew to {b} from {a}.",
    "After two weeks in {a}, {name} drove on to {b}.",
    "{name} left {a} on {date} and sailed for {b}.",
    "{name} reached {b} on {date}, having started in {a}.",
    "From {a}, {name} cycled all the way to {b}.",
    "{name} of {c} took the bus from {a} to {b}.",
    "The bus from {a} brought {name} to {b} on {date}.",
    "{name} is moving to {b}, while {other} stays in {a}.",
    "{name}, who grew up in {c}, flew from {a} to {b}.",
]
_TRIP_POOL = {"name": NAMES, "place": PLACES}
TRIP_WORDS = split_pool("trip-destination", _TRIP_POOL)

_EVENT_PROMPT = "Event : {input} Who did what :"
_EVENT_TEMPLATES = [
    "{agent} {verb} the {adj} {object} in {place}.",
    "The {adj} {object} was {verb} by {agent} while {other} watched.",
    "In {place}, {agent} {verb} the {object} for {other}.",
    "{other} saw that {agent} had {verb} the {object}.",
    "It was {agent} who {verb} the {adj} {object}, not {other}.",
    "Yesterday the {object} in {place} was {verb} by {agent}.",
    "{other} noticed that the {adj} {object} had been {verb} by {agent}.",
    "After {other} agreed, {agent} {verb} the {object} in {place}.",
]
_EVENT_POOL = {"name": NAMES, "place": PLACES, "verb": VERBS, "object": OBJECTS,
               "adj": ADJECTIVES}  # fmt: skip
EVENT_WORDS = split_pool("who-did-what", _EVENT_POOL)


def distinct_records(make: Callable[[], Record], size: int) -> list[Record]:
    """`size` records with distinct prompts (the generator's rng makes them; order as made)."""
    seen: set[str] = set()
    out: list[Record] = []
    attempts = 0
    while len(out) < size:
        attempts += 1
        if attempts > size * 200:
            raise RuntimeError(f"task generator ran out of distinct records ({len(out)} of {size})")
        record = make()
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            out.append(record)
    return out


def _trips(split: Split, size: int, rng: random.Random) -> list[Record]:
    words = TRIP_WORDS[split]

    def make() -> Record:
        name, other = rng.sample(words["name"], 2)
        a, b, c = rng.sample(words["place"], 3)
        sentence = rng.choice(_TRIP_TEMPLATES).format(name=name, other=other, a=a, b=b, c=c, date=_date(rng))
        completion = f" {name} to {b}"
        return {"prompt": _TRIP_PROMPT.format(input=sentence), "completion": completion, "input": sentence}

    return distinct_records(make, size)


def _events(split: Split, size: int, rng: random.Random) -> list[Record]:
    words = EVENT_WORDS[split]

    def make() -> Record:
        agent, other = rng.sample(words["name"], 2)
        verb, thing = rng.choice(words["verb"]), rng.choice(words["object"])
        sentence = rng.choice(_EVENT_TEMPLATES).format(
            agent=agent, other=other, verb=verb, object=thing, adj=rng.choice(words["adj"]),
            place=rng.choice(words["place"]),
        )  # fmt: skip
        completion = f" {agent} {verb} the {thing}"
        return {"prompt": _EVENT_PROMPT.format(input=sentence), "completion": completion, "input": sentence}

    return distinct_records(make, size)


SEQ2SEQ_TASKS: dict[str, ExampleTask] = {
    task.task_id: task
    for task in (
        ExampleTask(
            task_id="trip-destination",
            description="a sentence about a journey -> '<traveller> to <destination>' (origin, home town, a second "
            "person and the date distract)",
            template=None,
            prompt_template=_TRIP_PROMPT.replace("{input}", "{inputs}"),
            instruction="Who travelled, and where did the journey end? Answer as '<name> to <place>'.",
            train_size=400,
            heldout_size=100,
            seed=0,
            _generate=_trips,
        ),
        ExampleTask(
            task_id="who-did-what",
            description="an event sentence (active, passive, cleft, bystanders) -> '<agent> <verb> the <object>'",
            template=None,
            prompt_template=_EVENT_PROMPT.replace("{input}", "{inputs}"),
            instruction="Who did what? Answer as '<name> <verb> the <object>'.",
            train_size=400,
            heldout_size=100,
            seed=0,
            _generate=_events,
        ),
    )
}


def get_seq2seq_task(task_id: str) -> ExampleTask:
    try:
        return SEQ2SEQ_TASKS[task_id]
    except KeyError:
        raise ValueError(f"unknown seq2seq task {task_id!r}; choose from {', '.join(SEQ2SEQ_TASKS)}") from None

