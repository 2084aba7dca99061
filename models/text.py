"""Text conditioning: a small project-defined encoder, and real encoders from a local folder.

Every encoder returns, per prompt, a dict of tensors with batch dimension 1 keyed by the
family's `text_keys` (FLUX: `encoder_hidden_states` (1, L, joint_dim) and
`pooled_projections` (1, P); SANA: `encoder_hidden_states` (1, L, caption_channels) and
`encoder_attention_mask` (1, L)). A prompt bank stores exactly these dicts, so a board with no
text encoder can still generate.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from blockskip.models import family_class


class HashTextEncoder:
    """Deterministic word-hash embeddings: each word maps to a fixed random vector (seeded
    by the word itself), position is added as a sinusoid, padding is masked. Small, offline,
    and distinct prompts give distinct conditioning: enough for tiny models and tests."""

    kind = "hash"

    def __init__(self, family_name: str, dims: dict, max_length: int = 16, seed: int = 0):
        self.family_name = family_name
        self.dims = dict(dims)  # {"encoder_hidden_states": D, "pooled_projections": P}
        self.max_length = max_length
        self.seed = seed

    def config(self) -> dict:
        return {"kind": self.kind, "dims": self.dims, "max_length": self.max_length, "seed": self.seed}

    def _word_vector(self, word: str, dim: int, salt: str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{salt}:{word}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(dim, generator=gen)

    @torch.no_grad()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        words = re.findall(r"[a-z0-9]+", prompt.lower())[: self.max_length]
        dim = self.dims["encoder_hidden_states"]
        seq = torch.zeros(1, self.max_length, dim)
        position = torch.arange(dim) / dim
        for i, word in enumerate(words):
            seq[0, i] = self._word_vector(word, dim, "seq") + 0.5 * torch.sin((i + 1) * 3.1 * position)
        mask = torch.zeros(1, self.max_length, dtype=torch.long)
        mask[0, : len(words)] = 1
        out = {"encoder_hidden_states": seq}
        if "pooled_projections" in self.dims:
            pooled_dim = self.dims["pooled_projections"]
            vectors = [self._word_vector(w, pooled_dim, "pooled") for w in words] or [torch.zeros(pooled_dim)]
            out["pooled_projections"] = torch.stack(vectors).mean(0, keepdim=True)
        else:
            out["encoder_attention_mask"] = mask
        return out


class DiffusersTextEncoder:
    """The family's real text encoders (FLUX: CLIP + T5; SANA: Gemma) loaded from a local
    diffusers pipeline folder through the pipeline's own `encode_prompt`."""

    kind = "diffusers"

    def __init__(self, family_name: str, path: str, max_length: int = 512):
        self.family = family_class(family_name)
        self.family_name = family_name
        self.path = path
        self.max_length = max_length
        self.pipeline = self.family.pipeline_class().from_pretrained(path, transformer=None, vae=None,
                                                                     local_files_only=True)

    def config(self) -> dict:
        return {"kind": self.kind, "path": self.path, "max_length": self.max_length}

    @torch.no_grad()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        return self.family.encode_prompt(self.pipeline, prompt, self.max_length)


class WordTextEncoder(nn.Module):
    """Word-level text encoder over a fixed vocabulary (saved with it): learned token + position
    embeddings, one small transformer layer; pooled = masked mean projected to the pooled width.
    The built-in crop model's encoder (blockskip.models.crops gives it its vocabulary)."""

    kind = "words"
    family_name = "flux"

    def __init__(self, dim: int, pooled_dim: int, max_length: int, layers: int, seed: int, vocab: list[str]):
        super().__init__()
        self.dim, self.pooled_dim, self.max_length, self.layers, self.seed = dim, pooled_dim, max_length, layers, seed
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tokens = nn.Embedding(len(self.vocab), dim)
            self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.1)
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True),
                num_layers=layers, enable_nested_tensor=False) if layers else None
            self.norm = nn.LayerNorm(dim)
            self.pool = nn.Linear(dim, pooled_dim)
        self.eval()

    @property
    def dims(self) -> dict:
        return {"encoder_hidden_states": self.dim, "pooled_projections": self.pooled_dim}

    def config(self) -> dict:
        return {"kind": self.kind, "dims": self.dims, "max_length": self.max_length, "layers": self.layers,
                "seed": self.seed, "vocab": self.vocab}

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", prompt.lower())[: self.max_length]
            ids[row, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
            mask[row, : len(words)] = True
        return ids, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~mask)
        x = self.norm(x) * mask[..., None]
        m = mask.float()[..., None]
        pooled = self.pool((x * m).sum(1) / m.sum(1).clamp(min=1))
        return {"encoder_hidden_states": x, "pooled_projections": pooled}

    @torch.no_grad()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().float() for k, v in self(*self.tokenize([prompt])).items()}

    def save(self, root: str | Path) -> None:
        from safetensors.torch import save_file

        root = Path(root)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(root / "text_encoder.safetensors"))
        (root / "text_encoder.json").write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def load(cls, root: str | Path) -> "WordTextEncoder":
        from safetensors.torch import load_file

        root = Path(root)
        cfg = json.loads((root / "text_encoder.json").read_text())
        enc = cls(cfg["dims"]["encoder_hidden_states"], cfg["dims"]["pooled_projections"], cfg["max_length"],
                  cfg.get("layers", 1), cfg.get("seed", 0), vocab=cfg["vocab"])
        enc.load_state_dict({k: v.float() for k, v in load_file(str(root / "text_encoder.safetensors")).items()})
        return enc.eval()
