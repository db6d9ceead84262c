"""One tokenizer interface over SentencePiece (tiny runs; trained offline here) and a Qwen2.5 ``tokenizer.json``
loaded with the ``tokenizers`` library (real runs).

The reference's four special tokens are handled the same way in both (``add_special_tokens`` in
``data/data_utils.py``): each is looked up in the vocabulary and, if absent, appended after it. Text is split on
the special-token strings before the backend sees it, so ``"<|im_start|>"`` in a text always becomes its id.

    bos  = <|im_start|>     eos = <|im_end|>     start_of_image = <|vision_start|>    end_of_image = <|vision_end|>

Picklable (grain workers): only the model file path and bytes travel.
"""

from __future__ import annotations

import abc
import io
import os
import re
from collections.abc import Iterable, Sequence

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class Tokenizer(abc.ABC):
    """Common interface: ``encode(text) -> list[int]`` (no BOS/EOS added), ``decode(ids)``, special ids."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._model_bytes = f.read()
        self._load()

    # --- backend hooks ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None:
        """Backend hook."""

    @abc.abstractmethod
    def _backend_encode(self, text: str) -> list[int]:
        """Backend hook."""

    @abc.abstractmethod
    def _backend_decode(self, ids: Sequence[int]) -> str:
        """Backend hook."""

    @abc.abstractmethod
    def _backend_vocab_size(self) -> int:
        """Backend hook."""

    @abc.abstractmethod
    def _backend_token_id(self, token: str) -> int | None:
        """Backend hook."""

    # --- common ----------------------------------------------------------------------------------------------
    def _init_special(self) -> None:
        base = self._backend_vocab_size()
        ids, added = {}, 0
        for tok in SPECIAL_TOKENS:
            found = self._backend_token_id(tok)
            if found is None:
                found = base + added
                added += 1
            ids[tok] = found
        self.special = ids
        self.num_added_tokens = added
        self.vocab_size = base + added
        self._id_to_special = {v: k for k, v in ids.items()}

    @property
    def bos_id(self) -> int:
        return self.special["<|im_start|>"]

    @property
    def eos_id(self) -> int:
        return self.special["<|im_end|>"]

    @property
    def vision_start_id(self) -> int:
        return self.special["<|vision_start|>"]

    @property
    def vision_end_id(self) -> int:
        return self.special["<|vision_end|>"]

    def special_token_ids(self) -> dict[str, int]:
        """The reference's ``new_token_ids`` dict."""
        return dict(
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            start_of_image=self.vision_start_id,
            end_of_image=self.vision_end_id,
        )

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _SPECIAL_RE.split(text):
            if not piece:
                continue
            if piece in self.special:
                ids.append(self.special[piece])
            else:
                ids.extend(self._backend_encode(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._id_to_special:
                if run:
                    out.append(self._backend_decode(run))
                    run = []
                out.append(self._id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self._backend_decode(run))
        return "".join(out)

    def __getstate__(self):
        return {"path": self.path, "model_bytes": self._model_bytes}

    def __setstate__(self, state):
        self.path = state["path"]
        self._model_bytes = state["model_bytes"]
        self._load()

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (e.g. trained by ``train_sentencepiece``)."""

    def _load(self) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self._init_special()

    def _backend_encode(self, text):
        return list(self._sp.encode(text))

    def _backend_decode(self, ids):
        return self._sp.decode(list(ids))

    def _backend_vocab_size(self):
        return self._sp.get_piece_size()

    def _backend_token_id(self, token):
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (e.g. Qwen2.5's) via the ``tokenizers`` library."""

    def _load(self) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_str(self._model_bytes.decode("utf-8"))
        self._init_special()

    def _backend_encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def _backend_decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _backend_vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _backend_token_id(self, token):
        return self._tok.token_to_id(token)


def load_tokenizer(path: str) -> Tokenizer:
    """``*.model`` → SentencePiece; ``tokenizer.json`` (or a directory holding it) → Hugging Face tokenizers."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.endswith(".json"):
        return HFTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(f"tokenizer {path}: expected a SentencePiece '.model' or a 'tokenizer.json'")


def train_sentencepiece(
    texts: Iterable[str], model_path: str, vocab_size: int = 512, model_type: str = "unigram"
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on ``texts`` (offline, deterministic, one thread) and writes ``model_path``.

    The special tokens are user-defined symbols inside ``vocab_size`` (ids 2..5; 0 = <pad>, 1 = <unk>), so the
    whole vocabulary fits an embedding table of ``vocab_size`` rows. ``hard_vocab_limit=False``: a small corpus
    may give fewer pieces.
    """
    import sentencepiece as spm

    if not model_path.endswith(".model"):
        raise ValueError(f"model_path must end with '.model', got {model_path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    sentences = [t for t in texts if t.strip()]
    if not sentences:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    proto = io.BytesIO()  # in memory: the file's bytes do not depend on where it is written
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        user_defined_symbols=list(SPECIAL_TOKENS),
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        character_coverage=1.0,
        minloglevel=2,
        input_sentence_size=0,
        shuffle_input_sentence=False,
    )
    with open(model_path, "wb") as f:
        f.write(proto.getvalue())
    return SentencePieceTokenizer(model_path)
