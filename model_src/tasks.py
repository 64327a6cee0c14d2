"""Built-in tasks (`dates`, `reverse`, `copy`) generated from a seed, and user corpora from a TSV file.

Every task yields (source, target) string pairs in three disjoint splits. Disjointness is by the underlying
item (the calendar date for `dates`, the string for `reverse`/`copy`), so the test split holds only dates or
strings the model never saw in training, in any format.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

Pair = tuple[str, str]


@dataclass(frozen=True)
class TaskData:
    name: str
    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]
    extra_tests: dict[str, list[Pair]] = field(default_factory=dict)  # more held-out sets, reported beside `test`

    def texts(self):
        for split in (self.train, self.validation, self.test, *self.extra_tests.values()):
            for src, tgt in split:
                yield src
                yield tgt


def _bucket(key: str, seed: int) -> int:
    """A stable 0..99 bucket for `key`: 0-79 train, 80-89 validation, 90-99 test."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % 100


def _split_of(key: str, seed: int) -> str:
    b = _bucket(key, seed)
    return "train" if b < 80 else ("validation" if b < 90 else "test")


# ---------------------------------------------------------------- dates
MONTHS = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"],
}
WEEKDAYS = {
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "fr": ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
}
DATE_MIN, DATE_MAX = dt.date(1950, 1, 1), dt.date(2049, 12, 31)  # two-digit years: 50-99 -> 19xx, 00-49 -> 20xx
YEAR_MIN, YEAR_MAX = 1000, 2999  # four-digit years outside the two-digit window: held out by whole years


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


Part = str | tuple[str, str]  # literal text, or (field, text) for the year, month or day


def _date_parts(d: dt.date) -> list[list[Part]]:
    """Ways people write `d`, as parts that name the year, month and day. Numeric forms are day-first (dd/mm/yy,
    dd.mm.yyyy) or ISO-like year-first, never month-first, so that every string has exactly one reading;
    two-digit years only inside 1950-2049."""
    day, mon, year, wd = d.day, d.month, d.year, d.weekday()
    en, fr, de, es = MONTHS["en"][mon - 1], MONTHS["fr"][mon - 1], MONTHS["de"][mon - 1], MONTHS["es"][mon - 1]
    Y, yy = ("year", str(year)), ("year", f"{year % 100:02d}")
    D, DD, M, MM = ("day", str(day)), ("day", f"{day:02d}"), ("month", str(mon)), ("month", f"{mon:02d}")
    fr_day = ("day", "1er" if day == 1 else str(day))
    return [
        [("day", _ordinal(day)), " of ", ("month", en), " ", Y], [("month", en), " ", D, ", ", Y],
        [D, " ", ("month", en), " ", Y], [("month", en[:3]), " ", D, " ", Y],
        [f"{WEEKDAYS['en'][wd]}, ", ("month", en), " ", D, ", ", Y], [D, " ", ("month", en[:3].upper()), " ", Y],
        [("month", en), " ", ("day", _ordinal(day)), ", ", Y],
        [f"{WEEKDAYS['fr'][wd]} ", fr_day, " ", ("month", fr), " ", Y], [fr_day, " ", ("month", fr), " ", Y],
        ["le ", fr_day, " ", ("month", fr), " ", Y],
        [D, ". ", ("month", de), " ", Y], [f"{WEEKDAYS['de'][wd]}, ", D, ". ", ("month", de), " ", Y],
        [D, " de ", ("month", es), " de ", Y], [f"{WEEKDAYS['es'][wd]}, ", D, " de ", ("month", es), " de ", Y],
        *([[DD, "/", MM, "/", yy]] if DATE_MIN <= d <= DATE_MAX else []),
        [DD, "/", MM, "/", Y], [D, "/", M, "/", Y],
        [DD, ".", MM, ".", Y], [Y, "/", MM, "/", DD], [Y, "-", MM, "-", DD],
    ]


def _joined(parts: list[Part]) -> tuple[str, dict[str, tuple[int, int]]]:
    """A date's text and the [start, end) characters of its year, month and day."""
    text, fields = "", {}
    for part in parts:
        if isinstance(part, tuple):
            fields[part[0]] = (len(text), len(text) + len(part[1]))
            part = part[1]
        text += part
    return text, fields


def _date_formats(d: dt.date) -> list[str]:
    return [_joined(parts)[0] for parts in _date_parts(d)]


ISO_FIELDS = {"year": (0, 4), "month": (5, 7), "day": (8, 10)}  # in YYYY-MM-DD


def date_gold(source: str, target: str) -> list[tuple[int, int, int, int]]:
    """The gold alignment of a `dates` pair: (source_start, source_end, target_start, target_end) for the year,
    the month and the day, from the template that wrote `source`. [] if no template writes it."""
    try:
        d = dt.date.fromisoformat(target)
    except ValueError:
        return []
    for parts in _date_parts(d):
        text, fields = _joined(parts)
        if text == source:
            return [(*fields[f], *ISO_FIELDS[f]) for f in ("year", "month", "day")]
    return []


def _random_date(rng: random.Random, years: list[int]) -> dt.date:
    year = rng.choice(years)
    return dt.date(year, 1, 1) + dt.timedelta(days=rng.randrange(366 if calendar.isleap(year) else 365))


