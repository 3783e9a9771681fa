"""The project's own byte-level BPE tokenizer and a thin wrapper to load any `tokenizer.json`.

`train_tokenizer` trains a 4096-token byte-level BPE on the corpus shipped in
`eep/model/data/corpus.txt.gz`; the same corpus gives the same `tokenizer.json` bytes on every
run. `write_tokenizer_config` adds a Hugging Face `tokenizer_config.json`, so
`transformers.AutoTokenizer` loads the directory and gives the same ids as `Tokenizer`.
Byte-level means every string round-trips: `decode(encode(s)) == s`.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from eep.errors import CheckpointCorrupt, CheckpointFileMissing, RequestError

logger = logging.getLogger(__name__)

CORPUS_PATH = Path(__file__).parent / "model" / "data" / "corpus.txt.gz"
VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")  # the trainer gives them ids 0, 1, 2
EOS_TOKEN_ID = SPECIAL_TOKENS.index(EOS_TOKEN)


def _corpus_lines(path: Path) -> Iterator[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        yield from f


def train_tokenizer(out_path: Path, corpus_path: Path = CORPUS_PATH) -> None:
    """Trains the byte-level BPE on `corpus_path` and writes it as `out_path` (tokenizer.json)."""
    if not corpus_path.is_file():
        raise CheckpointFileMissing(f"tokenizer corpus {corpus_path} is missing; reinstall eep")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(corpus_path), trainer=trainer)
    tok.save(str(out_path))
    logger.info("trained a %d-token BPE tokenizer into %s", tok.get_vocab_size(), out_path)


def write_tokenizer_config(out_dir: Path, model_max_length: int) -> None:
    """Writes the Hugging Face `tokenizer_config.json` that goes with `train_tokenizer`'s output."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


class Tokenizer:
    """Text <-> token ids with a `tokenizers.Tokenizer`; never adds special tokens itself."""

    def __init__(self, tok: tokenizers.Tokenizer, eos_token: str | None = None) -> None:
        self._tok = tok
        self.eos_token_id: int | None = None if eos_token is None else tok.token_to_id(eos_token)
        if eos_token is not None and self.eos_token_id is None:
            raise CheckpointCorrupt(f"eos_token {eos_token!r} of tokenizer_config.json is not in the vocab")

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """Loads `model_dir/tokenizer.json`, and the eos token from `tokenizer_config.json` if present."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointFileMissing(
                f"{path} is missing; the model directory needs a Hugging Face fast tokenizer (tokenizer.json)"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise CheckpointCorrupt(f"cannot parse {path}: {e}") from e
        return cls(tok, _eos_token(Path(model_dir) / "tokenizer_config.json"))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of `token` (e.g. a special marker), or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # a str that is not Unicode text: JSON's "\ud800" decodes to a lone surrogate
            # the request's own fault, not the engine's: raised as such, it fails only this request
            raise RequestError("the prompt is not valid Unicode text (it holds a lone surrogate)") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _eos_token(config_path: Path) -> str | None:
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text()).get("eos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointCorrupt(f"cannot parse {config_path}: {e}") from e
    return eos.get("content") if isinstance(eos, dict) else eos  # HF writes either form
