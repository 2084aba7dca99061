"""Text conditioning: a small project-defined encoder, and real encoders from a local folder.

Every encoder returns, per prompt, a dict of tensors with batch dimension 1 keyed by the
family's `text_keys` (FLUX: `encoder_hidden_states` (1, L, joint_dim) and
`pooled_projections` (1, P); SANA: `encoder_hidden_states` (1, L, caption_channels) and
`encoder_attention_mask` (1, L)). A prompt bank stores exactly these dicts, so a board with no
text encoder can still generate.
"""

from __future__ import annotations

import hashlib
import re

import torch


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
        from diffusers import FluxPipeline, SanaPipeline

        pipeline_cls = {"flux": FluxPipeline, "sana": SanaPipeline}[family_name]
        self.family_name = family_name
        self.path = path
        self.max_length = max_length
        self.pipeline = pipeline_cls.from_pretrained(path, transformer=None, vae=None, local_files_only=True)

    def config(self) -> dict:
        return {"kind": self.kind, "path": self.path, "max_length": self.max_length}

    @torch.no_grad()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.family_name == "flux":
            embeds, pooled, _ = self.pipeline.encode_prompt(prompt, prompt_2=None,
                                                            max_sequence_length=self.max_length)
            return {"encoder_hidden_states": embeds.cpu(), "pooled_projections": pooled.cpu()}
        embeds, mask, _, _ = self.pipeline.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                         max_sequence_length=min(self.max_length, 300))
        return {"encoder_hidden_states": embeds.cpu(), "encoder_attention_mask": mask.cpu()}
