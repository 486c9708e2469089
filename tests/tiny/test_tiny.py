"""The tiny stand-in checkpoints keep what a trained model has and a plain random init lacks."""

from __future__ import annotations

import torch
from transformers import CLIPModel, Qwen2ForCausalLM

from llava_lora.tiny import checkpoints as tiny


def test_tiny_clip_position_embeddings_code_row_and_column(tmp_path):
    tiny.tiny_clip(tmp_path, image_size=32, patch_size=8, hidden_size=64)
    table = CLIPModel.from_pretrained(tmp_path).vision_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(table[0], torch.zeros(64))  # CLS has no place in the grid
    grid = table[1:].reshape(4, 4, 64)  # raster order: [row, column, channel]
    row_code, col_code = grid[..., :32], grid[..., 32:]
    # half the channels depend on the row only, half on the column only, and every place is told apart
    assert torch.allclose(row_code, row_code[:, :1].expand_as(row_code))
    assert torch.allclose(col_code, col_code[:1].expand_as(col_code))
    assert len({tuple(v.tolist()) for v in table[1:]}) == 16
    assert abs(table[1:].std().item() - tiny.POSITION_STD) < 1e-3


def test_tiny_qwen2_head_can_be_certain(tmp_path):
    tiny.tiny_qwen2(tmp_path)
    lm = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    head = lm.lm_head.weight.detach()
    assert abs(head.std().item() - tiny.LM_HEAD_STD) < 0.02
    # The final norm leaves |h| = sqrt(hidden): a state along one row must be able to put ~all mass on that token.
    h = head[100] / head[100].norm() * head.shape[1] ** 0.5
    assert torch.softmax(head @ h, dim=0)[100] > 0.99
