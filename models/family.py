"""The small interface every model family implements over its real diffusers class.

A family adapter wraps one diffusers transformer and exposes it as: `embed` (everything before
block 0), an ordered list of blocks in one index space, `run_blocks` on a state, and `head`
(everything after the last block). States and conditioning are plain dicts of tensors so they
can be cached in safetensors as they are.

- state: what flows between blocks (FLUX: image and text streams; SANA: image tokens).
- cond: what every block and the head read but never change (timestep embedding, rotary ids,
  projected text, token grid).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
from typing import Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

State = dict[str, torch.Tensor]
Cond = dict[str, torch.Tensor]


class Family(abc.ABC):
    """One model family over its diffusers transformer class."""

    name: str  # registry key, e.g. "flux"
    model_cls: type[nn.Module]  # the diffusers class
    image_key: str = "hidden_states"  # the state entry holding image tokens (what the head reads)
    # The numbers the host's estimates and defaults need, per family (class-level: no weights needed).
    text_in_sequence: bool = False  # text tokens run through the blocks beside the image tokens (FLUX's joint attention)
    pipeline_text_len: int = 512  # text tokens of the family's own text encoder as DiffusersTextEncoder runs it
    paper_s_max: int | None = None  # the paper's largest crop side (its LoRA baseline's resolution)

    @classmethod
    def sequence_length(cls, image_tokens: int, text_len: int) -> int:
        """Tokens one block attends over."""
        return image_tokens + (text_len if cls.text_in_sequence else 0)

    @classmethod
    def state_rows(cls, image_tokens: int, text_len: int) -> list[int]:
        """Rows of each tensor of the state between blocks (what an entry state or a residual stores)."""
        return [image_tokens, text_len] if cls.text_in_sequence else [image_tokens]

    @classmethod
    @abc.abstractmethod
    def cond_values(cls, hidden: int, image_tokens: int) -> tuple[int, int]:
        """(values, extra bytes) of the per-draw conditioning `cache` stores: values in the
        conditioning dtype, extra bytes in fixed-width integers."""

    @classmethod
    @abc.abstractmethod
    def prompt_values(cls, hidden: int, text_len: int) -> int:
        """Values `cache` stores once per training prompt."""

    @classmethod
    def attention_mask_bytes(cls, text_len: int) -> int:
        """Bytes of the text attention mask the prompt bank keeps beside the embeddings (none by default)."""
        return 0

    @classmethod
    @abc.abstractmethod
    def pipeline_class(cls) -> type:
        """The diffusers pipeline whose `encode_prompt` is this family's text encoder."""

    @classmethod
    @abc.abstractmethod
    def encode_prompt(cls, pipeline, prompt: str, max_length: int) -> dict[str, torch.Tensor]:
        """The transformer's text inputs for `prompt`, from the pipeline's own `encode_prompt`."""

    def __init__(self, model: nn.Module):
        self.model = model

    # ---- construction --------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def tiny_config(cls) -> dict:
        """A small configuration of this family for tests and the demo."""

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> "Family":
        """A tiny model of this family with seeded random weights (fp32, CPU)."""
        config = {**cls.tiny_config(), **overrides}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls.model_cls(**config)
            _randomize_zero_inits(model, seed)
        return cls(model.eval())

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype = torch.float32) -> "Family":
        """Load a transformer from a local diffusers directory; never touches a hub."""
        from pathlib import Path

        from blockskip.errors import InputError

        root = Path(path)
        if not root.is_dir():
            raise InputError(f"model directory {path!r} does not exist (point --model at a local diffusers folder)")
        subfolder = "transformer" if (root / "transformer" / "config.json").is_file() else None
        if subfolder is None and not (root / "config.json").is_file():
            raise InputError(f"{path!r} has neither config.json nor transformer/config.json")
        model = cls.model_cls.from_pretrained(
            str(root), subfolder=subfolder, torch_dtype=torch_dtype, local_files_only=True
        )
        return cls(model.eval())

    @property
    def config(self) -> dict:
        return dict(self.model.config)

    def json_config(self) -> dict:
        """The transformer's constructor arguments as JSON values (diffusers' own keys dropped)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items() if not k.startswith("_")}

    def config_hash(self) -> str:
        """A short identity of the architecture (not of the weights)."""
        blob = json.dumps({"family": self.name, **self.json_config()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---- blocks --------------------------------------------------------------------------
    @abc.abstractmethod
    def block_names(self) -> list[str]:
        """Module path of every block, in execution order (one index space)."""

    @property
    def num_blocks(self) -> int:
        return len(self.block_names())

    def block(self, index: int) -> nn.Module:
        return self.model.get_submodule(self.block_names()[index])

    @abc.abstractmethod
    def lora_targets(self, index: int, scope: str = "attention") -> list[str]:
        """Full-model names of the Linear modules in block `index` that carry LoRA: the attention
        projections (`scope` "attention"), or those and the MLP's (`scope` "all")."""

    def kohya_groups(self) -> dict[str, list[tuple[str, int]]] | None:
        """kohya sd-scripts' LoRA names of this family: {kohya name: [(diffusers module path,
        out features), ...]}, several modules where the original checkpoint fuses them into one
        Linear (outputs concatenated in that order). None: the family has no kohya form."""
        return None

    @abc.abstractmethod
    def head_module_names(self) -> list[str]:
        """Top-level parameters/modules used by `head` (the edge keeps their weights)."""

    # ---- the forward, decomposed ---------------------------------------------------------
    @abc.abstractmethod
    def embed(self, **inputs) -> tuple[State, Cond]:
        """Everything before block 0, from the diffusers forward's own inputs."""

    def block_context(self, cond: Cond) -> dict:
        """Per-call values derived from `cond` once for a run of blocks (e.g. rotary tables)."""
        return cond

    @abc.abstractmethod
    def run_block(self, index: int, state: State, context: dict) -> State:
        """Run one block on a state; `context` comes from `block_context(cond)`."""

    @abc.abstractmethod
    def head(self, state: State, cond: Cond) -> torch.Tensor:
        """Everything after the last block; returns what the diffusers forward returns."""

    def run_blocks(self, state: State, cond: Cond, start: int, end: int, checkpointing: bool = False) -> State:
        """Run blocks [start, end) in order (with `checkpointing`, recompute them in backward)."""
        if not 0 <= start <= end <= self.num_blocks:
            raise IndexError(f"block range [{start}, {end}) outside [0, {self.num_blocks})")
        context = self.block_context(cond) if start < end else None
        for index in range(start, end):
            if checkpointing and torch.is_grad_enabled():
                state = torch.utils.checkpoint.checkpoint(self.run_block, index, state, context, use_reentrant=False)
            else:
                state = self.run_block(index, state, context)
        return state

    def forward(self, **inputs) -> torch.Tensor:
        """embed -> every block -> head; equals the diffusers model's own forward."""
        state, cond = self.embed(**inputs)
        return self.head(self.run_blocks(state, cond, 0, self.num_blocks), cond)

    def diffusers_forward(self, **inputs) -> torch.Tensor:
        """The diffusers model's own forward, for comparison."""
        return self.model(**inputs, return_dict=False)[0]

    # ---- sensitivity profile -------------------------------------------------------------
    @abc.abstractmethod
    def _text_mask_processor(self, index: int, original):
        """An attention processor for block `index` that hides text keys from image queries."""

    @abc.abstractmethod
    def _text_attention(self, index: int) -> nn.Module:
        """The attention module of block `index` where image queries meet text keys."""

    @contextlib.contextmanager
    def mask_text_attention(self, blocks: Iterable[int]) -> Iterator[None]:
        """Within the context, image queries cannot attend to text keys in `blocks`."""
        saved = []
        try:
            for index in sorted(set(blocks)):
                attn = self._text_attention(index)
                saved.append((attn, attn.processor))
                attn.set_processor(self._text_mask_processor(index, attn.processor))
            yield
        finally:
            for attn, processor in reversed(saved):
                close = getattr(attn.processor, "close", None)
                if close is not None:
                    close()
                attn.set_processor(processor)

    # ---- latents <-> model inputs --------------------------------------------------------
    token_patch: int  # latent pixels per token side
    text_keys: tuple[str, ...]  # entries of the text conditioning this family reads
    prompt_cond_keys: tuple[str, ...]  # cond entries that depend on the prompt alone (cached once)
    cfg_scale: float = 1.0  # classifier-free guidance scale at generation (1.0: none)

    @abc.abstractmethod
    def text_shapes(self) -> dict:
        """Feature width of each text-conditioning tensor ({key: dim})."""

    @abc.abstractmethod
    def make_inputs(self, latents: torch.Tensor, sigma: torch.Tensor, text: dict) -> dict:
        """Diffusers-forward inputs for noisy latents (B, C, H, W) at flow-matching sigma (B,)."""

    @abc.abstractmethod
    def output_to_latents(self, output: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The forward's output as a (B, C, H, W) velocity on the latent grid."""

    # ---- inputs for tests and profiling --------------------------------------------------
    @abc.abstractmethod
    def example_inputs(self, batch: int = 1, height: int = 8, width: int = 8, text_len: int = 5,
                       seed: int = 0) -> dict:
        """Random diffusers-forward inputs of the right shapes (latent grid height x width)."""


def _randomize_zero_inits(model: nn.Module, seed: int) -> None:
    """diffusers zero-inits some output layers (adaLN-Zero style); random tiny models need
    them non-zero or whole branches are dead and equivalence tests prove nothing."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().max() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
