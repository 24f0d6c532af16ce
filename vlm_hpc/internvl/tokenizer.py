"""The InternLM2 tokenizer of InternVL-Chat-V1.5, reimplemented on sentencepiece with the original's exact ids.

No built-in transformers class reproduces it: the chat tokens live in `[UNUSED_TOKEN_*]` slots renamed by
tokenizer_config.json, BOS comes from the sentencepiece model, and decoding has the slow tokenizer's quirks
(clean-up of " ." etc., byte-fallback to U+FFFD). Everything is read from the model folder's files:
`tokenizer.model`, `tokenizer_config.json` (`added_tokens_decoder`, `additional_special_tokens`, flags) and
`special_tokens_map.json`.

The ids are the original's on every sentencepiece 0.2.x: InternLM2's vocabulary has a piece that is a literal NUL
(id 354), which sentencepiece 0.2.0 (the original's) gives U+0000, while 0.2.1 and later ignore that piece and
byte-fall-back U+0000 to `<0x00>`; the wrapper puts the piece back (`_nul_piece_to_restore`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from vlm_hpc.errors import VlmHpcError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
NUL = "\x00"
_QUIET_LOG_LEVEL = 2  # sentencepiece's ERROR: warnings and info are not printed
_DEFAULT_LOG_LEVEL = 0  # sentencepiece's own default (the level has no getter to restore from)

# transformers' `clean_up_tokenization`, which the slow tokenizer always applies when joining pieces.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclass(frozen=True)
class AddedToken:
    """A string the tokenizer never splits: matched before sentencepiece runs, mapped straight to its id."""

    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


@dataclass(frozen=True)
class Batch:
    """Left-padded token ids and attention mask, as lists of equal-length rows."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]


