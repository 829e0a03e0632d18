"""The built-in instruction task suite: ten families of short prompts with exactly checkable answers.

Every record is an :data:`Example` (``instruction``, ``input``, ``output``, ``family``). Example ``i`` of a
suite belongs to family ``families[i % len(families)]`` (round-robin, so families are balanced), and each
family draws from its own random stream seeded by ``(seed, family)``: a suite is a pure function of
``(num_examples, seed, families)``, the first ``n`` examples of a longer suite are the suite of size ``n``,
and a family's examples do not change when other families are added or removed.

Answers are short strings compared by :func:`devft.data.formatting.answers_match`. The catalogue, with an
example per family and the calibration on SmolLM2-135M-Instruct, is in ``docs/tasks.md``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

Example = dict[str, str]
"""One instruction record: keys ``instruction``, ``input`` (may be empty), ``output`` and ``family``."""

_NOUNS = (
    "apple", "river", "garden", "window", "pencil", "candle", "rocket", "forest", "castle", "button",
    "island", "ladder", "mirror", "planet", "basket", "bridge", "camera", "dragon", "engine", "feather",
    "guitar", "hammer", "jacket", "kettle", "lemon", "magnet", "needle", "orange", "parrot", "pillow",
    "rabbit", "saddle", "tiger", "tunnel", "violin", "wagon", "yogurt", "zebra", "anchor", "blanket",
    "cactus", "desert", "finger", "glove", "harbor", "insect", "jungle", "kitten", "lantern", "meadow",
    "napkin", "oyster", "puzzle", "quilt", "ribbon", "shovel", "teapot", "umbrella", "valley", "walnut",
)  # fmt: skip
_ADJECTIVES = (
    "quiet", "bright", "happy", "small", "golden", "silver", "gentle", "rapid", "hidden", "frozen",
    "ancient", "brave", "clever", "dusty", "empty", "fancy", "gloomy", "hollow", "lucky", "modern",
    "narrow", "noble", "orange", "purple", "rusty", "shiny", "silent", "sleepy", "smooth", "sunny",
    "tiny", "wild", "windy", "wooden", "young", "calm", "cozy", "crisp", "eager", "fresh",
)  # fmt: skip
_WORDS = (
    "red", "fox", "jumps", "over", "blue", "moon", "sings", "under", "green", "tree", "runs", "near",
    "old", "ship", "sails", "past", "cold", "wind", "blows", "across", "warm", "sun", "shines", "on",
    "tall", "hill", "stands", "by", "soft", "rain", "falls", "into", "dark", "sea", "waits", "for",
    "dog", "cat", "bird", "fish", "book", "door", "lamp", "road", "star", "cloud", "snow", "sand",
)  # fmt: skip
_ITEMS = (
    "apple", "pear", "fig", "plum", "lime", "kiwi", "grape", "melon", "peach", "mango", "cherry", "lemon",
    "spoon", "fork", "cup", "plate", "bowl", "knife", "chair", "table", "lamp", "clock", "book", "pen",
    "shoe", "sock", "hat", "coat", "scarf", "glove",
)  # fmt: skip
_REVIEW_NOUNS = (
    "food", "service", "room", "staff", "music", "view", "coffee", "movie", "book", "seats",
    "bed", "screen", "battery", "delivery", "plot", "ending", "soup", "bread", "hotel", "show",
)  # fmt: skip
_POSITIVE = (
    "great", "wonderful", "excellent", "lovely", "superb", "delightful", "fantastic", "pleasant",
    "charming", "brilliant", "perfect", "amazing",
)  # fmt: skip
_NEGATIVE = (
    "awful", "terrible", "dreadful", "poor", "horrible", "disappointing", "bland", "rude", "dirty",
    "boring", "broken", "noisy",
)  # fmt: skip
_FIRST_NAMES = (
    "Alice", "Bruno", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Irene", "James", "Karen",
    "Louis", "Maria", "Nikos", "Olivia", "Peter", "Quinn", "Rosa", "Samuel", "Tara", "Umar", "Vera",
    "Walter", "Xenia", "Yusuf", "Zoe", "Anna", "Boris", "Chloe", "Daniel", "Emma", "Frank", "Greta",
    "Henry", "Ida", "Jonas", "Kira", "Leo", "Mila", "Noah", "Oscar", "Paula", "Ruth", "Simon", "Thea",
    "Victor", "Wanda", "Yara", "Adam", "Bella", "Carl", "Diana", "Ethan", "Fiona", "George", "Hannah",
    "Isaac", "Julia", "Kevin", "Laura",
)  # fmt: skip
_LAST_NAMES = (
    "Smith", "Jones", "Brown", "Taylor", "Wilson", "Davies", "Evans", "Thomas", "Johnson", "Roberts",
    "Walker", "Wright", "Robinson", "Thompson", "White", "Hughes", "Edwards", "Green", "Hall", "Wood",
    "Harris", "Martin", "Jackson", "Clarke", "Turner", "Hill", "Moore", "Cooper", "Ward", "Morris",
    "King", "Baker", "Harrison", "Morgan", "Allen", "Young", "Scott", "Mitchell", "Kelly", "Bell",
    "Garcia", "Rossi", "Novak", "Kowalski", "Silva", "Meyer", "Dubois", "Jansen", "Berg", "Larsen",
    "Fischer", "Weber", "Costa", "Moreau", "Ivanov", "Tanaka", "Kim", "Chen", "Singh", "Murphy",
)  # fmt: skip
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
# (source unit, target unit as written in the instruction, factor)
_CONVERSIONS = (
    ("km", "metres", 1000),
    ("m", "centimetres", 100),
    ("kg", "grams", 1000),
    ("L", "millilitres", 1000),
)


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1)
    return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)


def _convert_units(rng: random.Random) -> tuple[str, str, str]:
    unit, target, factor = rng.choice(_CONVERSIONS)
    value = rng.randint(1, 999)
    return f"Convert to {target}.", f"{value} {unit}", str(value * factor)


def _sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(1, 100), 4)
    shown = ", ".join(map(str, numbers))
    return "Sort the numbers from smallest to largest.", shown, ", ".join(map(str, sorted(numbers)))


def _count_items(rng: random.Random) -> tuple[str, str, str]:
    items = rng.sample(_ITEMS, rng.randint(2, 9))
    return "How many items are in the list?", ", ".join(items), str(len(items))


def _change_case(rng: random.Random) -> tuple[str, str, str]:
    text = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    if rng.random() < 0.5:
        shown = text.title() if rng.random() < 0.5 else text
        return "Write the text in uppercase.", shown, text.upper()
    shown = text.title() if rng.random() < 0.5 else text.upper()
    return "Write the text in lowercase.", shown, text


def _reverse_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _sentiment(rng: random.Random) -> tuple[str, str, str]:
    positive = rng.random() < 0.5
    adjectives = _POSITIVE if positive else _NEGATIVE
    first, second = rng.sample(_REVIEW_NOUNS, 2)
    if rng.random() < 0.5:
        review = f"The {first} was {rng.choice(adjectives)}."
    else:
        a, b = rng.sample(adjectives, 2)
        review = f"The {first} was {a} and the {second} was {b}."
    return "Is this review positive or negative?", review, "positive" if positive else "negative"


def _format_date(rng: random.Random) -> tuple[str, str, str]:
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    name = _MONTHS[month - 1]
    shown = f"{name} {day}, {year}" if rng.random() < 0.5 else f"{day} {name} {year}"
    return "Write the date as YYYY-MM-DD.", shown, f"{year:04d}-{month:02d}-{day:02d}"


def _format_name(rng: random.Random) -> tuple[str, str, str]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    return "Write the name as Last, First.", f"{first} {last}", f"{last}, {first}"


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add,
    "subtract": _subtract,
    "convert_units": _convert_units,
    "sort_numbers": _sort_numbers,
    "count_items": _count_items,
    "change_case": _change_case,
    "reverse_words": _reverse_words,
    "sentiment": _sentiment,
    "format_date": _format_date,
    "format_name": _format_name,
}

TASK_FAMILIES: tuple[str, ...] = tuple(_GENERATORS)
"""Names of the built-in task families, in the suite's round-robin order."""


