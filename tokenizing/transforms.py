"""Reversible text transforms applied to documents before tokenizing, and their inverses.

A transform rewrites a document into text that a tokenizer trained on transformed text models better, and
must lose nothing: ``inverse(forward(text)) == text`` for every string. BPB is still scored on the ORIGINAL
text's bytes: the tokenize stage writes how many original bytes each token stands for, and the compliance
stage decodes every val document, inverts the transform and recounts.

``caseops_v1`` (the records' ``lossless_caps_caseops_v1``, golf's own implementation): ASCII capitals become
lowercase letters preceded by private-use operator characters, so one lowercase piece serves every case
variant of a word. Over each maximal run of ASCII letters:

  - all lowercase: unchanged
  - two or more letters, all uppercase:    ALLCAPS + the run in lowercase        ("NASA" -> A"nasa")
  - first letter uppercase, rest lowercase: TITLE + the run in lowercase         ("The" -> T"the", "A" -> T"a")
  - anything else: TITLE if the first letter is uppercase, then CAPNEXT before each later uppercase letter
                                                                                 ("McDo" -> T"mc"C"do")
  - an operator character found in the input is escaped: ESC + the character

with TITLE, ALLCAPS, CAPNEXT, ESC = U+E001..U+E004. The tokenizer must hold each operator as a piece of its
own (SentencePiece ``user_defined_symbols``); its tokens stand for 0 original bytes, an escaped operator for
its own 3.

Decoding a tokenized document gives the transform of the NORMALISED document (SentencePiece's nmt_nfkc), and
normalising can merge a lowercase letter with a following combining mark ('a' + U+0301 -> 'á'). The inverse
therefore also capitalises a letter such as 'á' after TITLE or CAPNEXT (its capital has the same UTF-8
length, so the byte counts hold), and leaves an ALLCAPS word's merged letters as they are (the document's
bytes still agree; its text then differs from the original in case only, which compliance reports).

    python -c "from tokenizing.transforms import get; t = get('caseops_v1'); print(ascii(t.forward('The NASA')))"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .docs import DataError


class TransformError(DataError):
    """A transform name that does not exist, or text that is not the output of the transform."""


@dataclass(frozen=True)
class Transform:
    name: str
    forward: Callable[[str], str]
    inverse: Callable[..., str]   # inverse(text, partial=False); partial: the text may end inside an operation
    operators: tuple[str, ...]    # characters the tokenizer must hold as pieces of their own; 0 original bytes
    escape: str | None            # the operator that makes the next operator literal (counted as its bytes)


# --- caseops_v1 ------------------------------------------------------------------------------------------
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CASEOPS_OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)

_FORWARD = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# an escaped character | ALLCAPS and its word | TITLE/CAPNEXT and one letter | any other operator (malformed)
_INVERSE = re.compile("\ue004(.)|\ue002([a-z]+)|[\ue001\ue003](.)|([\ue001-\ue004])", re.S)


def _encode_run(m: re.Match) -> str:
    run = m.group()
    if run in CASEOPS_OPERATORS:
        return ESC + run
    if run.islower():
        return run
    low = run.lower()
    if len(run) > 1 and run.isupper():
        return ALLCAPS + low
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + low
    # mixed case: mark the first letter with TITLE, every later capital with CAPNEXT
    head = (TITLE if run[0].isupper() else "") + low[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run[1:])


def caseops_forward(text: str) -> str:
    return _FORWARD.sub(_encode_run, text)


def _capital(ch: str, at: int) -> str:
    up = ch.upper()
    # 'a'..'z', or a letter normalisation merged from one and a combining mark: one character, same byte length
    if ch != up and len(up) == 1 and len(up.encode("utf-8")) == len(ch.encode("utf-8")):
        return up
    raise TransformError(f"caseops_v1: a capital operator at character {at} is followed by {ch!r}, not a "
                         f"lowercase letter: not CaseOps text")


def caseops_inverse(text: str, partial: bool = False) -> str:
    """The original of ``caseops_forward`` output; ``partial``: the text is cut short (eval.max_tokens), so an
    operator at its very end is dropped instead of refused."""
    def undo(m: re.Match) -> str:
        escaped, word, letter, bad = m.groups()
        if escaped is not None:
            if escaped not in CASEOPS_OPERATORS:
                raise TransformError(f"caseops_v1: ESC at character {m.start()} escapes {escaped!r}, which is not "
                                     f"an operator: not CaseOps text")
            return escaped
        if word is not None:
            return word.upper()
        if letter is not None:
            return _capital(letter, m.start())
        if partial and m.end() == len(text):
            return ""
        raise TransformError(f"caseops_v1: operator U+{ord(bad):04X} at character {m.start()} has no letter after "
                             f"it: not CaseOps text")
    return _INVERSE.sub(undo, text)


# --- the registry ------------------------------------------------------------------------------------------
def _identity(text: str, partial: bool = False) -> str:
    return text


TRANSFORMS: dict[str, Transform] = {
    "none": Transform("none", _identity, _identity, (), None),
    "caseops_v1": Transform("caseops_v1", caseops_forward, caseops_inverse, CASEOPS_OPERATORS, ESC),
}


def get(name: str) -> Transform:
    if name not in TRANSFORMS:
        raise TransformError(f"unknown text transform {name!r}; transforms: {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name]


def operator_ids(sp, transform: Transform, what: str = "the tokenizer") -> tuple[list[int], int]:
    """The token ids of the transform's operators and of its escape (-1: none) in ``sp``, which must hold each
    operator as a piece of its own; a tokenizer made for a transform is refused without it."""
    ids = []
    for op in transform.operators:
        i = sp.piece_to_id(op)
        if i == sp.unk_id() or sp.id_to_piece(i) != op:
            raise TransformError(f"{what} has no piece for the {transform.name} operator U+{ord(op):04X}: it was "
                                 f"not made for transform={transform.name}")
        ids.append(i)
    if not transform.operators:
        for name, t in TRANSFORMS.items():
            held = [op for op in t.operators if sp.id_to_piece(sp.piece_to_id(op)) == op]
            if held and len(held) == len(t.operators):
                raise TransformError(f"{what} holds the operators of transform {name}: it tokenizes transformed "
                                     f"text; set tokenize.transform={name}")
    esc = ids[transform.operators.index(transform.escape)] if transform.escape else -1
    return ids, esc