class InternLM2Tokenizer:
    """Encode and decode exactly as the original slow `InternLM2Tokenizer` on transformers 4.37 does."""

    def __init__(self, model_file: Path, config: dict, special_map: dict) -> None:
        self.sp = _load_processor(model_file)
        self.nul_id = _nul_piece_to_restore(self.sp, model_file)  # None: encode needs no help with U+0000
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.added = _read_added_tokens(config)
        self.added_by_content = {token.content: token for token in self.added.values()}
        self.special_tokens = _special_tokens(config, special_map)
        self.special_ids = {self.added_by_content[t].id for t in self.special_tokens if t in self.added_by_content}
        # Longest first, so that at one position the longest added token wins.
        contents = sorted(self.added_by_content, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(re.escape(c) for c in contents)) if contents else None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        pad = _token_text(config.get("pad_token", special_map.get("pad_token")))
        self.pad_id = self.token_to_id(pad) if pad is not None else self.eos_id

    def __len__(self) -> int:
        return max(self.sp.get_piece_size(), max(self.added, default=-1) + 1)

    def token_to_id(self, token: str) -> int:
        """Id of an added token or sentencepiece piece; raises if the folder does not define it."""
        if token in self.added_by_content:
            return self.added_by_content[token].id
        if token == NUL and self.nul_id is not None:
            return self.nul_id
        piece_id = self.sp.piece_to_id(token)
        if piece_id == self.sp.unk_id() and token != self.sp.id_to_piece(piece_id):
            raise VlmHpcError(f"tokenizer: token {token!r} is not in the vocabulary; is this an InternVL tokenizer?")
        return piece_id

    def id_to_token(self, token_id: int) -> str:
        """Added tokens by their configured text, everything else by its sentencepiece piece."""
        if token_id in self.added:
            return self.added[token_id].content
        return self.sp.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, BOS included, as the original tokenizer returns them."""
        ids: list[int] = []
        for chunk, is_added in self._split_on_added(text):
            if is_added:
                ids.append(self.added_by_content[chunk].id)
            elif chunk:
                ids.extend(self._encode_text(chunk))
        prefix = [self.bos_id] if self.add_bos_token else []
        suffix = [self.eos_id] if self.add_eos_token else []
        return prefix + ids + suffix

    def _encode_text(self, text: str) -> list[int]:
        """sentencepiece 0.2.0's ids of text between added tokens. No other piece contains NUL (checked at load)
        and the model neither normalizes nor adds a dummy prefix, so BPE never merges across a NUL: the text
        encodes as its NUL-free parts, with the NUL piece between them."""
        if self.nul_id is None or NUL not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for index, part in enumerate(text.split(NUL)):
            if index:
                ids.append(self.nul_id)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: list[str]) -> Batch:
        """Encode several texts and left-pad them with the pad id, as `batch_chat` does."""
        rows = [self.encode(text) for text in texts]
        width = max((len(row) for row in rows), default=0)
        return Batch(
            input_ids=[[self.pad_id] * (width - len(row)) + row for row in rows],
            attention_mask=[[0] * (width - len(row)) + [1] * len(row) for row in rows],
        )

    def decode_tokens(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=...)` of the original slow tokenizer, quirks included."""
        tokens = [self.id_to_token(i) for i in ids if not (skip_special_tokens and i in self.special_ids)]
        # Added tokens that are not special, and special ones beyond the sentencepiece vocab, are joined
        # as separate words (transformers 4.37's "legacy added tokens").
        vocab_size = self.sp.get_piece_size()
        standalone = {t.content for t in self.added.values() if t.content not in self.special_tokens}
        standalone |= {t for t in self.special_tokens if t in self.added_by_content
                       and self.added_by_content[t].id >= vocab_size}
        parts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if token in standalone:
                if current:
                    text = self._join_pieces(current)
                    if text:
                        parts.append(text)
                    current = []
                parts.append(token)
            else:
                current.append(token)
        if current:
            parts.append(self._join_pieces(current))
        text = " ".join(parts)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def decode(self, ids: list[int]) -> str:
        """The caption exactly as `batch_chat` returns it: skip special tokens, cut at a literal
        `<|im_end|>`, strip."""
        return self.decode_tokens(ids, skip_special_tokens=True).split("<|im_end|>")[0].strip()

    def _join_pieces(self, tokens: list[str]) -> str:
        """The slow tokenizer's `convert_tokens_to_string`: a space before each run of special tokens."""
        out = ""
        pending: list[str] = []
        previous_special = False
        for token in tokens:
            if token in self.special_tokens:
                if not previous_special:
                    out += " "
                out += self.sp.decode_pieces(pending) + token
                previous_special = True
                pending = []
            else:
                pending.append(token)
                previous_special = False
        out += self.sp.decode_pieces(pending)
        # The original prepends a space and drops the first character again: a no-op for non-empty input.
        return _clean_up(out)

    def _split_on_added(self, text: str) -> list[tuple[str, bool]]:
        """Split text into (chunk, is_added_token) with the added tokens' lstrip/rstrip/single_word rules."""
        if self._added_pattern is None:
            return [(text, False)]
        chunks: list[list] = []
        position = 0
        for match in self._added_pattern.finditer(text):
            chunks.append([text[position:match.start()], False])
            chunks.append([match.group(0), True])
            position = match.end()
        chunks.append([text[position:], False])
        for index, (chunk, is_added) in enumerate(chunks):
            if not is_added:
                continue
            token = self.added_by_content[chunk]
            left = chunks[index - 1] if index > 0 else None
            right = chunks[index + 1] if index + 1 < len(chunks) else None
            if token.rstrip and right and right[0]:
                right[0] = right[0].lstrip()
            if token.lstrip and left and left[0]:
                left[0] = left[0].rstrip()
            if token.single_word and left and left[0] and left[0][-1] != " ":
                left[0] += chunk
                chunks[index] = ["", False]
            elif token.single_word and right and right[0] and right[0][0] != " ":
                chunks[index] = [chunk + right[0], False]
                right[0] = ""
        return [(chunk, is_added) for chunk, is_added in chunks if chunk]


def _load_processor(model_file: Path) -> spm.SentencePieceProcessor:
    """The sentencepiece model, loaded without the library's warnings on stderr."""
    # sentencepiece >= 0.2.1 warns at every load that it ignores the NUL piece, which encode restores: silence it.
    spm.set_min_log_level(_QUIET_LOG_LEVEL)
    try:
        return spm.SentencePieceProcessor(model_file=str(model_file))
    finally:
        spm.set_min_log_level(_DEFAULT_LOG_LEVEL)