def check_families(families: Sequence[str] | None) -> tuple[str, ...]:
    """Return the selected families in the order given (all of :data:`TASK_FAMILIES`, in suite order, for ``None`` or empty).

    Raises ``ValueError`` naming the first unknown or repeated family.
    """
    if not families:
        return TASK_FAMILIES
    if isinstance(families, str):
        raise ValueError(f"families must be a sequence of family names, got the string families={families!r}")
    seen: set[str] = set()
    for family in families:
        if family not in _GENERATORS:
            raise ValueError(f"unknown task family={family!r}; known families: {list(TASK_FAMILIES)}")
        if family in seen:
            raise ValueError(f"task family={family!r} is listed twice in families={list(families)}")
        seen.add(family)
    return tuple(families)


def generate_task_suite(num_examples: int, seed: int, families: Sequence[str] | None = None) -> list[Example]:
    """Generate ``num_examples`` task records deterministically from ``seed``.

    ``families`` selects and orders the families (``None`` or empty: all of :data:`TASK_FAMILIES`);
    example ``i`` belongs to ``families[i % len(families)]``. The suite may repeat a record when it is
    large; :func:`devft.data.federated.build_federated_data` removes test records that appear in training.
    """
    if int(num_examples) != num_examples or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative integer, got num_examples={num_examples!r}")
    chosen = check_families(families)
    # String seeds are hashed with SHA-512 by `random`, so the streams do not depend on PYTHONHASHSEED.
    rngs = {family: random.Random(f"devft-tasks:{seed}:{family}") for family in chosen}
    suite: list[Example] = []
    for i in range(int(num_examples)):
        family = chosen[i % len(chosen)]
        instruction, input_text, output = _GENERATORS[family](rngs[family])
        suite.append({"instruction": instruction, "input": input_text, "output": output, "family": family})
    return suite
