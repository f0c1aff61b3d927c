"""tokenize_ptb: a pure-Python stand-in for coco-caption's Stanford PTBTokenizer, used when Java is missing
and for the fast scores of training (per-epoch validation, the self-critical reward).

Behaviour measured against stanford-corenlp-3.4.1 (the jar coco-caption ships), not a full port: it
covers what captions contain. Brackets come out as -lrb- etc. because -lowerCase lower-cases them and
coco's PUNCTUATIONS list only holds the upper-case forms.
"""
import re

from pycocoevalcap.tokenizer import ptbtokenizer

PUNCTUATIONS = set(ptbtokenizer.PUNCTUATIONS)
_UNICODE = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": " ` ", "\u2019": "'",
                          "\u201a": "'", "\u2014": " -- ", "\u2013": " -- ", "\u2015": " -- ",
                          "\u2026": " ... "})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Pieces that become tokens of their own wherever they stand (commas/colons/semicolons
# stay inside numbers such as 1,000 and 10:30).
_SEPARATE = re.compile(r'(\.{2,}|-{2,}|[()\[\]{}"\u00a1-\u00bf\u00d7\u00f7\u2000-\u2bff]'
                       r'|(?<!\d)[,;:](?!//)|[,;:](?!\d|//))')
# "x." keeps its period in these cases (3.4.1 treats them as abbreviations).
_ABBREV = set("""mr mrs ms messrs mme mlle dr st jr sr vs etc inc ltd co corp cos bros esq prof mt
    ave rd blvd gen sen rep reps gov capt lt col sgt cpl pvt maj adm cmdr rev hon ph wm jos elec
    natl mfg mtg invt dept cie treas cf al est ft sq ste ct univ assn rt bldg jan feb mar apr jun
    jul aug sep sept oct nov dec mon tue tues wed thu thurs fri ala ariz calif colo conn fla ga
    ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis wisc wyo""".split())
_ABBREV_BEFORE_NUMBER = {"no", "nos", "fig", "figs", "ca", "prop", "art", "pp", "op"}
# A single letter + "." ends a sentence only before one of these words; at a line end the
# Java lexer looks at the first word of the next line.
_SENTENCE_STARTS = set("""The A An He She It They We You In At This That These There Here But So If
    When While As Then Now Her Their Our Some Many More One After Since Yet About What Such Once
    However Earlier Last Other Mr. Ms.""".split())
_ASSIMILATIONS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                  "lemme": ["lem", "me"], "gimme": ["gim", "me"], "wanna": ["wan", "na"],
                  "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_WHOLE = {"'n'", "'em", "'cause", "'til", "'s", "'re", "'ve", "'ll", "'d", "'m", "n't"}
_CLITIC = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
_LEAD = re.compile(r"-+(?!\d)|`+|'(?!\d\ds?$)|\$|#(?=\d)|y'(?=[a-z])", re.IGNORECASE)
_TRAIL = re.compile(r"(-+|'|[!?]+|%)$")


def _keeps_period(word: str, follower: str | None) -> bool:
    """Whether 3.4.1 keeps the period of `word + "."` attached, given the next chunk."""
    if follower in (",", ";", ":"):
        return True
    if re.fullmatch(r"([A-Za-z]\.)+[A-Za-z]", word) or word.lower() in _ABBREV:
        return True
    if len(word) == 1 and word.isalpha():
        return follower not in _SENTENCE_STARTS
    return word.lower() in _ABBREV_BEFORE_NUMBER and bool(follower) and follower[0].isdigit()


def _chunk_tokens(chunk: str, follower: str | None) -> list[str]:
    """Tokens of one whitespace-free chunk; `follower` is the next chunk (see tokenize_ptb)."""
    if chunk in _BRACKETS:
        return [_BRACKETS[chunk]]
    if re.fullmatch(r'["]|[.,;:]|\.{2,}|-{2,}', chunk):
        return ["."]  # quotes, dots and dashes all become tokens that coco drops
    head, tail = [], []
    while chunk and chunk.lower() not in _WHOLE and chunk.lower() not in _ASSIMILATIONS:
        lead = _LEAD.match(chunk)
        if not lead or lead.end() == len(chunk):
            break
        head.append(lead.group())
        chunk = chunk[lead.end():]
    while chunk and chunk.lower() not in _WHOLE:
        trail = _TRAIL.search(chunk)
        if trail and trail.start() > 0:
            tail.insert(0, trail.group())
            chunk = chunk[:trail.start()]
        elif len(chunk) > 1 and chunk.endswith(".") and \
                not _keeps_period(chunk[:-1], tail[0] if tail else follower):
            tail.insert(0, ".")
            chunk = chunk[:-1]
        else:
            break
    middle = []
    while chunk.lower() not in _WHOLE and (clitic := _CLITIC.search(chunk)) and clitic.start() > 0:
        middle.insert(0, clitic.group())
        chunk = chunk[:clitic.start()]
    middle = _ASSIMILATIONS.get(chunk.lower(), [chunk]) + middle
    return head + middle + tail


def tokenize_ptb(captions: list[str]) -> list[str]:
    """Pure-Python stand-in for pycocoevalcap's PTBTokenizer: one token string per caption."""
    lines = []
    for caption in captions:
        text = " ".join(caption.translate(_UNICODE).replace("&amp;", "&").split())
        text = re.sub(r"(?<=[^\s.])\.(?=\.)", ". ", text)  # "etc..." -> "etc." + ".."
        # Java keeps "3 1/2" as one token joined by a no-break space (str.split() splits it)
        text = re.sub(r"(?<![\w.,:/])(\d{1,4}) (\d{1,4}/\d{1,4})(?![\w/])", "\\1\u00a0\\2", text)
        lines.append([c for c in _SEPARATE.sub(r" \1 ", text).split(" ") if c])
    out = []
    for line, next_line in zip(lines, lines[1:] + [[]]):
        tokens = []
        for i, chunk in enumerate(line):
            if i + 1 < len(line):
                follower = line[i + 1]
            else:  # like Java, peek at the next caption, but only for the "x." rule
                follower = next_line[0] if next_line and len(chunk) == 2 else None
            tokens += _chunk_tokens(chunk, follower)
        out.append(" ".join(t.lower() for t in tokens if t and t not in PUNCTUATIONS))
    return out
