"""A DeCap-style text decoder (Li et al., ICLR 2023): a small GPT-2 that writes a caption from one vector of a
vision-language space, trained on text only.

Training reconstructs each caption from its own (normalised) text embedding, fed as a prefix token through a
linear map (DeCap's `clip_project`); at inference an image-side vector is first projected onto the text-embedding
memory (`concepts.decode.CaptionMemory.project`) and then decoded greedily or with beam search (transformers'
`generate`). The language model is transformers' `GPT2LMHeadModel`; the word-level vocabulary is a `tokenizers`
WordLevel model, serialised as JSON into the safetensors metadata (no pickle).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import ConceptlensError
from ..io import asset_path, file_sha256, read_safetensors_meta, save_safetensors

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
# Decoders shipped for built-in vision-language models (their text space), like the denoiser's asset.
SHIPPED = {"builtin:lite-clip": "lite_clip_decoder.safetensors"}
DEFAULT_BEAMS = 5  # chosen on Imagenette train class means (benchmarks/decode.py records the sweep)
TIED = "gpt.lm_head.weight"  # GPT-2's output layer is its token embedding: stored once
DEFAULTS = dict(n_embd=256, n_layer=3, n_head=4, max_tokens=32, prefix_length=1, min_count=5)


def _pre_tokenizer():
    from tokenizers import normalizers, pre_tokenizers
    return (normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]),
            pre_tokenizers.Whitespace())


def build_vocabulary(captions: Sequence[str], min_count: int = 5) -> str:
    """A word-level `tokenizers` vocabulary (JSON) of the words in at least `min_count` captions' tokens, most
    frequent first (ties alphabetical: the same captions give the same file)."""
    from tokenizers import Tokenizer, models
    norm, pre = _pre_tokenizer()
    counts: Counter = Counter()
    for c in captions:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(c)))
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    if not words:
        raise ConceptlensError(f"no word occurs {min_count} times in the {len(captions)} captions: lower min_count")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([PAD, UNK, EOS] + words)}, unk_token=UNK))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    return tok.to_str()


def detokenize(words: Sequence[str]) -> str:
    """Words back to a sentence: punctuation and clitics attached to the word before."""
    text = " ".join(words)
    text = re.sub(r" ([.,!?;:])", r"\1", text)
    return re.sub(r" ' (s|t|re|ve|ll|d|m)\b", r"'\1", text)


class TextDecoder(torch.nn.Module):
    """Prefix map + GPT-2 language model + word vocabulary; `loss` trains it, `generate` writes captions."""

    def __init__(self, vocabulary: str, embed_dim: int, n_embd: int = 256, n_layer: int = 3, n_head: int = 4,
                 max_tokens: int = 32, prefix_length: int = 1, min_count: int = 5):
        super().__init__()
        from tokenizers import Tokenizer
        from transformers import GPT2Config, GPT2LMHeadModel
        self.vocabulary, self.tokenizer = vocabulary, Tokenizer.from_str(vocabulary)
        self.pad, self.unk, self.eos = (self.tokenizer.token_to_id(t) for t in (PAD, UNK, EOS))
        self.config = dict(embed_dim=embed_dim, n_embd=n_embd, n_layer=n_layer, n_head=n_head, max_tokens=max_tokens,
                           prefix_length=prefix_length, min_count=min_count)
        cfg = GPT2Config(vocab_size=self.tokenizer.get_vocab_size(), n_positions=max_tokens + prefix_length,
                         n_embd=n_embd, n_layer=n_layer, n_head=n_head, bos_token_id=self.eos, eos_token_id=self.eos,
                         pad_token_id=self.pad, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: a
        # few epochs on a CPU underfit rather than overfit, and training stays a function of (seed, step)
        self.gpt = GPT2LMHeadModel(cfg)
        self.prefix = torch.nn.Linear(embed_dim, n_embd * prefix_length)

    @property
    def device(self) -> torch.device:
        return self.prefix.weight.device

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids [B, T] of captions + EOS, right-padded with PAD, at most `max_tokens`."""
        rows = [e.ids[:self.config["max_tokens"] - 1] + [self.eos] for e in self.tokenizer.encode_batch(list(captions))]
        out = torch.full((len(rows), max(map(len, rows))), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out

    def _prefix(self, emb: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(emb.float().to(self.device), dim=-1)
        return self.prefix(emb).view(len(emb), self.config["prefix_length"], self.config["n_embd"])

    def loss(self, emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the caption tokens `ids` [B, T] given the prefix of their embeddings `emb` [B, D].

        Right padding under a causal mask never reaches a real token, so no attention mask is needed."""
        ids = ids.to(self.device)
        k = self.config["prefix_length"]
        x = torch.cat([self._prefix(emb), self.gpt.transformer.wte(ids)], dim=1)
        logits = self.gpt(inputs_embeds=x).logits[:, k - 1:-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), ignore_index=self.pad)

    @torch.no_grad()
    def generate(self, emb: torch.Tensor | np.ndarray, beams: int = 1, max_tokens: int | None = None,
                 batch_size: int = 64) -> list[str]:
        """A caption for each vector [B, D] (already in the text-embedding space: project image-side vectors onto
        the memory first); greedy for beams=1, else beam search."""
        if beams < 1:
            raise ConceptlensError("beams must be positive")
        emb = torch.as_tensor(np.asarray(emb, np.float32))
        emb = emb[None] if emb.ndim == 1 else emb
        if emb.ndim != 2 or emb.shape[1] != self.config["embed_dim"]:
            raise ConceptlensError(f"vectors of shape {tuple(emb.shape)}: this decoder takes [N, {self.config['embed_dim']}]")
        if not torch.isfinite(emb).all():
            raise ConceptlensError("vector contains NaN or inf")
        from transformers.utils import logging as hf_logging
        was, verbosity = self.training, hf_logging.get_verbosity()
        self.eval()
        hf_logging.set_verbosity_error()  # finished beams are padded: its "pass an attention_mask" hint does not apply
        out: list[str] = []
        n = max_tokens or self.config["max_tokens"]
        try:
            for s in range(0, len(emb), batch_size):
                x = self._prefix(emb[s:s + batch_size])
                ids = self.gpt.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                                                   device=self.device),
                                        max_new_tokens=n, num_beams=beams, do_sample=False, eos_token_id=self.eos,
                                        pad_token_id=self.pad, suppress_tokens=[self.unk])  # never write [UNK]
                for row in ids.tolist():
                    row = row[:row.index(self.eos)] if self.eos in row else row
                    out.append(detokenize([self.tokenizer.id_to_token(i) for i in row if i != self.pad]))
        finally:
            self.train(was)
            hf_logging.set_verbosity(verbosity)
        return out

    def save(self, path: Path | str, meta: dict) -> Path:
        """Weights (fp32 safetensors) + config, vocabulary and `meta` (provenance, the text space it was trained for)."""
        tensors = {k: v for k, v in self.state_dict().items() if k != TIED}
        return save_safetensors(Path(path), tensors, dict(meta, config=self.config, vocabulary=self.vocabulary))

    @classmethod
    def load(cls, path: Path | str) -> "TextDecoder":
        meta = read_safetensors_meta(path)
        if "vocabulary" not in meta or "config" not in meta:
            raise ConceptlensError(f"{path} is not a text decoder (no vocabulary/config in its metadata)")
        dec = cls(meta["vocabulary"], **meta["config"])
        missing, unexpected = dec.load_state_dict(load_file(str(path)), strict=False)
        if unexpected or set(missing) - {TIED}:
            raise ConceptlensError(f"{path}: weights do not fit its config ({(missing + unexpected)[:3]} ...)")
        dec.meta = meta | {"path": str(path), "sha256": file_sha256(Path(path))}
        return dec.eval()


def load_decoder(text_model: str, path: Path | str | None = None) -> TextDecoder:
    """The decoder for a text space: `path`, else the one shipped for `text_model`; one clear error when the file
    was trained for another text tower."""
    if path is None:
        if text_model not in SHIPPED or not asset_path(SHIPPED[text_model]).exists():
            raise ConceptlensError(f"no text decoder ships for {text_model}: train one with `conceptlens train decoder "
                                   f"--model {text_model} --out DIR` and pass --decoder DIR/decoder.safetensors")
        path = asset_path(SHIPPED[text_model])
    if not Path(path).is_file():
        raise ConceptlensError(f"decoder {path} not found")
    dec = TextDecoder.load(path)
    if dec.meta.get("text_model") != text_model:
        raise ConceptlensError(f"decoder {path} was trained for {dec.meta.get('text_model')}'s text space, not "
                               f"{text_model}'s: train one with `conceptlens train decoder --model {text_model}`")
    return dec
