"""SANA family over diffusers' `SanaTransformer2DModel`.

Blocks: `transformer_blocks`, each linear self-attention (`attn1`) + cross-attention to the
caption (`attn2`) + GLUMBConv feed-forward. The state is the image tokens alone
(`hidden_states`, (B, N_img, D)); the projected caption never changes across blocks, so it is
conditioning. Masking image-query -> text-key attention removes every key of `attn2`; the
softmax over an empty key set is taken as the empty sum, so the block's cross-attention branch
contributes nothing.
"""

from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel

from blockskip.models.family import Cond, Family, State

ATTENTION = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
MLP = ["ff.conv_inverted", "ff.conv_point"]


class _NoTextAttention:
    """Cross-attention with every text key masked: no message from the caption."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return hidden_states.new_zeros(*hidden_states.shape[:2], attn.to_out[0].out_features)


class Sana(Family):
    name = "sana"
    model_cls = SanaTransformer2DModel
    cfg_scale = 4.5  # SANA's pipeline default, with the empty prompt as the negative
    pipeline_text_len = 300  # Gemma's max_sequence_length in SanaPipeline
    paper_s_max = 1024  # the paper's SANA crops: 1024 -> s_min 512

    @classmethod
    def cond_values(cls, hidden: int, image_tokens: int) -> tuple[int, int]:
        return 7 * hidden, 16  # timestep modulation (6D), embedded timestep (D); its token grid (2 int64)

    @classmethod
    def prompt_values(cls, hidden: int, text_len: int) -> int:
        return text_len * (hidden + 1)  # the projected caption and its mask

    @classmethod
    def attention_mask_bytes(cls, text_len: int) -> int:
        return 8 * text_len  # Gemma's int64 attention mask

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import SanaPipeline

        return SanaPipeline

    @classmethod
    def encode_prompt(cls, pipeline, prompt: str, max_length: int) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                    max_sequence_length=min(max_length, cls.pipeline_text_len))
        return {"encoder_hidden_states": embeds.cpu(), "encoder_attention_mask": mask.cpu()}

    @classmethod
    def tiny_config(cls) -> dict:
        return dict(
            in_channels=3,  # pixel space
            out_channels=3,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=6,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=24,
            mlp_ratio=2.5,
            sample_size=8,
            patch_size=1,
        )

    def block_names(self) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(self.model.config.num_layers)]

    def lora_targets(self, index: int, scope: str = "attention") -> list[str]:
        local = ATTENTION + (MLP if scope == "all" else [])
        return [f"transformer_blocks.{index}.{name}" for name in local]

    def head_module_names(self) -> list[str]:
        return ["scale_shift_table", "norm_out", "proj_out"]

    def embed(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None,
              guidance=None) -> tuple[State, Cond]:
        m = self.model
        batch, _, height, width = hidden_states.shape
        p = m.config.patch_size
        hidden_states = m.patch_embed(hidden_states)  # (B, N_img, D)
        if guidance is not None:
            modulation, embedded_timestep = m.time_embed(timestep, guidance=guidance,
                                                         hidden_dtype=hidden_states.dtype)
        else:
            modulation, embedded_timestep = m.time_embed(timestep, batch_size=batch,
                                                         hidden_dtype=hidden_states.dtype)
        text = m.caption_projection(encoder_hidden_states)
        text = m.caption_norm(text.view(batch, -1, hidden_states.shape[-1]))  # (B, N_txt, D)
        cond = {
            "timestep": modulation,  # (B, 6 * D) block modulation
            "embedded_timestep": embedded_timestep,  # (B, D) head modulation
            "encoder_hidden_states": text,
            "grid": torch.tensor([height // p, width // p]),
        }
        if encoder_attention_mask is not None:
            if encoder_attention_mask.ndim == 2:  # (B, N_txt) keep=1 -> additive bias (B, 1, N_txt)
                encoder_attention_mask = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
                encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
            cond["encoder_attention_mask"] = encoder_attention_mask
        return {"hidden_states": hidden_states}, cond

    def block_context(self, cond: Cond) -> dict:
        height, width = (int(v) for v in cond["grid"])
        return {**cond, "height": height, "width": width}

    def run_block(self, index: int, state: State, context: dict) -> State:
        block = self.model.get_submodule(self.block_names()[index])
        hidden_states = block(
            state["hidden_states"],
            None,
            context["encoder_hidden_states"],
            context.get("encoder_attention_mask"),
            context["timestep"],
            context["height"],
            context["width"],
        )
        return {"hidden_states": hidden_states}

    def head(self, state: State, cond: Cond) -> torch.Tensor:
        m = self.model
        height, width = (int(v) for v in cond["grid"])
        p = m.config.patch_size
        hidden_states = m.norm_out(state["hidden_states"], cond["embedded_timestep"], m.scale_shift_table)
        hidden_states = m.proj_out(hidden_states)
        batch = hidden_states.shape[0]
        hidden_states = hidden_states.reshape(batch, height, width, p, p, -1)
        hidden_states = hidden_states.permute(0, 5, 1, 3, 2, 4)
        return hidden_states.reshape(batch, -1, height * p, width * p)  # (B, C_out, H, W)

    def _text_attention(self, index: int):
        return self.block(index).attn2

    def _text_mask_processor(self, index: int, original):
        return _NoTextAttention()

    text_keys = ("encoder_hidden_states", "encoder_attention_mask")
    prompt_cond_keys = ("encoder_hidden_states", "encoder_attention_mask")  # projected caption: per prompt

    @property
    def token_patch(self) -> int:
        return self.model.config.patch_size

    def text_shapes(self) -> dict:
        return {"encoder_hidden_states": self.model.config.caption_channels}

    def make_inputs(self, latents: torch.Tensor, sigma: torch.Tensor, text: dict,
                    guidance: float = 4.5) -> dict:
        """Diffusers-forward inputs for noisy latents (B, C, H, W) at flow-matching sigma (B,)."""
        batch = latents.shape[0]
        inputs = dict(
            hidden_states=latents,
            encoder_hidden_states=text["encoder_hidden_states"].expand(batch, -1, -1),
            timestep=sigma.to(latents.dtype) * 1000,  # SANA takes the scheduler's 0..1000 timestep
        )
        if "encoder_attention_mask" in text:
            inputs["encoder_attention_mask"] = text["encoder_attention_mask"].expand(batch, -1)
        if self.model.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), guidance, device=latents.device)
        return inputs

    def output_to_latents(self, output: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return output

    def example_inputs(self, batch=1, height=8, width=8, text_len=5, seed=0) -> dict:
        cfg = self.model.config
        gen = torch.Generator().manual_seed(seed)
        dtype = next(self.model.parameters()).dtype
        return dict(
            hidden_states=torch.randn(batch, cfg.in_channels, height, width, generator=gen).to(dtype),
            encoder_hidden_states=torch.randn(batch, text_len, cfg.caption_channels, generator=gen).to(dtype),
            timestep=torch.rand(batch, generator=gen).to(dtype) * 1000,
        )