def _nul_piece_to_restore(sp: spm.SentencePieceProcessor, model_file: Path) -> int | None:
    """The id of the piece sentencepiece 0.2.0 encodes U+0000 as, when the installed library encodes it otherwise;
    None when the model has no such piece or the library still uses it. Raises when splitting at NUL would not
    reproduce 0.2.0 for this model."""
    with_nul = [i for i in range(sp.get_piece_size()) if NUL in sp.id_to_piece(i)]
    nul = next((i for i in with_nul if sp.id_to_piece(i) == NUL), None)
    if nul is None or sp.encode(NUL) == [nul]:
        return None
    spec = _proto_fields(_proto_fields(sp.serialized_model_proto()).get(3, b""))  # ModelProto.normalizer_spec
    # NormalizerSpec fields 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces (proto2
    # defaults: empty, true, true): any of them would make the parts between NULs encode differently.
    exact = with_nul == [nul] and not spec.get(2) and spec.get(3, 1) == 0 and spec.get(4, 1) == 0
    if not exact:
        raise VlmHpcError(f"tokenizer: {model_file} has a NUL piece ({nul}) that sentencepiece {spm.__version__} "
                          "no longer uses, and this model (its normalizer, or other pieces with a NUL) keeps "
                          "vlm_hpc from restoring it exactly; install sentencepiece==0.2.0")
    return nul


def _proto_fields(message: bytes) -> dict[int, object]:
    """One protobuf message's top-level fields by number (varints as int, length-delimited as bytes, the last
    value winning as in protobuf): sentencepiece's Python API does not expose the normalizer spec, and protobuf
    is not a dependency."""
    values: dict[int, object] = {}
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        wire_type = key & 7
        if wire_type == 0:
            values[key >> 3], position = _varint(message, position)
        elif wire_type == 2:
            length, position = _varint(message, position)
            values[key >> 3] = message[position:position + length]
            position += length
        elif wire_type in (1, 5):  # fixed 64 / 32 bits: none of the fields read here
            position += 8 if wire_type == 1 else 4
        else:
            raise VlmHpcError(f"tokenizer: unexpected protobuf wire type {wire_type} in tokenizer.model; "
                              "is it a sentencepiece model?")
    return values


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data):
            raise VlmHpcError("tokenizer: tokenizer.model ends inside a protobuf field; re-download it")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _clean_up(text: str) -> str:
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def _token_text(value: object) -> str | None:
    """special_tokens_map.json writes tokens as plain strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_added_tokens(config: dict) -> dict[int, AddedToken]:
    tokens = {}
    for key, spec in config.get("added_tokens_decoder", {}).items():
        tokens[int(key)] = AddedToken(
            content=spec["content"], id=int(key), lstrip=bool(spec.get("lstrip", False)),
            rstrip=bool(spec.get("rstrip", False)), single_word=bool(spec.get("single_word", False)),
        )
    return tokens


def _special_tokens(config: dict, special_map: dict) -> frozenset[str]:
    """Tokens that skip_special_tokens drops: the named bos/eos/unk/pad/... plus additional_special_tokens."""
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    special = set()
    for name in names:
        text = _token_text(config.get(name, special_map.get(name)))
        if text is not None:
            special.add(text)
    extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
    special.update(t for t in (_token_text(x) for x in extra) if t is not None)
    return frozenset(special)


def load_tokenizer(model_dir: str | Path) -> InternLM2Tokenizer:
    """Load the InternLM2 tokenizer from a model folder (original or native layout); no code from it runs."""
    folder = Path(model_dir)
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise VlmHpcError(f"tokenizer: {folder / name} is missing; point model.path at the full "
                              f"InternVL-Chat-V1-5 folder (it needs {', '.join(TOKENIZER_FILES)})")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        special_path = folder / "special_tokens_map.json"
        special_map = json.loads(special_path.read_text()) if special_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmHpcError(f"tokenizer: cannot read {folder}/tokenizer_config.json: {exc}") from None
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class not in (None, "InternLM2Tokenizer", "InternLM2TokenizerFast"):
        raise VlmHpcError(f"tokenizer: {folder} declares tokenizer_class {tokenizer_class!r}; vlm_hpc reproduces "
                          "only InternLM2Tokenizer (InternVL-Chat-V1.5)")
    try:
        tokenizer = InternLM2Tokenizer(folder / "tokenizer.model", config, special_map)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise VlmHpcError(f"tokenizer: cannot load {folder}/tokenizer.model: {exc}") from None
    for required in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"):
        if required not in tokenizer.added_by_content:
            raise VlmHpcError(f"tokenizer: {folder}/tokenizer_config.json does not define {required}; "
                              "this is not an InternVL-Chat-V1.5 tokenizer")
    return tokenizer
