"""FLUX family over diffusers' `FluxTransformer2DModel`.

Blocks: the double-stream `transformer_blocks` (index 0 .. num_layers-1) followed by the
single-stream `single_transformer_blocks`; both kinds take and return the image stream
(`hidden_states`, (B, N_img, D)) and the text stream (`encoder_hidden_states`, (B, N_txt, D)).
Image-query -> text-key masking is a boolean attention mask on the joint attention of a block.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from blockskip.models.family import Cond, Family, State

# LoRA targets per block kind, in the full model's module naming (diffusers / PEFT keys).
DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
DOUBLE_MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v"]
SINGLE_MLP = ["proj_mlp", "proj_out"]

# kohya sd-scripts' FLUX LoRA (networks/lora_flux.py) names a module `lora_unet_<path>` after the
# original FLUX checkpoint (black-forest-labs/flux), "." -> "_". There q, k, v are one Linear
# (`img_attn.qkv`), and a single block's q, k, v and MLP input are one Linear (`linear1`), their
# outputs concatenated in the order listed. diffusers' `_convert_kohya_flux_lora_to_diffusers`
# reads these names back.
KOHYA_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"], "img_mlp_2": ["ff.net.2"], "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"], "txt_mlp_2": ["ff_context.net.2"], "txt_mod_lin": ["norm1_context.linear"],
}
KOHYA_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
                "modulation_lin": ["norm.linear"]}


class _ImageToTextMask:
    """Wraps a FLUX attention processor; image queries get no text keys.

    Joint attention runs over the concatenation [text, image]. In a double-stream block the
    text length is `encoder_hidden_states.shape[1]`; in a single-stream block the processor sees
    only the concatenation, so a forward pre-hook on the block records the text length.
    """

    def __init__(self, inner, block=None):
        self.inner = inner
        self.text_len = None
        self._hook = None
        if block is not None:
            self._hook = block.register_forward_pre_hook(self._record_text_len, with_kwargs=True)

    def _record_text_len(self, module, args, kwargs):
        encoder_hidden_states = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.text_len = encoder_hidden_states.shape[1]

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            total = text_len + hidden_states.shape[1]
        else:
            assert self.text_len is not None, "single-stream mask used without its block hook"
            text_len, total = self.text_len, hidden_states.shape[1]
        keep = torch.ones(total, total, dtype=torch.bool, device=hidden_states.device)
        keep[text_len:, :text_len] = False  # (N_q, N_k): image queries -> text keys
        mask = keep[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=mask,
                          image_rotary_emb=image_rotary_emb)


class Flux(Family):
    name = "flux"
    model_cls = FluxTransformer2DModel
    latent_packing = 2  # FLUX packs 2x2 latent pixels into one token
    text_in_sequence = True  # double blocks attend over image and text tokens jointly; single blocks carry both
    pipeline_text_len = 512  # T5's max_sequence_length in FluxPipeline
    paper_s_max = 512  # the paper's FLUX crops: 512 -> s_min 256

    @classmethod
    def cond_values(cls, hidden: int, image_tokens: int) -> tuple[int, int]:
        return hidden + 3 * image_tokens, 0  # temb (D) and img_ids (N_img, 3)

    @classmethod
    def prompt_values(cls, hidden: int, text_len: int) -> int:
        return 3 * text_len  # txt_ids

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    @classmethod
    def encode_prompt(cls, pipeline, prompt: str, max_length: int) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipeline.encode_prompt(prompt, prompt_2=None, max_sequence_length=max_length)
        return {"encoder_hidden_states": embeds.cpu(), "pooled_projections": pooled.cpu()}

    @classmethod
    def tiny_config(cls) -> dict:
        return dict(
            patch_size=1,
            in_channels=12,  # pixel space: 3 channels x 2 x 2 packing
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )

    # ---- blocks --------------------------------------------------------------------------
    def block_names(self) -> list[str]:
        cfg = self.model.config
        return ([f"transformer_blocks.{i}" for i in range(cfg.num_layers)]
                + [f"single_transformer_blocks.{i}" for i in range(cfg.num_single_layers)])

    def is_double(self, index: int) -> bool:
        return index < self.model.config.num_layers

    def lora_targets(self, index: int, scope: str = "attention") -> list[str]:
        if self.is_double(index):
            local = DOUBLE_ATTENTION + (DOUBLE_MLP if scope == "all" else [])
        else:
            local = SINGLE_ATTENTION + (SINGLE_MLP if scope == "all" else [])
        prefix = self.block_names()[index]
        return [f"{prefix}.{name}" for name in local]

    def kohya_groups(self) -> dict[str, list[tuple[str, int]]]:
        cfg = self.model.config
        groups = {}
        for kind, count, table in (("double", cfg.num_layers, KOHYA_DOUBLE),
                                   ("single", cfg.num_single_layers, KOHYA_SINGLE)):
            for i in range(count):
                block = self.block_names()[i if kind == "double" else cfg.num_layers + i]
                for name, parts in table.items():
                    paths = [f"{block}.{part}" for part in parts]
                    groups[f"lora_unet_{kind}_blocks_{i}_{name}"] = [
                        (path, self.model.get_submodule(path).out_features) for path in paths]
        return groups

    def head_module_names(self) -> list[str]:
        return ["norm_out", "proj_out"]

    # ---- forward, decomposed ---------------------------------------------------------------
    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
              txt_ids, guidance=None) -> tuple[State, Cond]:
        m = self.model
        hidden_states = m.x_embedder(hidden_states)  # (B, N_img, D)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = m.time_text_embed(timestep, guidance, pooled_projections)  # (B, D)
        else:
            temb = m.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = m.context_embedder(encoder_hidden_states)  # (B, N_txt, D)
        state = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states}
        cond = {"temb": temb, "txt_ids": txt_ids, "img_ids": img_ids}
        return state, cond

    def block_context(self, cond: Cond) -> dict:
        ids = torch.cat((cond["txt_ids"], cond["img_ids"]), dim=0)
        return {"temb": cond["temb"], "image_rotary_emb": self.model.pos_embed(ids)}

    def run_block(self, index: int, state: State, context: dict) -> State:
        block = self.model.get_submodule(self.block_names()[index])
        encoder_hidden_states, hidden_states = block(
            hidden_states=state["hidden_states"],
            encoder_hidden_states=state["encoder_hidden_states"],
            temb=context["temb"],
            image_rotary_emb=context["image_rotary_emb"],
        )
        return {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states}

    def head(self, state: State, cond: Cond) -> torch.Tensor:
        hidden_states = self.model.norm_out(state["hidden_states"], cond["temb"])
        return self.model.proj_out(hidden_states)  # (B, N_img, patch^2 * C_out)

    # ---- masking -------------------------------------------------------------------------
    def _text_attention(self, index: int):
        return self.block(index).attn

    def _text_mask_processor(self, index: int, original):
        return _ImageToTextMask(original, block=None if self.is_double(index) else self.block(index))

    # ---- latents <-> model inputs --------------------------------------------------------
    token_patch = 2  # pixels of the latent grid per token side (the 2x2 packing)
    text_keys = ("encoder_hidden_states", "pooled_projections")
    prompt_cond_keys = ("txt_ids",)  # conditioning that depends on the prompt alone

    def text_shapes(self) -> dict:
        cfg = self.model.config
        return {"encoder_hidden_states": cfg.joint_attention_dim, "pooled_projections": cfg.pooled_projection_dim}

    def make_inputs(self, latents: torch.Tensor, sigma: torch.Tensor, text: dict,
                    guidance: float = 3.5) -> dict:
        """Diffusers-forward inputs for noisy latents (B, C, H, W) at flow-matching sigma (B,)."""
        batch, _, height, width = latents.shape
        inputs = dict(
            hidden_states=pack_latents(latents),
            encoder_hidden_states=text["encoder_hidden_states"].expand(batch, -1, -1),
            pooled_projections=text["pooled_projections"].expand(batch, -1),
            timestep=sigma.to(latents.dtype),  # FLUX scales by 1000 itself
            img_ids=image_ids(height // 2, width // 2).to(latents.device),
            txt_ids=torch.zeros(text["encoder_hidden_states"].shape[1], 3, device=latents.device),
        )
        if self.model.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), guidance, device=latents.device)
        return inputs

    def output_to_latents(self, output: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_latents(output, height, width)

    # ---- inputs --------------------------------------------------------------------------
    def example_inputs(self, batch=1, height=8, width=8, text_len=5, seed=0) -> dict:
        cfg = self.model.config
        gen = torch.Generator().manual_seed(seed)
        dtype = next(self.model.parameters()).dtype
        inputs = dict(
            hidden_states=torch.randn(batch, height * width, cfg.in_channels, generator=gen),
            encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=gen),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
            timestep=torch.rand(batch, generator=gen),
            img_ids=image_ids(height, width),
            txt_ids=torch.zeros(text_len, 3),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX's (row, col) position ids of a token grid, (height * width, 3)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C * 4) FLUX tokens."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, C * 4) FLUX tokens -> (B, C, H, W) latents."""
    b, _, d = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, d // 4, height, width)
