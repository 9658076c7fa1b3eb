"""Tiny random vision–language models and processors built from configs (no downloads), and small images.

Families: LLaVA (CLIP vision tower + Llama), Qwen2-VL (its own vision transformer + M-RoPE text model),
Idefics3 (SigLIP-style vision model + pixel-shuffle connector + Llama); also LLaVA-NeXT (any-resolution
tiles), Qwen2.5-VL (windowed vision attention) and SmolVLM (fed by the Idefics3 processor). Each processor is the real
transformers processor class over the byte tokenizer of ``conftest.py`` with the family's image
tokens added, a small image size and a chat template that writes each image part as the family's
placeholder. Also used by ``benchmarks/bench_vlm.py``.
"""

from __future__ import annotations

import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import byte_tokenizer  # noqa: E402

FAMILIES = ("llava", "qwen2_vl", "idefics3")


def _template(image: str) -> str:
    return ("{% for m in messages %}<|{{ m['role'] }}|>"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}" + image + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{% if m['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(extra: list[str]):
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _text_config(tok, **kw) -> dict:
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               initializer_range=0.2)
    cfg.update(kw)
    return cfg


def tiny_llava(seed: int = 0, image_size: int = 16, patch_size: int = 8, attn: str = "sdpa", vision_hidden: int = 16,
               vision_layers: int = 1):
    """LLaVA: CLIP vision (``image_size``/``patch_size``, CLS dropped: (image/patch)^2 tokens per image) + Llama."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(["<image>"])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_template("<image>"))
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                       num_hidden_layers=vision_layers, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden),
        text_config=LlamaConfig(**_text_config(tok)), image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).float()
    model.set_attn_implementation(attn)
    return model.eval(), processor


def qwen2_vl_processor(tok, image_processor, chat_template):
    """Qwen2VLProcessor without its video processor (that class needs torchvision, not installed here)."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLProcessorImagesOnly(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLProcessorImagesOnly(image_processor=image_processor, tokenizer=tok, chat_template=chat_template)


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa"):
    """Qwen2-VL: patch 4, merge 2, 16..32 px per side (one token per 8x8 pixels of the resized image)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    image_processor = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                               temporal_patch_size=2)
    processor = qwen2_vl_processor(tok, image_processor, _template("<|vision_start|><|image_pad|><|vision_end|>"))
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=_text_config(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    model = Qwen2VLForConditionalGeneration(config).float()
    model.set_attn_implementation(attn)
    return model.eval(), processor


def tiny_idefics3(seed: int = 0, attn: str = "sdpa"):
    """Idefics3: 16 px images, patch 4, pixel shuffle 2 -> 4 image tokens per image (no splitting)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tok = _tokenizer(extra + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)])
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 16},
                                                do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=_template("<image>"))
    torch.manual_seed(seed)
    config = Idefics3Config(
        text_config=dict(model_type="llama", **_text_config(tok)),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = Idefics3ForConditionalGeneration(config).float()
    model.set_attn_implementation(attn)
    return model.eval(), processor


def tiny_llava_next(seed: int = 0, attn: str = "sdpa"):
    """LLaVA-NeXT: CLIP vision at 16 px, patch 8, any-resolution grid [[16, 16], [16, 32], [32, 16]]: an
    image becomes a base tile plus its grid tiles, with one newline token per row (image_newline)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = _tokenizer(["<image>"])
    grid = [[16, 16], [16, 32], [32, 16]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                 image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_template("<image>"))
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(**_text_config(tok)), image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid, vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaNextForConditionalGeneration(config).float()
    model.set_attn_implementation(attn)
    return model.eval(), processor


def tiny_qwen2_5_vl(seed: int = 0, attn: str = "sdpa"):
    """Qwen2.5-VL: as :func:`tiny_qwen2_vl` (its image processor and M-RoPE), windowed vision attention."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    image_processor = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                               temporal_patch_size=2)
    processor = qwen2_vl_processor(tok, image_processor, _template("<|vision_start|><|image_pad|><|vision_end|>"))
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    model.set_attn_implementation(attn)
    return model.eval(), processor


def tiny_smolvlm(seed: int = 0, attn: str = "sdpa"):
    """SmolVLM (the Idefics3 architecture under its own classes), fed by :func:`tiny_idefics3`'s processor:
    SmolVLMProcessor needs the num2words package and a video processor (torchvision), not installed here."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    _, processor = tiny_idefics3(seed=seed, attn=attn)
    tok = processor.tokenizer
    torch.manual_seed(seed)
    config = SmolVLMConfig(
        text_config=dict(model_type="llama", **_text_config(tok)),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = SmolVLMForConditionalGeneration(config).float()
    model.set_attn_implementation(attn)
    return model.eval(), processor


BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "idefics3": tiny_idefics3,
            "llava_next": tiny_llava_next, "qwen2_5_vl": tiny_qwen2_5_vl, "smolvlm": tiny_smolvlm}
ALL_FAMILIES = FAMILIES + ("llava_next", "qwen2_5_vl", "smolvlm")


def tiny_vlm(family: str, seed: int = 0, attn: str = "sdpa"):
    """``(model, processor)`` of a tiny random model of ``family`` (one of :data:`FAMILIES`)."""
    return BUILDERS[family](seed=seed, attn=attn)


def write_images(folder, n: int, seed: int = 0, sizes=((20, 28), (24, 24), (28, 16))) -> list[str]:
    """``n`` small random RGB PNGs (sizes cycling through ``sizes``) in ``folder``; their paths."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        pixels = np.array([[[rng.randrange(256) for _ in range(3)] for _ in range(w)] for _ in range(h)], dtype="uint8")
        path = os.path.join(str(folder), f"img{seed}_{i}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
