"""training.distill.teacher_target: k copies of the teacher's context are, for a UNet's cross-attention, the context."""
import pytest
import torch

from training.distill import teacher_target


def test_cross_attention_over_copies_of_a_context_equals_attention_over_it():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attention = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    queries, context = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    target = teacher_target(context, 28)
    assert target.shape == (2, 28, 8)
    assert all(torch.equal(target[:, i * 7:(i + 1) * 7], context) for i in range(4))
    with torch.no_grad():
        torch.testing.assert_close(attention(queries, target), attention(queries, context), rtol=1e-5, atol=1e-6)
        # ...which is not true of just any longer context: copies of another order or a padded one differ
        shuffled = torch.cat([context, context.flip(1)[:, :3]], dim=1)
        assert not torch.allclose(attention(queries, shuffled), attention(queries, context), atol=1e-4)


@pytest.mark.parametrize("tokens", [7, 14])
def test_a_whole_multiple_is_accepted_and_anything_else_refused(tokens):
    context = torch.randn(1, 7, 4)
    assert teacher_target(context, tokens).shape[1] == tokens
    with pytest.raises(ValueError, match="10 tokens has no slot-wise target in a 7-token"):
        teacher_target(context, 10)