def dates_task(seed: int = 0, n_train: int = 60000, n_eval: int = 1000) -> TaskData:
    """Dates in many formats and four languages, to ISO 8601 (e.g. "mardi 3 mars 2021" -> "2021-03-02"), years
    1000-2999. Inside 1950-2049 (where two-digit years are read) days are split between train, validation and
    test; outside it whole years are, so `test_years` measures years never seen in training. Training draws half
    its pairs from each range; `test` is 1950-2049, as it always was."""
    days = (DATE_MAX - DATE_MIN).days + 1
    pools: dict[str, list[dt.date]] = {"train": [], "validation": [], "test": []}
    for i in range(days):
        d = DATE_MIN + dt.timedelta(days=i)
        pools[_split_of(d.isoformat(), seed)].append(d)
    years: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for year in (y for y in range(YEAR_MIN, YEAR_MAX + 1) if not DATE_MIN.year <= y <= DATE_MAX.year):
        years[_split_of(f"year:{year}", seed)].append(year)
    rng = random.Random(seed)

    def pair(d: dt.date) -> Pair:
        return rng.choice(_date_formats(d)), d.isoformat()

    def sample(split: str, n: int, far_share: float) -> list[Pair]:
        return [pair(_random_date(rng, years[split]) if rng.random() < far_share else rng.choice(pools[split]))
                for _ in range(n)]

    return TaskData("dates", sample("train", n_train, 0.5), sample("validation", n_eval, 0.5),
                    sample("test", n_eval, 0.0), {"test_years": sample("test", n_eval, 1.0)})


# ---------------------------------------------------------------- reverse / copy
def _string_task(name: str, transform, seed: int, n_train: int, n_eval: int, min_len: int = 1,
                 max_len: int = 16) -> TaskData:
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase
    splits: dict[str, list[Pair]] = {"train": [], "validation": [], "test": []}
    wanted = {"train": n_train, "validation": n_eval, "test": n_eval}
    seen: set[str] = set()
    while any(len(splits[k]) < wanted[k] for k in splits):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
        split = _split_of(s, seed)
        if len(splits[split]) >= wanted[split] or (split != "train" and s in seen):
            continue
        seen.add(s)
        splits[split].append((s, transform(s)))
    return TaskData(name, splits["train"], splits["validation"], splits["test"])


def reverse_task(seed: int = 0, n_train: int = 60000, n_eval: int = 1000) -> TaskData:
    """Lowercase strings of length 1-16 to their reverse."""
    return _string_task("reverse", lambda s: s[::-1], seed, n_train, n_eval)


def copy_task(seed: int = 0, n_train: int = 60000, n_eval: int = 1000) -> TaskData:
    """Lowercase strings of length 1-16 to themselves."""
    return _string_task("copy", lambda s: s, seed, n_train, n_eval)


TASKS = {"dates": dates_task, "reverse": reverse_task, "copy": copy_task}


def gold_alignment(task: str, source: str, target: str) -> list[tuple[int, int, int, int]] | None:
    """The links a built-in task knows for a pair, as (source_start, source_end, target_start, target_end)
    character spans: `dates` its year, month and day; `reverse` each character and its mirror; `copy` each
    character and itself. None for tasks without gold (user corpora, imported models)."""
    n = len(source)
    if task == "dates":
        return date_gold(source, target)
    if task == "reverse":
        return [(n - 1 - i, n - i, i, i + 1) for i in range(n)] if target == source[::-1] else []
    if task == "copy":
        return [(i, i + 1, i, i + 1) for i in range(n)] if target == source else []
    return None


def task_of_checkpoint(config: dict) -> TaskData | None:
    """The task a checkpoint was trained on, rebuilt from its config.json; None if it cannot be rebuilt."""
    seed = config.get("training", {}).get("seed", 0)
    if config.get("task") in TASKS:
        return TASKS[config["task"]](seed)
    if config.get("data") and Path(config["data"]).is_file():
        return tsv_task(Path(config["data"]), seed)
    return None


def load_task(name: str, seed: int = 0) -> TaskData:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}, or pass --data FILE.tsv")
    return TASKS[name](seed)


# ---------------------------------------------------------------- user data
class CorpusError(ValueError):
    """A user corpus that cannot be used; the message names the file and line."""


def read_tsv(path: Path) -> list[Pair]:
    """A small corpus whole, checked line by line (large ones are streamed: model_src.data.Corpus)."""
    from .data import Corpus

    pairs = [pair for _, pair in Corpus(Path(path)).lines()]
    if not pairs:
        raise CorpusError(f"{path}: the corpus is empty (no 'source<TAB>target' lines)")
    return pairs


def tsv_task(path: Path, seed: int = 0, limit: int = 5_000) -> TaskData:
    """A user corpus's held-out splits, streamed from disk: 80/10/10 by a stable hash of the source (a repeated
    source stays in one split), each kept to its first `limit` pairs. Training reads the corpus itself
    (model_src.data.Corpus); `train` here is empty."""
    from .data import Corpus

    corpus = Corpus(Path(path), seed)
    validation, test = corpus.split("validation", limit), corpus.split("test", limit)
    if not validation or not test:  # tiny corpora: evaluate on training pairs rather than on nothing
        fallback = corpus.split("train", 50)
        if not fallback and not validation and not test:
            raise CorpusError(f"{path}: the corpus is empty (no 'source<TAB>target' lines)")
        validation = validation or fallback
        test = test or validation
    return TaskData(Path(path).stem, [], validation, test)
